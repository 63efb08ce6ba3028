//! FHIR Bundles in an export, whether a file holds one or an NDJSON line
//! does: entries are validated first (a plan, on a worker thread), then
//! applied in order by the writer. A transaction Bundle is all-or-nothing,
//! as FHIR defines it; other Bundles import their valid entries.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::index::{Head, IndexContext, Invalid, Validated, index_resource, redact};
use super::writer::Writer;
use super::{Error, Location};
use crate::store::{Checkpoint, ResourceKey};

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    entry: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "fullUrl", borrow, default)]
    full_url: Option<&'a str>,
    #[serde(borrow, default)]
    resource: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request: Option<RawRequest<'a>>,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow, default)]
    url: &'a str,
}

pub(crate) enum EntryAction {
    Store(Box<Validated>),
    Delete(ResourceKey),
}

/// A Bundle's entries, validated, ready to apply.
pub(crate) struct Plan {
    transaction: bool,
    actions: Vec<(usize, EntryAction)>,
    failures: Vec<(usize, Invalid)>,
}

/// Whether a resource's JSON is a Bundle (a cheap look at its head).
pub(crate) fn is_bundle(text: &str) -> bool {
    text.contains("\"Bundle\"")
        && serde_json::from_str::<Head<'_>>(text).is_ok_and(|h| h.resource_type == "Bundle")
}

/// Validates every entry of a Bundle; `Err` when the Bundle itself is
/// unusable.
pub(crate) fn plan(text: &str, ctx: &IndexContext) -> Result<Plan, Invalid> {
    let head: Head<'_> = serde_json::from_str(text).map_err(|e| {
        Invalid::new(
            Some("Bundle"),
            None,
            format!("not valid JSON: {}", redact(&e.to_string())),
        )
    })?;
    let bundle: RawBundle<'_> = serde_json::from_str(text).map_err(|e| {
        let reason = format!("not a valid Bundle: {}", redact(&e.to_string()));
        Invalid::new(Some("Bundle"), head.id, reason)
    })?;
    let kind = bundle.kind.unwrap_or("");
    if !matches!(kind, "collection" | "transaction" | "batch" | "searchset") {
        let reason = format!(
            "Bundle.type is `{}`; expected collection, transaction, batch or searchset",
            super::rrn::element_name(kind)
        );
        return Err(Invalid::new(Some("Bundle"), head.id, reason));
    }
    // References to entries by fullUrl (urn:uuid:... in transactions)
    // resolve to the entries' resource ids.
    let mut entry_ctx = IndexContext {
        full_urls: HashMap::new(),
        to_loinc: ctx.to_loinc.clone(),
        to_kcd: ctx.to_kcd.clone(),
        rrn: ctx.rrn,
        link_key: ctx.link_key.clone(),
        imported_at: ctx.imported_at,
        lenient: ctx.lenient,
    };
    for entry in &bundle.entry {
        if let (Some(url), Some(resource)) = (entry.full_url, entry.resource)
            && let Ok(h) = serde_json::from_str::<Head<'_>>(resource.get())
            && let Some(id) = h.id
        {
            entry_ctx
                .full_urls
                .insert(url.to_owned(), format!("{}/{id}", h.resource_type));
        }
    }
    let mut plan = Plan {
        transaction: kind == "transaction",
        actions: Vec::new(),
        failures: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for (index, entry) in bundle.entry.iter().enumerate() {
        let method = entry.request.as_ref().map(|r| r.method).unwrap_or("PUT");
        let outcome = match method {
            "DELETE" => {
                let url = entry.request.as_ref().map(|r| r.url).unwrap_or_default();
                match url.split_once('/') {
                    Some((ty, id))
                        if !ty.is_empty() && !id.is_empty() && !id.contains(['/', '?']) =>
                    {
                        Ok(EntryAction::Delete(ResourceKey {
                            resource_type: ty.to_owned(),
                            id: id.to_owned(),
                        }))
                    }
                    _ => Err(Invalid::new(
                        None,
                        None,
                        "DELETE request.url must be Type/id; conditional deletes are not supported"
                            .to_owned(),
                    )),
                }
            }
            "PUT" | "POST" => match entry.resource {
                None => Err(Invalid::new(None, None, "entry has no resource".to_owned())),
                Some(resource) => index_resource(resource.get(), &entry_ctx)
                    .map(|validated| EntryAction::Store(Box::new(validated))),
            },
            other => Err(Invalid::new(
                None,
                None,
                format!("request.method {other} is not supported; expected PUT, POST or DELETE"),
            )),
        };
        // FHIR: a transaction names each resource once (it must land in
        // one database transaction, which a repeat would split).
        let outcome = outcome.and_then(|action| {
            let key = match &action {
                EntryAction::Store(v) => (
                    v.indexed.resource.resource_type.clone(),
                    v.indexed.resource.id.clone(),
                ),
                EntryAction::Delete(k) => (k.resource_type.clone(), k.id.clone()),
            };
            if plan.transaction && !seen.insert(key) {
                return Err(Invalid::new(
                    None,
                    None,
                    "the same resource appears twice in a transaction Bundle".to_owned(),
                ));
            }
            Ok(action)
        });
        match outcome {
            Ok(action) => plan.actions.push((index, action)),
            Err(invalid) => plan.failures.push((index, invalid)),
        }
    }
    Ok(plan)
}

/// Applies a plan: entry `i` is reported at `at(i)`.
pub(crate) fn apply(
    writer: &mut Writer<'_>,
    plan: Plan,
    at: impl Fn(usize) -> Location,
    checkpoint: &Checkpoint,
) -> Result<(), Error> {
    if plan.transaction && !plan.failures.is_empty() {
        let first = plan.failures[0].0;
        for (index, invalid) in plan.failures {
            writer.reject(at(index), invalid);
        }
        for (index, action) in plan.actions {
            let reason = format!(
                "not imported: transaction Bundle is all-or-nothing and entry {first} is invalid"
            );
            let invalid = match action {
                EntryAction::Store(v) => Invalid::new(
                    Some(&v.indexed.resource.resource_type),
                    Some(&v.indexed.resource.id),
                    reason,
                ),
                EntryAction::Delete(key) => {
                    Invalid::new(Some(&key.resource_type), Some(&key.id), reason)
                }
            };
            writer.reject(at(index), invalid);
        }
        return Ok(());
    }
    for (index, invalid) in plan.failures {
        writer.reject(at(index), invalid);
    }
    if plan.transaction {
        // A transaction must land in one database transaction.
        writer.flush(None)?;
        writer.unbounded = true;
    }
    for (index, action) in plan.actions {
        match action {
            EntryAction::Store(validated) => writer.add(*validated, at(index), checkpoint)?,
            EntryAction::Delete(key) => writer.delete(key, checkpoint)?,
        }
    }
    if plan.transaction {
        writer.unbounded = false;
        writer.flush(None)?;
    }
    Ok(())
}

/// Imports a `.json` document: a Bundle, or a single resource. JSON that is
/// no FHIR resource at all (a bulk-export manifest, a generator's metadata)
/// is skipped: `Ok(Some(note))`.
pub(crate) fn import_document(
    writer: &mut Writer<'_>,
    ctx: &IndexContext,
    text: &str,
) -> Result<Option<String>, Error> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(e) => {
            writer.reject(
                Location::File,
                Invalid::new(
                    None,
                    None,
                    format!("not valid JSON: {}", redact(&e.to_string())),
                ),
            );
            return Ok(None);
        }
        Ok(value) if value.get("resourceType").and_then(|t| t.as_str()).is_none() => {
            return Ok(Some(
                "skipped: JSON without resourceType is not a FHIR resource (an export manifest or metadata file?)"
                    .to_owned(),
            ));
        }
        Ok(_) => {}
    }
    let none = Checkpoint::none();
    if !is_bundle(text) {
        match index_resource(text, ctx) {
            Ok(validated) => writer.add(validated, Location::File, &none)?,
            Err(invalid) => writer.reject(Location::File, invalid),
        }
        writer.flush(None)?;
        return Ok(None);
    }
    match plan(text, ctx) {
        Ok(plan) => apply(writer, plan, Location::Entry, &none)?,
        Err(invalid) => writer.reject(Location::File, invalid),
    }
    writer.flush(None)?;
    Ok(None)
}

impl Checkpoint {
    /// No checkpoint: the source is not resumable line by line.
    pub(crate) fn none() -> Checkpoint {
        Checkpoint {
            source: String::new(),
            fingerprint: String::new(),
            lines_committed: 0,
            finished: false,
        }
    }
}

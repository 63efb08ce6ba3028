//! Local code maps (HIRA EDI lab codes to LOINC, SNOMED CT diagnoses to
//! KCD-8) loaded from a hospital's CSV, and re-indexing after a map
//! changes, so that queries in LOINC and KCD-8 find what was coded locally.

use std::fs::File;
use std::path::Path;

use super::Error;
use super::index::{IndexContext, index_resource};
use crate::store::{Batch, CodeMapping, ResourceKey, Store};
use crate::terminology::{self, HIRA_EDI, KCD8, LOINC, SNOMED};

/// Which map a CSV holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `edi_code,loinc_code`: HIRA EDI laboratory codes to LOINC.
    EdiToLoinc,
    /// `snomed_code,kcd_code`: SNOMED CT diagnoses to KCD-8 codes.
    SnomedToKcd,
}

impl MapKind {
    fn systems(self) -> (&'static str, &'static str) {
        match self {
            MapKind::EdiToLoinc => (HIRA_EDI, LOINC),
            MapKind::SnomedToKcd => (SNOMED, KCD8),
        }
    }

    fn header(self) -> (&'static str, &'static str) {
        match self {
            MapKind::EdiToLoinc => ("edi_code", "loinc_code"),
            MapKind::SnomedToKcd => ("snomed_code", "kcd_code"),
        }
    }

    /// Checks one row's codes; the problem names the column.
    fn check(self, source: &str, target: &str) -> Result<(), String> {
        let plain = |c: &str| {
            !c.is_empty()
                && c.len() <= 32
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        match self {
            MapKind::EdiToLoinc => {
                if !plain(source) || source.contains('.') {
                    return Err("the EDI code must be letters and digits".to_owned());
                }
                let loinc_ok = plain(target)
                    && target.split_once('-').is_some_and(|(n, c)| {
                        !n.is_empty()
                            && n.bytes().all(|b| b.is_ascii_digit())
                            && c.len() == 1
                            && c.as_bytes()[0].is_ascii_digit()
                    });
                if !loinc_ok {
                    return Err("the LOINC code must look like 4548-4".to_owned());
                }
            }
            MapKind::SnomedToKcd => {
                let sctid =
                    (6..=18).contains(&source.len()) && source.bytes().all(|b| b.is_ascii_digit());
                if !sctid {
                    return Err(
                        "the SNOMED CT code must be a concept id of 6 to 18 digits".to_owned()
                    );
                }
                let kcd = terminology::normalize_code(KCD8, target);
                let kcd_ok = kcd.len() >= 3
                    && kcd.len() <= 8
                    && kcd.as_bytes()[0].is_ascii_uppercase()
                    && kcd[1..].bytes().all(|b| b.is_ascii_alphanumeric());
                if !kcd_ok {
                    return Err("the KCD-8 code must look like E11 or E11.9".to_owned());
                }
            }
        }
        Ok(())
    }
}

/// The index context with the node's code maps.
pub(crate) fn context(store: &Store) -> Result<IndexContext, Error> {
    let mut ctx = IndexContext::default();
    let maps = store.code_map().map_err(|source| Error::Store {
        committed: 0,
        source,
    })?;
    for m in maps {
        let target = if m.target_system == LOINC {
            &mut ctx.to_loinc
        } else if m.target_system == KCD8 {
            &mut ctx.to_kcd
        } else {
            continue;
        };
        target
            .entry((m.source_system, m.source_code))
            .or_default()
            .push(m.target_code);
    }
    Ok(ctx)
}

/// Loads a HIRA EDI -> LOINC lab code map (see [`load_code_map`]).
pub fn load_edi_loinc_map(store: &Store, path: &Path) -> Result<usize, Error> {
    load_code_map(store, path, MapKind::EdiToLoinc)
}

/// Loads a code map from CSV (two columns, `edi_code,loinc_code` or
/// `snomed_code,kcd_code`, further columns ignored, an optional header row
/// with exactly those names), replacing the previous map of that kind. Any
/// bad row fails the whole load. Re-index afterwards ([`reindex`]).
pub fn load_code_map(store: &Store, path: &Path, kind: MapKind) -> Result<usize, Error> {
    let file = File::open(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(file);
    let (source_system, target_system) = kind.systems();
    let (source_name, target_name) = kind.header();
    let mut mappings = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let line = index as u64 + 1;
        let bad = |problem: String| Error::CodeMap {
            path: path.to_owned(),
            line,
            problem,
        };
        let record = record.map_err(|e| bad(e.to_string()))?;
        let (Some(source), Some(target)) = (record.get(0), record.get(1)) else {
            return Err(bad(format!(
                "expected two columns: {source_name},{target_name}"
            )));
        };
        if line == 1
            && source.eq_ignore_ascii_case(source_name)
            && target.eq_ignore_ascii_case(target_name)
        {
            continue;
        }
        kind.check(source, target).map_err(bad)?;
        mappings.push(CodeMapping {
            source_system: source_system.to_owned(),
            source_code: terminology::normalize_code(source_system, source).into_owned(),
            target_system: target_system.to_owned(),
            target_code: terminology::normalize_code(target_system, target).into_owned(),
        });
    }
    if mappings.is_empty() {
        // Loading an empty file would silently remove every mapping.
        return Err(Error::CodeMap {
            path: path.to_owned(),
            line: 0,
            problem: format!("no mappings found; expected rows of {source_name},{target_name}"),
        });
    }
    store
        .replace_code_map(source_system, target_system, &mappings)
        .map_err(|source| Error::Store {
            committed: 0,
            source,
        })?;
    Ok(mappings.len())
}

/// Re-derives every index row from the stored resources, e.g. after a code
/// map changed. Returns how many resources were re-indexed. Consents go
/// first: a Consent naming a newly mapped code governs its mapped rows
/// before any of them is committed.
pub fn reindex(store: &Store, batch_size: usize) -> Result<u64, Error> {
    let mut ctx = context(store)?;
    // What is stored was accepted under the rules of its day.
    ctx.lenient = true;
    let consents = reindex_pages(store, &mut ctx, batch_size, Some("Consent"), 0)?;
    reindex_pages(store, &mut ctx, batch_size, None, consents)
}

/// Re-indexes the pages of one resource type, or of every type but
/// Consent; `done` counts on from earlier pages.
fn reindex_pages(
    store: &Store,
    ctx: &mut IndexContext,
    batch_size: usize,
    only: Option<&str>,
    mut done: u64,
) -> Result<u64, Error> {
    let store_err = |committed| move |source| Error::Store { committed, source };
    let mut after: Option<ResourceKey> = None;
    loop {
        let page = store
            .resources_page(only, after.as_ref(), batch_size as i64)
            .map_err(store_err(done))?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        let mut batch = Batch {
            reindex: true,
            ..Batch::default()
        };
        for stored in &page {
            if only.is_none() && stored.key.resource_type == "Consent" {
                continue;
            }
            // A Consent that states no time keeps the time it was stored.
            ctx.imported_at = time::OffsetDateTime::parse(
                &stored.last_updated,
                &time::format_description::well_known::Rfc3339,
            )
            .map_or(0, |t| t.unix_timestamp());
            match index_resource(&stored.content, ctx) {
                Ok(validated) => batch.items.push(validated.indexed),
                Err(invalid) => tracing::warn!(
                    resource_type = %stored.key.resource_type, id = %stored.key.id, reason = %invalid.reason,
                    "stored resource no longer validates; its index rows are left as they were"
                ),
            }
            done += 1;
        }
        store.write_batch(&batch).map_err(store_err(done))?;
    }
    Ok(done)
}

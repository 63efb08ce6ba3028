//! Exporting the node's current resources as FHIR bulk NDJSON, one file per
//! resource type, for hospital IT.
//!
//! Resources are written as imported: the source's own `meta.versionId` and
//! `meta.lastUpdated` are kept (they say when the EHR last changed the
//! record). The node's version and the time it stored that version go in
//! two `meta.extension`s ([`NODE_VERSION`], [`NODE_STORED_AT`]), which
//! import removes again, so an export re-imports to the same resources.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::store::{self, ResourceKey, Store};

/// Extension on `meta`: the node's version number of the resource.
pub const NODE_VERSION: &str = "urn:ghx:fhir:StructureDefinition/node-version";
/// Extension on `meta`: when the node stored that version.
pub const NODE_STORED_AT: &str = "urn:ghx:fhir:StructureDefinition/node-stored-at";

/// Removes the node's own `meta` extensions from an exported resource being
/// imported again: `Some(json)` when there were any.
pub(crate) fn without_node_meta(json: &str) -> Option<String> {
    if !json.contains("urn:ghx:fhir:StructureDefinition/node-") {
        return None;
    }
    let mut value: Value = serde_json::from_str(json).ok()?;
    let object = value.as_object_mut()?;
    let meta = object.get_mut("meta")?.as_object_mut()?;
    let list = meta.get_mut("extension")?.as_array_mut()?;
    list.retain(|e| {
        let url = e.get("url").and_then(Value::as_str);
        url != Some(NODE_VERSION) && url != Some(NODE_STORED_AT)
    });
    if list.is_empty() {
        meta.remove("extension");
    }
    if meta.is_empty() {
        object.remove("meta");
    }
    serde_json::to_string(&value).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("stored {resource_type}/{id} is not a JSON object")]
    Corrupt { resource_type: String, id: String },
}

const PAGE: i64 = 2000;

/// Writes `<dir>/<ResourceType>.ndjson` for every stored type (or only
/// `only`), returning how many resources of each type were written.
pub fn export_ndjson(
    store: &Store,
    dir: &Path,
    only: Option<&str>,
) -> Result<BTreeMap<String, u64>, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut counts = BTreeMap::new();
    let mut current: Option<(String, PathBuf, BufWriter<File>)> = None;
    let mut after: Option<ResourceKey> = None;
    loop {
        let page = store.resources_page(only, after.as_ref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for stored in page {
            let ty = &stored.key.resource_type;
            if current.as_ref().is_none_or(|(t, _, _)| t != ty) {
                if let Some((_, path, mut out)) = current.take() {
                    out.flush()
                        .map_err(|source| Error::Write { path, source })?;
                }
                let path = dir.join(format!("{ty}.ndjson"));
                let file = File::create(&path).map_err(|source| Error::Write {
                    path: path.clone(),
                    source,
                })?;
                current = Some((ty.clone(), path, BufWriter::with_capacity(1 << 16, file)));
            }
            let mut value: Value =
                serde_json::from_str(&stored.content).map_err(|_| Error::Corrupt {
                    resource_type: ty.clone(),
                    id: stored.key.id.clone(),
                })?;
            let object = value.as_object_mut().ok_or_else(|| Error::Corrupt {
                resource_type: ty.clone(),
                id: stored.key.id.clone(),
            })?;
            let meta = object
                .entry("meta")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(meta) = meta.as_object_mut() {
                let version = stored.version_id.to_string();
                let extensions = meta
                    .entry("extension")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(list) = extensions.as_array_mut() {
                    list.retain(|e| {
                        let url = e.get("url").and_then(Value::as_str);
                        url != Some(NODE_VERSION) && url != Some(NODE_STORED_AT)
                    });
                    list.push(serde_json::json!({"url": NODE_VERSION, "valueString": version}));
                    list.push(serde_json::json!({"url": NODE_STORED_AT, "valueInstant": stored.last_updated}));
                }
            }
            let (_, path, out) = current.as_mut().expect("a file is open");
            serde_json::to_writer(&mut *out, &value)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|source| Error::Write {
                    path: path.clone(),
                    source,
                })?;
            *counts.entry(ty.clone()).or_insert(0) += 1;
        }
    }
    if let Some((_, path, mut out)) = current {
        out.flush()
            .map_err(|source| Error::Write { path, source })?;
    }
    Ok(counts)
}

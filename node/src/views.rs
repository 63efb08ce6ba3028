//! Variables defined by SQL on FHIR ViewDefinitions: evaluated over the
//! stored resources once per data generation and materialised as
//! (patient, value) rows in `view_values`, which the engine's SQL reads like
//! any other index. The JSON scan happens here, off the per-query path:
//! later queries with the same view and unchanged data reuse the rows.

use crate::classify::{Classify, Code};
use ghx_study::query::Variable;
use serde_json::Value;

use crate::store::{self, ResourceKey, Store, ViewRow};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("view: {0}")]
    View(#[from] ghx_sof::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::View(_) => Code::InvalidArgument,
            Error::Store(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::View(_) => "view",
            Error::Store(_) => "internal",
        }
    }
}

/// Resources read per page while materialising.
const PAGE: i64 = 2000;

/// Makes sure a view variable's rows reflect the current data; does
/// nothing for other variables. Returns the number of rows built, if it
/// built them.
pub fn ensure(store: &Store, variable: &Variable) -> Result<Option<usize>, Error> {
    let (Variable::View { view, column, .. }, Some(sha)) = (variable, variable.view_digest())
    else {
        return Ok(None);
    };
    let generation = store.data_generation()?;
    if store.view_generation(&sha)? == Some(generation) {
        return Ok(None);
    }
    let parsed = ghx_sof::View::parse(view)?;
    let mut rows = Vec::new();
    let mut after: Option<ResourceKey> = None;
    loop {
        let page = store.resources_page(Some(parsed.resource()), after.as_ref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for stored in &page {
            let Ok(resource) = serde_json::from_str::<Value>(&stored.content) else {
                continue;
            };
            // Contained resources are not indexed, so their categories are
            // unknown here: a resource carrying any is not read.
            if resource
                .get("contained")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty())
            {
                continue;
            }
            for row in parsed.rows(&resource)? {
                let patient = row.get("patient").and_then(Value::as_str);
                let value = row.get(column.as_str()).and_then(Value::as_f64);
                // A row counts for the patient the resource is about, never
                // for one the view's `patient` column names otherwise: that
                // patient's consent is what the query checks.
                if let (Some(patient), Some(value)) = (patient, value)
                    && value.is_finite()
                    && stored.patient_id.as_deref() == Some(patient)
                {
                    rows.push(ViewRow {
                        patient_id: patient.to_owned(),
                        value,
                        resource_id: stored.key.id.clone(),
                    });
                }
            }
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    store.replace_view_values(&sha, generation, &rows)?;
    tracing::info!(view = %&sha[..12], rows = rows.len(), generation, "view materialised");
    Ok(Some(rows.len()))
}

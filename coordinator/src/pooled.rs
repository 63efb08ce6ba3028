//! A pooled query at the coordinator: every registered node opens a
//! session for it under the query's capability (its vector computed and
//! noised there), the members' signed keys are relayed, each node answers
//! its vector masked, and the coordinator sums them, so it reads only the
//! federation's table, never a hospital's. That table is released through
//! the disclosure control nodes apply to their own
//! ([`ghx_disclosure::release`]), on the noisy totals; quantiles are read
//! off the whole noisy histogram (an exact table's off its released bins,
//! marked partial where a bin was withheld). Every node must take part: a sum over
//! fewer would be a sum over another set (`node::participants`).

use ghx_disclosure::pooled::{self, Layout};
use ghx_disclosure::{Candidate, Raw, RawCell};
use ghx_proto::v1 as pb;
use ghx_secagg::{MaskedInput, RoundParams};
use ghx_study::manifest::{NamedQuery, StudyManifest};
use ghx_study::query::{Analysis, QuerySpec};
use ghx_study::result::{CellValue, NodeFailure, NoiseStatement, TotalCell, histogram_quantiles};
use tracing::Instrument;

use crate::dispatch;
use crate::fanout::{NodeRegistry, RegisteredNode, describe, no_answer};
use crate::studies::{PooledRelease, StudyResult};

/// What a pooled run needs from the study and its capability.
pub(crate) struct Request<'a> {
    pub(crate) study_id: &'a str,
    pub(crate) named: &'a NamedQuery,
    pub(crate) manifest: &'a StudyManifest,
    pub(crate) manifest_json: &'a [u8],
    pub(crate) query_json: &'a [u8],
    pub(crate) capability: &'a str,
    pub(crate) sent: dispatch::Sent<'a>,
}

/// Runs `request` as a pooled query over `nodes`; the audit entries of
/// both steps are written before the table is read.
pub(crate) async fn run(
    registry: &NodeRegistry,
    audit: &ghx_db::audit::AuditLog,
    nodes: Vec<RegisteredNode>,
    request: Request<'_>,
) -> Result<StudyResult, ghx_db::audit::Error> {
    let spec = &request.named.query;
    let layout = Layout::of(spec);
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let session = format!(
        "{}/{}/pooled/{}",
        request.study_id, request.named.name, request.sent.capability_id
    );
    let k = pooled::cell_size(request.manifest, &ids);
    let mut result = StudyResult {
        query: request.named.name.clone(),
        dimensions: spec.key_names(),
        per_node: Vec::new(),
        failures: Vec::new(),
        total: Vec::new(),
        quantiles: Vec::new(),
        rate_per: match &spec.analysis {
            Analysis::Rate { per, .. } => *per,
            _ => 0,
        },
        pooled: Some(PooledRelease {
            contributors: Vec::new(),
            notes: Vec::new(),
            noise: None,
            min_cell_size: k,
            linkage: None,
        }),
    };
    let params = match u8::try_from(ids.len())
        .map_err(|_| "more than 255 nodes".to_owned())
        .and_then(|n| {
            RoundParams::new(session.clone(), ids.clone(), n, layout.dim())
                .map_err(|e| e.to_string())
        }) {
        Ok(p) => p,
        Err(reason) => {
            note(&mut result, format!("no pooled table: {reason}"));
            return Ok(result);
        }
    };
    let deadline = registry.deadline();
    let opened =
        futures::future::join_all(nodes.iter().map(|node| {
            let message = pb::PooledOpenRequest {
                capability: request.capability.to_owned(),
                query: Some(pb::QuerySpec {
                    json: request.query_json.to_vec(),
                }),
                manifest_json: request.manifest_json.to_vec(),
                params: Some(ghx_proto::round::params_to_wire(&params)),
            };
            call(
                node,
                deadline,
                move |mut client, r| async move {
                    client.pooled_open(r).await.map(|a| a.into_inner().keys)
                },
                message,
            )
        }))
        .await;
    let mut keys = Vec::new();
    let mut failures = Vec::new();
    for (node, outcome) in nodes.iter().zip(opened) {
        match outcome {
            Ok(Some(k)) => keys.push((node.id.clone(), k)),
            Ok(None) => failures.push(failure(node, "answered without keys".to_owned())),
            Err(reason) => failures.push(failure(node, reason)),
        }
    }
    dispatch::record(
        audit,
        &dispatch::Sent {
            action: ghx_audit::action::POOLED,
            ..request.sent.clone()
        },
        keys.iter()
            .map(|(id, _)| (id.clone(), dispatch::Answer::default())),
        &failures,
    )?;
    if !failures.is_empty() {
        result.failures = failures;
        note(
            &mut result,
            "no pooled table: every registered hospital must take part, since a sum over fewer is a sum over another set of hospitals".to_owned(),
        );
        return Ok(result);
    }
    let relayed: Vec<pb::SessionKeys> = keys.into_iter().map(|(_, k)| k).collect();
    let inputs =
        futures::future::join_all(
            nodes.iter().map(|node| {
                let message = pb::PooledInputRequest {
                    session: session.clone(),
                    keys: relayed.clone(),
                };
                call(
                    node,
                    deadline,
                    move |mut client, r| async move {
                        client.pooled_input(r).await.map(|a| a.into_inner())
                    },
                    message,
                )
            }),
        )
        .await;
    let mut masked = Vec::new();
    for (node, outcome) in nodes.iter().zip(inputs) {
        match outcome {
            Ok(answer) if answer.node == node.id => masked.push(MaskedInput {
                node: answer.node,
                values: answer.values,
            }),
            Ok(answer) => failures.push(failure(node, format!("answered as `{}`", answer.node))),
            Err(reason) => failures.push(failure(node, reason)),
        }
    }
    dispatch::record(
        audit,
        &dispatch::Sent {
            action: ghx_audit::action::POOLED_INPUT,
            ..request.sent.clone()
        },
        masked
            .iter()
            .map(|m| (m.node.clone(), dispatch::Answer::of_masked(&m.values))),
        &failures,
    )?;
    if !failures.is_empty() {
        result.failures = failures;
        note(&mut result, "no pooled table: a hospital's masked vector is missing, and the others' stay masked by its pair secrets".to_owned());
        return Ok(result);
    }
    let sum = match ghx_secagg::session::sum(&session, &params.participants, params.dim, &masked) {
        Ok(sum) => sum,
        Err(e) => {
            note(&mut result, format!("no pooled table: {e}"));
            return Ok(result);
        }
    };
    let calibration = spec
        .noise
        .as_ref()
        .map(|noise| pooled::calibrate(noise, &layout, ids.len()));
    let sum = pooled::from_ring(&sum);
    let decoded = if layout.linked() {
        match &calibration {
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(c)) => layout.decode_linked(&sum, Some(c)),
            None => layout.decode_linked(&sum, None),
        }
        .map(|(cells, read)| (cells, Some(read)))
    } else {
        layout.decode(&sum).map(|cells| (cells, None))
    };
    let (candidates, linkage) = match decoded {
        Ok(c) => c,
        Err(e) => {
            note(&mut result, format!("no pooled table: {e}"));
            return Ok(result);
        }
    };
    release(&mut result, spec, &layout, candidates, k);
    // Quantiles from withheld bins only when noised (post-processing); an
    // exact table's come from released bins and say "partial".
    let pooled = result.pooled.as_mut().expect("set above");
    pooled.contributors = ids;
    if let Some(read) = linkage {
        // Only what was released says anything of its error: a withheld
        // cell's error would tell its size.
        let released: std::collections::HashSet<&[String]> = result
            .total
            .iter()
            .filter(|c| c.withheld.is_none())
            .map(|c| c.key.as_slice())
            .collect();
        let error = layout
            .keys
            .iter()
            .zip(&read.errors)
            .filter(|(key, _)| released.contains(key.as_slice()))
            .map(|(_, e)| *e)
            .fold(0.0, f64::max);
        // An exact count below the cell size is withheld like any cell.
        let withheld = spec.noise.is_none() && read.unlinked < i64::from(k);
        let unlinked = if withheld { 0 } else { read.unlinked.max(0) };
        pooled.notes.push(format!(
            "each patient once: the union of the hospitals' bitmaps of linkage tokens ({} slots per count, keyed for this query alone), by linear counting; standard error at most {error:.1} patients per released cell, noise aside; patients without a resident registration number, counted at each hospital that has them: {}",
            read.slots,
            if withheld {
                format!("fewer than {k}")
            } else if spec.noise.is_some() {
                format!("about {unlinked} (noisy)")
            } else {
                unlinked.to_string()
            }
        ));
        pooled.linkage = Some(crate::studies::PooledLinkage {
            slots: read.slots as u32,
            unlinked,
            standard_error: error,
            unlinked_withheld: withheld,
        });
    }
    match calibration {
        Some(Ok(c)) => {
            let noise = spec.noise.expect("calibrated from it");
            pooled.notes.push(format!("noise: {}", c.describe()));
            pooled.noise = Some(NoiseStatement {
                mechanism: "discrete_gaussian".to_owned(),
                epsilon: noise.epsilon,
                delta: noise.delta,
                detail: c.describe(),
            });
        }
        Some(Err(e)) => pooled.notes.push(format!("noise: {e}")),
        None => pooled.notes.push(
            "noise: none (every hospital allows pooled tables without noise); the coordinator saw the exact totals before suppressing them".to_owned(),
        ),
    }
    if let Some(n) = layout.resolution_note() {
        pooled.notes.push(n);
    }
    Ok(result)
}

fn note(result: &mut StudyResult, text: String) {
    if let Some(p) = result.pooled.as_mut() {
        p.notes.push(text);
    }
}

fn failure(node: &RegisteredNode, reason: String) -> NodeFailure {
    tracing::warn!(node = %node.id, reason = %reason, "node did not take part in a pooled query");
    NodeFailure {
        node_id: node.id.clone(),
        reason,
    }
}

/// One call to `node`, bounded by the deadline; the failure in words.
async fn call<M, T, F, Fut>(
    node: &RegisteredNode,
    deadline: std::time::Duration,
    send: F,
    message: M,
) -> Result<T, String>
where
    F: FnOnce(crate::fanout::NodeClient, tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    let span = tracing::info_span!("node_call", node = %node.id);
    match tokio::time::timeout(deadline, send(node.query_client(), request))
        .instrument(span)
        .await
    {
        Err(_) => Err(no_answer(deadline)),
        Ok(Err(status)) => Err(describe(&status)),
        Ok(Ok(t)) => Ok(t),
    }
}

/// The federation's table as disclosure control releases it, and its
/// quantiles.
fn release(
    result: &mut StudyResult,
    spec: &QuerySpec,
    layout: &Layout,
    candidates: Vec<Candidate>,
    k: u32,
) {
    let raw: Vec<RawCell> = layout
        .keys
        .iter()
        .map(|key| RawCell {
            key: key.clone(),
            value: Raw::Count(0),
        })
        .collect();
    let noisy_histogram: Vec<TotalCell> = candidates
        .iter()
        .zip(&layout.keys)
        .map(|(c, key)| TotalCell {
            key: key.clone(),
            count: match c {
                Candidate::Count(n) => *n,
                _ => 0,
            },
            suppressed_at: Vec::new(),
            summary: None,
            rate: None,
            withheld: None,
        })
        .collect();
    let released = ghx_disclosure::release("pooled", spec, raw, candidates, k);
    result.total = released
        .cells
        .into_iter()
        .map(|cell| {
            let mut total = TotalCell {
                key: cell.key,
                count: 0,
                suppressed_at: Vec::new(),
                summary: None,
                rate: None,
                withheld: None,
            };
            match cell.value {
                CellValue::Count(n) => total.count = n,
                CellValue::Summary(m) => {
                    total.count = m.n;
                    total.summary = Some(m);
                }
                CellValue::Rate(r) => {
                    total.count = r.population;
                    total.rate = Some(r);
                }
                CellValue::Suppressed { reason } => total.withheld = Some(reason),
            }
            total
        })
        .collect();
    if let Analysis::Histogram {
        bins, quantiles, ..
    } = &spec.analysis
    {
        result.quantiles = if spec.noise.is_some() {
            // Every bin's noisy count, withheld or not: a function of
            // noised numbers only (post-processing).
            histogram_quantiles(&noisy_histogram, bins, quantiles)
        } else {
            // Exact: only what was released, marked partial where a bin
            // was withheld.
            let marked: Vec<TotalCell> = result
                .total
                .iter()
                .cloned()
                .map(|mut t| {
                    if t.withheld.is_some() {
                        t.suppressed_at.push("pooled".to_owned());
                    }
                    t
                })
                .collect();
            histogram_quantiles(&marked, bins, quantiles)
        };
    }
    if let Some(p) = result.pooled.as_mut() {
        p.notes.extend(released.notes);
    }
}

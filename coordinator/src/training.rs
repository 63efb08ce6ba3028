//! Federated training runs: the coordinator drives rounds of secure
//! aggregation across the nodes and keeps the run's state.
//!
//! A run is a moments round (pooled feature means and standard deviations
//! for standardisation), then the training's rounds (each node trains from
//! the global model; the coordinator receives only the sum of the
//! sample-weighted local models and averages it), then an evaluation round
//! of the final model. Every round is one [`secure_round`]: the coordinator
//! relays keys and encrypted shares and learns only the sum of the
//! contributions of the nodes that completed it. A round needs the
//! training's quorum of nodes at every step; a node that is down, refuses
//! or misses a step's deadline is left out of that round and named, and the
//! round completes without it if the quorum holds. A round that fails is
//! retried; after [`ATTEMPTS`] failures the run fails with the reason.
//!
//! The run's state ([`TrainingRecord`]: aggregates only) is saved after
//! every completed round, so a coordinator that restarts resumes a running
//! run from its last completed round.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::Instrument;

use ghx_learn::federated::{self, EvaluationSums, Metrics, Phase};
use ghx_learn::{Logistic, Standardiser};
use ghx_proto::round;
use ghx_proto::v1 as pb;
use ghx_secagg::{Aggregator, RoundParams};
use ghx_study::capability::{self, Signer};
use ghx_study::manifest::StudyManifest;
use ghx_study::result::NodeFailure;
use ghx_study::training::{MODEL_VERSION, ModelDocument, TrainingSpec};
use serde::{Deserialize, Serialize};

use crate::dispatch;
use crate::fanout::{NodeRegistry, RegisteredNode, describe, no_answer};

/// Tries per round before a run fails.
pub const ATTEMPTS: u32 = 3;

/// Why a round or a run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("round {round}: {step} had {have} nodes, the training's quorum is {need}{}", failures_text(.failures))]
    Quorum {
        round: String,
        step: &'static str,
        have: usize,
        need: usize,
        failures: Vec<NodeFailure>,
    },
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] ghx_secagg::Error),
    #[error("combining the round: {0}")]
    Learn(#[from] ghx_learn::Error),
    #[error("cannot issue a capability: {0}")]
    Capability(#[from] capability::Error),
    #[error("no nodes are registered")]
    NoNodes,
    #[error("the audit log could not record the round: {0}")]
    Audit(#[from] ghx_db::audit::Error),
}

fn failures_text(failures: &[NodeFailure]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let named: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.node_id, f.reason))
        .collect();
    format!(" ({})", named.join("; "))
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
        }
    }
}

/// One completed training round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 1-based.
    pub round: u32,
    pub contributors: Vec<String>,
    /// Nodes left out of this round, and why.
    pub failures: Vec<NodeFailure>,
    pub train_rows: u64,
    /// Mean training log loss of the model the round started from.
    pub train_loss: f64,
    /// The model the round started from, on the pooled held-out rows.
    pub holdout: Metrics,
    /// Wall time of the round at the coordinator.
    pub seconds: f64,
    /// The slowest node's local computation.
    pub local_seconds: f64,
    /// Wall time of each secure-aggregation step at the coordinator
    /// (advertise incl. local computation, share keys, masked input,
    /// unmask and sum), ms.
    #[serde(default)]
    pub steps_ms: [f64; 4],
    /// The global model after the round (standardised features).
    pub weights: Vec<f64>,
    pub bias: f64,
}

/// A model's evaluation, pooled and per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub pooled: Metrics,
    /// Each node's own metrics on its held-out rows (nodes release these
    /// only when enough rows are held out).
    pub per_node: BTreeMap<String, Metrics>,
    pub contributors: Vec<String>,
    pub failures: Vec<NodeFailure>,
}

/// A run's whole state: aggregates only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub run_id: String,
    pub study_id: String,
    pub training: String,
    pub status: RunStatus,
    pub detail: String,
    pub rounds_total: u32,
    pub started_at: String,
    /// The global model so far (after the moments round: the initial one).
    pub model: Option<ModelDocument>,
    /// Feature rows the moments round pooled.
    pub moments_rows: u64,
    pub rounds: Vec<RoundRecord>,
    pub evaluation: Option<Evaluation>,
    /// How many times a coordinator restart resumed this run.
    pub resumed: u32,
}

impl TrainingRecord {
    pub fn new(run_id: &str, study_id: &str, spec: &TrainingSpec, started_at: &str) -> Self {
        TrainingRecord {
            run_id: run_id.to_owned(),
            study_id: study_id.to_owned(),
            training: spec.name.clone(),
            status: RunStatus::Running,
            detail: String::new(),
            rounds_total: spec.rounds,
            started_at: started_at.to_owned(),
            model: None,
            moments_rows: 0,
            rounds: Vec::new(),
            evaluation: None,
            resumed: 0,
        }
    }
}

/// What the coordinator needs to run rounds.
pub struct Federation<'a> {
    pub registry: &'a NodeRegistry,
    pub signer: &'a Signer,
    pub capability_valid_for: Duration,
    pub study_id: &'a str,
    pub manifest: &'a StudyManifest,
    pub manifest_json: &'a [u8],
    pub spec: &'a TrainingSpec,
    /// Where each request sent to a node is recorded.
    pub audit: &'a ghx_db::audit::AuditLog,
}

/// A round's outcome at the coordinator.
pub struct RoundSum {
    pub sum: Vec<f64>,
    pub contributors: Vec<String>,
    pub failures: Vec<NodeFailure>,
    pub node_metrics: BTreeMap<String, Metrics>,
    pub seconds: f64,
    pub local_seconds: f64,
    /// Wall time of each of the four steps at the coordinator, ms.
    pub steps_ms: [f64; 4],
}

/// Runs one step on `nodes` concurrently, each bounded by `deadline`;
/// returns the answers and the failures.
async fn step<T, F, Fut>(
    nodes: &[RegisteredNode],
    deadline: Duration,
    call: F,
) -> (Vec<(String, T)>, Vec<NodeFailure>)
where
    F: Fn(RegisteredNode) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let calls = nodes.iter().map(|node| {
        let fut = call(node.clone());
        let id = node.id.clone();
        let span = tracing::info_span!("node_call", node = %id);
        async move {
            match tokio::time::timeout(deadline, fut).await {
                Ok(Ok(answer)) => Ok((id, answer)),
                Ok(Err(reason)) => Err(NodeFailure {
                    node_id: id,
                    reason,
                }),
                Err(_) => Err(NodeFailure {
                    node_id: id,
                    reason: no_answer(deadline),
                }),
            }
        }
        .instrument(span)
    });
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for outcome in futures::future::join_all(calls).await {
        match outcome {
            Ok(a) => answers.push(a),
            Err(f) => {
                tracing::warn!(node = %f.node_id, reason = %f.reason, "node left out of round step");
                failures.push(f);
            }
        }
    }
    (answers, failures)
}

fn keep(nodes: &[RegisteredNode], ids: &[String]) -> Vec<RegisteredNode> {
    nodes
        .iter()
        .filter(|n| ids.contains(&n.id))
        .cloned()
        .collect()
}

/// One round of secure aggregation over every registered node: the
/// coordinator learns only the sum of the completing nodes' contributions.
pub async fn secure_round(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    model: Option<&ModelDocument>,
) -> Result<RoundSum, Error> {
    let started = Instant::now();
    let nodes = fed.registry.list();
    if nodes.is_empty() {
        return Err(Error::NoNodes);
    }
    let spec = fed.spec;
    let dim = phase.len(spec.features.len());
    let params = RoundParams::new(
        round_id,
        nodes.iter().map(|n| n.id.clone()),
        spec.quorum
            .min(u8::try_from(nodes.len()).unwrap_or(u8::MAX)),
        dim,
    )?;
    let need = usize::from(spec.quorum);
    let quorum_error = |step: &'static str, have: usize, failures: &[NodeFailure]| {
        let mut failures = failures.to_vec();
        failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Error::Quorum {
            round: round_id.to_owned(),
            step,
            have,
            need,
            failures,
        }
    };
    let training_json = spec.canonical_json();
    let claims = capability::claims_for(
        fed.manifest,
        fed.study_id,
        params.participants.clone(),
        &training_json,
        time::Duration::try_from(fed.capability_valid_for).unwrap_or(time::Duration::minutes(5)),
    );
    let token = fed.signer.sign(&claims)?;
    let model_json = model
        .map(|m| serde_json::to_vec(m).expect("a model serializes"))
        .unwrap_or_default();
    let deadline = Duration::from_secs(u64::from(spec.round_deadline_seconds));
    let wire_params = round::params_to_wire(&params);

    // Step 1: admission, local computation, keys.
    let (advertised, mut failures) = step(&nodes, deadline, |node| {
        let request = pb::RoundAdvertiseRequest {
            capability: token.clone(),
            manifest_json: fed.manifest_json.to_vec(),
            training_json: training_json.clone(),
            params: Some(wire_params.clone()),
            phase: phase.name().to_owned(),
            model_json: model_json.clone(),
        };
        async move {
            let response = node
                .round_client()
                .round_advertise(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            let keys = round::advertise_from_wire(response.keys.unwrap_or_default())?;
            if keys.node != node.id {
                return Err(format!("advertised keys as `{}`", keys.node));
            }
            let metrics = if response.node_metrics_json.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_slice::<Metrics>(&response.node_metrics_json)
                        .map_err(|e| format!("unreadable metrics: {e}"))?,
                )
            };
            Ok((keys, response.local_micros, metrics))
        }
    })
    .await;
    // What steps 1 and 3 send each node, for the audit log.
    let sent = dispatch::Sent {
        action: "",
        study_id: fed.study_id,
        capability_id: &claims.jti,
        request_sha256: ghx_audit::digest(&training_json),
        requester: &claims.requester,
        requester_org: &claims.org,
        purpose: &claims.purpose,
        epsilon: 0.0,
    };
    let action = ghx_audit::action::round(phase.name());
    dispatch::record(
        fed.audit,
        &dispatch::Sent {
            action: &action,
            ..sent.clone()
        },
        advertised
            .iter()
            .map(|(id, _)| (id.clone(), dispatch::Answer::default())),
        &failures,
    )?;
    if advertised.len() < need {
        return Err(quorum_error(
            "advertising keys",
            advertised.len(),
            &failures,
        ));
    }
    let mut aggregator = Aggregator::new(params.clone());
    let mut local_seconds: f64 = 0.0;
    let mut node_metrics = BTreeMap::new();
    for (id, (keys, micros, metrics)) in advertised {
        aggregator.advertise(keys)?;
        local_seconds = local_seconds.max(micros as f64 / 1e6);
        if let Some(m) = metrics {
            node_metrics.insert(id, m);
        }
    }
    let keys = aggregator.advertisements()?;
    let ids: Vec<String> = keys.iter().map(|a| a.node.clone()).collect();
    let wire_keys: Vec<pb::AdvertisedKeys> = keys.iter().map(round::advertise_to_wire).collect();

    let mut steps_ms = [0.0; 4];
    steps_ms[0] = started.elapsed().as_secs_f64() * 1000.0;
    // Step 2: encrypted shares, relayed.
    let (shared, more) = step(&keep(&nodes, &ids), deadline, |node| {
        let request = pb::RoundShareKeysRequest {
            round: round_id.to_owned(),
            advertised: wire_keys.clone(),
        };
        async move {
            Ok(node
                .round_client()
                .round_share_keys(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner()
                .shares)
        }
    })
    .await;
    failures.extend(more);
    for (id, shares) in shared {
        let shares = shares.into_iter().map(round::share_from_wire).collect();
        if let Err(e) = aggregator.submit_shares(&id, shares) {
            failures.push(NodeFailure {
                node_id: id,
                reason: e.to_string(),
            });
        }
    }

    steps_ms[1] = started.elapsed().as_secs_f64() * 1000.0 - steps_ms[0];
    // Step 3: masked contributions.
    let mut holders = Vec::new();
    let mut for_node = BTreeMap::new();
    for id in &ids {
        if let Ok(shares) = aggregator.shares_for(id) {
            holders.push(id.clone());
            let wire: Vec<pb::EncryptedShare> =
                shares.into_iter().map(round::share_to_wire).collect();
            for_node.insert(id.clone(), wire);
        }
    }
    if holders.len() < need {
        return Err(quorum_error("sharing keys", holders.len(), &failures));
    }
    let (masked, more) = step(&keep(&nodes, &holders), deadline, |node| {
        let request = pb::RoundMaskedInputRequest {
            round: round_id.to_owned(),
            shares: for_node.get(&node.id).cloned().unwrap_or_default(),
        };
        async move {
            let m = node
                .round_client()
                .round_masked_input(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            if m.node != node.id {
                return Err(format!("sent a masked input as `{}`", m.node));
            }
            Ok(round::masked_from_wire(m))
        }
    })
    .await;
    dispatch::record(
        fed.audit,
        &dispatch::Sent {
            action: ghx_audit::action::MASKED_INPUT,
            ..sent
        },
        masked
            .iter()
            .map(|(id, input)| (id.clone(), dispatch::Answer::of_masked(&input.values))),
        &more,
    )?;
    failures.extend(more);
    for (id, input) in masked {
        if let Err(e) = aggregator.submit_masked(input) {
            failures.push(NodeFailure {
                node_id: id,
                reason: e.to_string(),
            });
        }
    }
    let survivors = match aggregator.survivors() {
        Ok(s) => s,
        Err(_) => return Err(quorum_error("masked input", 0, &failures)),
    };

    steps_ms[2] = started.elapsed().as_secs_f64() * 1000.0 - steps_ms[0] - steps_ms[1];
    // Step 4: unmasking.
    let (unmasked, more) = step(&keep(&nodes, &survivors), deadline, |node| {
        let request = pb::RoundUnmaskRequest {
            round: round_id.to_owned(),
            survivors: survivors.clone(),
        };
        async move {
            let u = node
                .round_client()
                .round_unmask(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            if u.node != node.id {
                return Err(format!("unmasked as `{}`", u.node));
            }
            Ok(round::unmasking_from_wire(u))
        }
    })
    .await;
    failures.extend(more);
    let unmaskings: Vec<_> = unmasked.into_iter().map(|(_, u)| u).collect();
    let aggregate = aggregator.finish(&unmaskings)?;
    failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    node_metrics.retain(|id, _| aggregate.contributors.contains(id));
    Ok(RoundSum {
        sum: ghx_secagg::decode(&aggregate.sum),
        contributors: aggregate.contributors,
        failures,
        node_metrics,
        seconds: started.elapsed().as_secs_f64(),
        local_seconds,
        steps_ms: {
            steps_ms[3] =
                started.elapsed().as_secs_f64() * 1000.0 - steps_ms[0] - steps_ms[1] - steps_ms[2];
            steps_ms
        },
    })
}

/// Runs a round, retrying a failed one.
async fn with_retries(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    model: Option<&ModelDocument>,
) -> Result<RoundSum, Error> {
    let mut attempt = 1;
    loop {
        let id = if attempt == 1 {
            round_id.to_owned()
        } else {
            format!("{round_id}/attempt-{attempt}")
        };
        let span = tracing::info_span!("training_round", round = %id, phase = phase.name());
        let started = Instant::now();
        let outcome = secure_round(fed, &id, phase, model).instrument(span).await;
        ghx_telemetry::metrics::training_round(
            phase.name(),
            if outcome.is_ok() {
                "completed"
            } else {
                "failed"
            },
            started.elapsed().as_secs_f64(),
        );
        match outcome {
            Ok(sum) => return Ok(sum),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(round = %id, error = %e, "round failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The model document of a logistic model under a standardisation.
fn document(spec: &TrainingSpec, standardiser: &Standardiser, model: &Logistic) -> ModelDocument {
    ModelDocument {
        version: MODEL_VERSION.to_owned(),
        model: spec.model,
        features: spec.features.clone(),
        label: spec.label.clone(),
        mean: standardiser.mean.clone(),
        sd: standardiser.sd.clone(),
        weights: model.weights.clone(),
        bias: model.bias,
    }
}

/// Advances a run by one step (a moments, training or evaluation round)
/// and returns the new record; `Ok(None)` when the run is finished.
pub async fn advance(
    fed: &Federation<'_>,
    record: &TrainingRecord,
) -> Result<Option<TrainingRecord>, Error> {
    if record.status != RunStatus::Running {
        return Ok(None);
    }
    let spec = fed.spec;
    let mut next = record.clone();
    let prefix = format!("{}/{}/{}", record.study_id, spec.name, record.run_id);
    match &record.model {
        None => {
            let round =
                with_retries(fed, &format!("{prefix}/moments"), Phase::Moments, None).await?;
            let standardiser = Standardiser::from_sums(&round.sum)?;
            next.moments_rows = round.sum[0].round().max(0.0) as u64;
            next.model = Some(document(
                spec,
                &standardiser,
                &Logistic::zeros(spec.features.len()),
            ));
        }
        Some(model) if (record.rounds.len() as u32) < record.rounds_total => {
            let number = record.rounds.len() as u32 + 1;
            let round = with_retries(
                fed,
                &format!("{prefix}/round-{number}"),
                Phase::Train,
                Some(model),
            )
            .await?;
            let totals = match &spec.privacy {
                // Noised rounds sum clipped gradients: one step from the
                // global model.
                Some(_) => federated::read_private_training_sum(
                    &round.sum,
                    &Logistic {
                        weights: model.weights.clone(),
                        bias: model.bias,
                    },
                    spec.optimiser.learning_rate,
                    spec.optimiser.l2,
                )?,
                None => federated::read_training_sum(&round.sum, spec.features.len())?,
            };
            let standardiser = Standardiser {
                mean: model.mean.clone(),
                sd: model.sd.clone(),
            };
            next.model = Some(document(spec, &standardiser, &totals.model));
            let mut holdout = totals.evaluation.metrics();
            holdout.calibration.clear();
            next.rounds.push(RoundRecord {
                round: number,
                contributors: round.contributors,
                failures: round.failures,
                train_rows: totals.train_rows.round().max(0.0) as u64,
                train_loss: totals.train_loss,
                holdout,
                seconds: round.seconds,
                local_seconds: round.local_seconds,
                steps_ms: round.steps_ms,
                weights: totals.model.weights.clone(),
                bias: totals.model.bias,
            });
        }
        Some(model) => {
            let round = with_retries(
                fed,
                &format!("{prefix}/evaluation"),
                Phase::Evaluate,
                Some(model),
            )
            .await?;
            next.evaluation = Some(evaluation(round)?);
            next.status = RunStatus::Completed;
        }
    }
    Ok(Some(next))
}

/// Evaluates a model at every node (external validation).
pub async fn validate(fed: &Federation<'_>, model: &ModelDocument) -> Result<Evaluation, Error> {
    // Unique per call, so two validations never share a round at a node.
    let round_id = format!(
        "{}/{}/validation-{}",
        fed.study_id,
        fed.spec.name,
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    evaluation(secure_round(fed, &round_id, Phase::Evaluate, Some(model)).await?)
}

fn evaluation(round: RoundSum) -> Result<Evaluation, Error> {
    Ok(Evaluation {
        pooled: EvaluationSums::from_vec(&round.sum)?.metrics(),
        per_node: round.node_metrics,
        contributors: round.contributors,
        failures: round.failures,
    })
}

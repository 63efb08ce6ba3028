//! Federated training runs: the coordinator drives rounds of secure
//! aggregation across the nodes and keeps the run's state.
//!
//! A run is one secure-aggregation session ([`crate::session`]): its round
//! 0 is the moments (pooled feature means and standard deviations for
//! standardisation), its rounds 1 to R the training's (each node trains
//! from the model its own lineage reached; the coordinator receives only
//! the sum of the sample-weighted local models and averages it); then an
//! evaluation round of the final model, noised at each node, when the
//! training declares `validation.epsilon`. The coordinator learns only
//! sums.
//!
//! The evaluation rounds (a run's and external validations) are one-off
//! secure-aggregation rounds: the coordinator relays keys and encrypted
//! shares and learns only the sum of the contributions of the nodes that
//! completed it. A round's first two steps (keys, [`agree_keys`]) need no
//! model, so they run while the step before computes; its last two
//! ([`complete_round`]) carry the model and return the sum. Such a round
//! needs the training's quorum of nodes at every step and is unmasked
//! only with every node it was keyed with (nodes refuse less,
//! `ghx_node::participants`); a node that is down, refuses or misses a
//! step's deadline is named, and the round is redone among the nodes left
//! ([`Error::Dropped`]), which the nodes accept only if that set is the
//! study's (with three hospitals and the default minimum, the run stops).
//!
//! The session's rounds take one message per node per round, on the
//! node's stream for the session, the critical path of a round being the
//! slowest node's local step and one trip. A member missing from a session
//! round is named, and the round is redone in a new session among the
//! members that answered (again, if the nodes accept that set); a session missing registered nodes invites them
//! again every [`REJOIN_EVERY`] rounds. A step that fails is retried; after [`ATTEMPTS`] failures the
//! run fails with the reason. Nodes sign the keys they advertise and check
//! each other's signatures, so the coordinator can only relay them.
//!
//! The run's state ([`TrainingRecord`]: aggregates only) is saved after
//! every completed round (each round its own row, so a save does not grow
//! with the rounds before it), so a coordinator that restarts resumes a
//! running run from its last completed round.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::Instrument;

use ghx_learn::federated::{EvaluationSums, Metrics, Phase};
use ghx_proto::round;
use ghx_proto::v1 as pb;
use ghx_secagg::{Aggregator, RoundParams};
use ghx_study::capability::{self, Signer};
use ghx_study::lineage;
use ghx_study::manifest::StudyManifest;
use ghx_study::result::NodeFailure;
use ghx_study::training::{ModelDocument, TrainingSpec};
use serde::{Deserialize, Serialize};

use crate::dispatch;
use crate::fanout::{NodeRegistry, RegisteredNode, describe, no_answer};
use crate::session::{self, Session};

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
    /// Nodes unmask a one-off round only for every node it was keyed
    /// with (a sum over fewer is a sum over another set): a round some
    /// node dropped out of is redone among those left.
    #[error(
        "round {round}: {step} had [{}] of the nodes it was keyed with; it is redone among them{}",
        left.join(", "),
        failures_text(.failures)
    )]
    Dropped {
        round: String,
        step: &'static str,
        left: Vec<String>,
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
    #[error(transparent)]
    Lineage(#[from] ghx_study::lineage::Error),
    /// Members computed a round from different heads of the run's lineage:
    /// no one round's evidence would carry all of them on.
    #[error(
        "session {session} round {round}: the members computed it from different lineage heads"
    )]
    LineageParted { round: u32, session: String },
    #[error("the audit log could not record the round: {0}")]
    Audit(#[from] ghx_db::audit::Error),
    #[error("the task writing a round's audit entries failed: {0}")]
    AuditTask(String),
}

/// Waits for the audit write `behind` (if any), started by the round
/// before: its outcome.
pub(crate) async fn settle(behind: Option<dispatch::Behind>) -> Result<(), Error> {
    match behind {
        None => Ok(()),
        Some(write) => Ok(write.await.map_err(|e| Error::AuditTask(e.to_string()))??),
    }
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
    /// Mean training log loss of the model the round started from, in
    /// records from before rounds stopped carrying it: a loss summed over
    /// patients lets whoever chooses the model read one patient's label
    /// (`ghx_learn::federated`). The run's evaluation is a round of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// The model the round started from, on the pooled held-out rows; in
    /// records from before, as `train_loss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<Metrics>,
    /// Wall time of the round on the run's critical path: from the end of
    /// the step before (its state then saved) to this round's model.
    pub seconds: f64,
    /// The slowest node's local computation.
    pub local_seconds: f64,
    /// Time in the round during which at least one node was computing: the
    /// union of the nodes' computations on the coordinator's time line (see
    /// [`Computation`]). At least `local_seconds`; more when the nodes
    /// computed at different times (or shared cores and waited). 0 in
    /// records from before it was kept.
    #[serde(default)]
    pub busy_seconds: f64,
    /// Wall time at the coordinator, ms, of: opening the run's session on
    /// the round's path (0 when it was opened while the step before
    /// computed, or was already open; otherwise after a restart, a dropped
    /// node or an expiring capability), the masked input (the nodes' local
    /// computation included; with any redone attempt), unmasking (none in a
    /// session) and the rest of the round's time (the state of the round
    /// before read for saving, the study's check started, waiting for
    /// what is prepared ahead, the sum read into the new model).
    #[serde(default)]
    pub steps_ms: [f64; 4],
    /// Where the answer that ended the round (the last node's) spent its
    /// time, ms (see [`AnswerTimes`]). Zeros in records from before it was
    /// kept, and for rounds outside a session: those end with an unmasking
    /// step, whose answers carry no such times.
    #[serde(default)]
    pub last_answer_ms: [f64; 3],
    /// Whether the round found its session open (keys agreed off the
    /// round's path).
    #[serde(default)]
    pub keys_ahead: bool,
    /// The global logistic model after the round (standardised features).
    /// Empty for an MLP: the record is saved whole after every round, and
    /// keeping every round's MLP would grow it by a whole model each round
    /// (up to 64 x 66 + 1 parameters); the run's `model` is the latest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<f64>,
    #[serde(default)]
    pub bias: f64,
}

/// A model's evaluation, pooled and per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The pooled metrics as released to the requester ([`EvaluationSums::disclosed`]
    /// at the study's largest cell size); none when the pooled held-out
    /// positives or negatives are fewer.
    pub pooled: Option<Metrics>,
    /// Each node's own metrics on its held-out rows, in records from
    /// before nodes stopped releasing them beside the pooled ones (the
    /// pooled less the others' were one node's, in bins of a few of its
    /// patients); empty now.
    pub per_node: BTreeMap<String, Metrics>,
    pub contributors: Vec<String>,
    pub failures: Vec<NodeFailure>,
    /// How the nodes noised it; none: exact (records from before every
    /// evaluation was noised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<EvaluationNoise>,
}

/// The noise of an evaluation, as the requester should read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationNoise {
    /// Charged at each node that contributed.
    pub epsilon: f64,
    /// Bins of predicted probability the nodes counted in.
    pub bins: usize,
    /// Standard deviation of the noise on each pooled count (every node
    /// adds its own).
    pub pooled_sd: f64,
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
    /// The evidence of the run's last summed round (the members' signed
    /// masked inputs), sent with the next round: each node moves its own
    /// lineage by it and never takes a model from the coordinator. None
    /// before the moments, and in records from before nodes kept lineage
    /// (such runs cannot resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<lineage::Evidence>,
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
            lineage: None,
        }
    }

    /// What a step may change in this record, as it is now: a step whose
    /// outcome may not be kept is undone with [`Self::undo_step`].
    pub fn before_step(&self) -> BeforeStep {
        BeforeStep {
            status: self.status,
            model: self.model.clone(),
            moments_rows: self.moments_rows,
            rounds: self.rounds.len(),
            evaluation: self.evaluation.clone(),
            lineage: self.lineage.clone(),
        }
    }

    /// Puts back what a step changed ([`advance`] adds a round, replaces
    /// the model, sets the moments rows or the evaluation and status).
    pub fn undo_step(&mut self, before: BeforeStep) {
        self.status = before.status;
        self.model = before.model;
        self.moments_rows = before.moments_rows;
        self.rounds.truncate(before.rounds);
        self.evaluation = before.evaluation;
        self.lineage = before.lineage;
    }
}

/// A [`TrainingRecord`]'s parts that a step changes, as they were before it.
pub struct BeforeStep {
    status: RunStatus,
    model: Option<ModelDocument>,
    moments_rows: u64,
    rounds: usize,
    evaluation: Option<Evaluation>,
    lineage: Option<lineage::Evidence>,
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
    /// The run its rounds belong to; none for an external validation,
    /// which nodes noise and charge.
    pub run: Option<&'a str>,
}

/// A round's outcome at the coordinator.
pub struct RoundSum {
    pub sum: Vec<f64>,
    pub contributors: Vec<String>,
    pub failures: Vec<NodeFailure>,
    pub node_metrics: BTreeMap<String, Metrics>,
    /// Wall time of the round (with its keys unless agreed ahead).
    pub seconds: f64,
    pub local_seconds: f64,
    /// As [`RoundRecord::busy_seconds`].
    pub busy_seconds: f64,
    /// As [`RoundRecord::steps_ms`].
    pub steps_ms: [f64; 4],
    /// As [`RoundRecord::last_answer_ms`].
    pub last_answer_ms: [f64; 3],
    /// Whether the round completed keys agreed ahead of it.
    pub keys_ahead: bool,
    /// A session round's evidence, for the next round.
    pub evidence: Option<lineage::Evidence>,
}

/// One node's local computation placed on the coordinator's time line:
/// seconds after an origin of the coordinator's choosing. The node says
/// when, after its handler received the request, it started computing and
/// for how long, and how long its handler held the request; the time the
/// call took beyond that is taken as spent equally on the way there and
/// back (as NTP does), so the clocks of the two machines need not agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Computation {
    pub start: f64,
    pub end: f64,
}

impl Computation {
    /// The computation of a call sent `sent` and answered `back` (both
    /// measured from the origin, s) whose answer says `m`.
    pub fn placed(sent: f64, back: f64, m: &pb::RoundMaskedInputResponse) -> Computation {
        let handled = m.handled_micros as f64 / 1e6;
        let way = ((back - sent) - handled).max(0.0) / 2.0;
        let start = (sent + way + m.local_started_micros as f64 / 1e6).min(back);
        let end = (start + m.local_micros as f64 / 1e6).min(back);
        Computation { start, end }
    }

    /// The longest of `computations` (the slowest node's), s.
    pub fn longest(computations: &[Computation]) -> f64 {
        computations
            .iter()
            .map(|c| c.end - c.start)
            .fold(0.0, f64::max)
    }

    /// The length of the union of `computations`: the time during which at
    /// least one of them ran.
    pub fn busy_seconds(computations: &[Computation]) -> f64 {
        let mut spans: Vec<(f64, f64)> = computations.iter().map(|c| (c.start, c.end)).collect();
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut busy = 0.0;
        let mut open: Option<(f64, f64)> = None;
        for (start, end) in spans {
            open = match open {
                Some((s, e)) if start <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    busy += e - s;
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        busy + open.map(|(s, e)| e - s).unwrap_or(0.0)
    }
}

/// Where a node's answer to a round spent its time, seen from the
/// coordinator: on the wire and in the layers carrying it both ways
/// (the call's time outside the node's handler), and in the node's
/// handler before and after its local computation (admission and checks;
/// masking, the audit write and handing the answer back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerTimes {
    /// When the answer was back, s from the round's origin.
    pub back: f64,
    /// Outside the handler, before computing, after computing; ms.
    pub ms: [f64; 3],
}

impl AnswerTimes {
    /// The answer `m` to a call sent `sent` and answered `back` (s from
    /// the round's origin).
    pub fn of(sent: f64, back: f64, m: &pb::RoundMaskedInputResponse) -> AnswerTimes {
        let handled = m.handled_micros as f64 / 1e3;
        let before = (m.local_started_micros as f64 / 1e3).min(handled);
        let after = (handled - before - m.local_micros as f64 / 1e3).max(0.0);
        let outside = ((back - sent) * 1e3 - handled).max(0.0);
        AnswerTimes {
            back,
            ms: [outside, before, after],
        }
    }

    /// The times of the answer that came back last; zeros for none.
    pub fn of_last(answers: &[AnswerTimes]) -> [f64; 3] {
        answers
            .iter()
            .max_by(|a, b| a.back.total_cmp(&b.back))
            .map(|a| a.ms)
            .unwrap_or_default()
    }
}

/// Runs one step on `nodes` concurrently, each bounded by `deadline`;
/// returns the answers and the failures.
pub(crate) async fn step<T, F, Fut>(
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

pub(crate) fn keep(nodes: &[RegisteredNode], ids: &[String]) -> Vec<RegisteredNode> {
    nodes
        .iter()
        .filter(|n| ids.contains(&n.id))
        .cloned()
        .collect()
}

/// A round whose keys are agreed (steps 1 and 2): what steps 3 and 4 need.
/// Made before the model it will train from exists, so the coordinator
/// agrees the next round's keys while the current round computes.
pub struct Keyed {
    round_id: String,
    phase: Phase,
    aggregator: Aggregator,
    /// Node ids whose shares were all routed, in order.
    holders: Vec<String>,
    /// The shares addressed to each holder.
    for_node: BTreeMap<String, Vec<pb::EncryptedShare>>,
    failures: Vec<NodeFailure>,
    claims: capability::Claims,
    request_sha256: String,
    /// Each node's certificate, as it vouched for its round keys.
    certificates: BTreeMap<String, String>,
    /// Wall time of steps 1 and 2, ms.
    keys_ms: f64,
}

/// `evidence` with each input's certificate replaced by its member's
/// current one in `certificates` when that holds the same key: the
/// signature is over the statement, not the certificate, so one renewed
/// since still vouches for it, and evidence kept across a long stop does
/// not go stale (a new key could not).
pub(crate) fn with_current_certificates(
    evidence: &lineage::Evidence,
    certificates: &BTreeMap<String, String>,
) -> lineage::Evidence {
    let mut evidence = evidence.clone();
    for input in &mut evidence.inputs {
        if let Some(current) = certificates.get(&input.node)
            && let (Ok(old), Ok(new)) = (
                ghx_pki::signed::key_pin(&input.certificate_pem),
                ghx_pki::signed::key_pin(current),
            )
            && old == new
        {
            input.certificate_pem = current.clone();
        }
    }
    evidence
}

pub(crate) fn quorum_error(
    round: &str,
    need: usize,
    step: &'static str,
    have: usize,
    failures: &[NodeFailure],
) -> Error {
    let mut failures = failures.to_vec();
    failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Error::Quorum {
        round: round.to_owned(),
        step,
        have,
        need,
        failures,
    }
}

/// Steps 1 and 2 of a round over every registered node (or those of
/// `among`): admission and keys, then encrypted shares relayed. No model
/// is involved.
pub async fn agree_keys(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    among: Option<&[String]>,
) -> Result<Keyed, Error> {
    let started = Instant::now();
    let nodes: Vec<_> = fed
        .registry
        .list()
        .into_iter()
        .filter(|n| among.is_none_or(|among| among.contains(&n.id)))
        .collect();
    if nodes.is_empty() {
        return Err(Error::NoNodes);
    }
    let spec = fed.spec;
    let dim = phase.len(spec.features.len(), spec.param_count());
    let params = RoundParams::new(
        round_id,
        nodes.iter().map(|n| n.id.clone()),
        // Every node's shares are needed to unmask: nodes refuse a round
        // that fewer could unmask (so every participant unmasks, and binds
        // its study to the set).
        u8::try_from(nodes.len()).unwrap_or(u8::MAX),
        dim,
    )?;
    let need = usize::from(spec.quorum);
    let training_json = spec.canonical_json();
    let claims = capability::claims_for(
        fed.manifest,
        fed.study_id,
        params.participants.clone(),
        &training_json,
        time::Duration::try_from(fed.capability_valid_for).unwrap_or(time::Duration::minutes(5)),
    );
    let token = fed.signer.sign(&claims)?;
    let deadline = Duration::from_secs(u64::from(spec.round_deadline_seconds));
    let wire_params = round::params_to_wire(&params);

    // Step 1: admission and keys.
    let (advertised, mut failures) = step(&nodes, deadline, |node| {
        let request = pb::RoundAdvertiseRequest {
            capability: token.clone(),
            manifest_json: fed.manifest_json.to_vec(),
            training_json: training_json.clone(),
            params: Some(wire_params.clone()),
            phase: phase.name().to_owned(),
            run: fed.run.unwrap_or_default().to_owned(),
        };
        async move {
            let response = node
                .round_client()
                .round_advertise(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            let wire = response.keys.unwrap_or_default();
            let keys = round::advertise_from_wire(wire.clone())?;
            if keys.node != node.id {
                return Err(format!("advertised keys as `{}`", keys.node));
            }
            // Relayed as signed: the other nodes check the signature.
            Ok((keys, wire))
        }
    })
    .await;
    let request_sha256 = ghx_audit::digest(&training_json);
    let action = ghx_audit::action::round(phase.name());
    dispatch::record(
        fed.audit,
        &sent(fed, &claims, &action, &request_sha256),
        advertised
            .iter()
            .map(|(id, _)| (id.clone(), dispatch::Answer::default())),
        &failures,
    )?;
    if advertised.len() < need {
        return Err(quorum_error(
            round_id,
            need,
            "advertising keys",
            advertised.len(),
            &failures,
        ));
    }
    let mut aggregator = Aggregator::new(params.clone());
    let mut signed = BTreeMap::new();
    let certificates: BTreeMap<String, String> = advertised
        .iter()
        .map(|(id, (_, wire))| (id.clone(), wire.certificate_pem.clone()))
        .collect();
    for (id, (keys, wire)) in advertised {
        aggregator.advertise(keys)?;
        signed.insert(id, wire);
    }
    let keys = aggregator.advertisements()?;
    let ids: Vec<String> = keys.iter().map(|a| a.node.clone()).collect();
    dropped(
        round_id,
        "advertising keys",
        &params.participants,
        &ids,
        &failures,
    )?;
    let wire_keys: Vec<pb::AdvertisedKeys> =
        ids.iter().filter_map(|id| signed.remove(id)).collect();

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
        return Err(quorum_error(
            round_id,
            need,
            "sharing keys",
            holders.len(),
            &failures,
        ));
    }
    dropped(round_id, "sharing keys", &ids, &holders, &failures)?;
    Ok(Keyed {
        round_id: round_id.to_owned(),
        phase,
        aggregator,
        holders,
        for_node,
        failures,
        claims,
        request_sha256,
        certificates,
        keys_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// What the coordinator's audit log records as sent for `action`.
pub(crate) fn sent<'a>(
    fed: &Federation<'a>,
    claims: &'a capability::Claims,
    action: &'a str,
    request_sha256: &str,
) -> dispatch::Sent<'a> {
    dispatch::Sent {
        action,
        study_id: fed.study_id,
        capability_id: &claims.jti,
        request_sha256: request_sha256.to_owned(),
        requester: &claims.requester,
        requester_org: &claims.org,
        purpose: &claims.purpose,
        epsilon: 0.0,
    }
}

/// Steps 3 and 4 of a keyed round: the model goes out with the shares, each
/// node computes and sends its masked contribution, and the survivors'
/// sum is unmasked. The coordinator learns only that sum.
pub async fn complete_round(
    fed: &Federation<'_>,
    keyed: Keyed,
    model: Option<&ModelDocument>,
    previous: Option<&lineage::Evidence>,
) -> Result<RoundSum, Error> {
    let started = Instant::now();
    let Keyed {
        round_id,
        mut aggregator,
        holders,
        for_node,
        mut failures,
        claims,
        request_sha256,
        certificates,
        keys_ms,
        ..
    } = keyed;
    let round_id = round_id.as_str();
    let nodes = fed.registry.list();
    let need = usize::from(fed.spec.quorum);
    let deadline = Duration::from_secs(u64::from(fed.spec.round_deadline_seconds));
    let model_json = model
        .map(|m| serde_json::to_vec(m).expect("a model serializes"))
        .unwrap_or_default();
    let previous =
        previous.map(|e| round::evidence_to_wire(&with_current_certificates(e, &certificates)));

    // Step 3: the model out, masked contributions back.
    let (masked, more) = step(&keep(&nodes, &holders), deadline, |node| {
        let request = pb::RoundMaskedInputRequest {
            round: round_id.to_owned(),
            shares: for_node.get(&node.id).cloned().unwrap_or_default(),
            model_json: model_json.clone(),
            previous: previous.clone(),
        };
        async move {
            let sent = started.elapsed().as_secs_f64();
            let m = node
                .round_client()
                .round_masked_input(request)
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            let computed = Computation::placed(sent, started.elapsed().as_secs_f64(), &m);
            if m.node != node.id {
                return Err(format!("sent a masked input as `{}`", m.node));
            }
            let metrics = if m.node_metrics_json.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_slice::<Metrics>(&m.node_metrics_json)
                        .map_err(|e| format!("unreadable metrics: {e}"))?,
                )
            };
            Ok((round::masked_from_wire(m), computed, metrics))
        }
    })
    .await;
    dispatch::record(
        fed.audit,
        &sent(
            fed,
            &claims,
            ghx_audit::action::MASKED_INPUT,
            &request_sha256,
        ),
        masked
            .iter()
            .map(|(id, (input, _, _))| (id.clone(), dispatch::Answer::of_masked(&input.values))),
        &more,
    )?;
    failures.extend(more);
    let mut computations = Vec::new();
    let mut node_metrics = BTreeMap::new();
    let mut arrived = Vec::new();
    for (id, (input, computed, metrics)) in masked {
        match aggregator.submit_masked(input) {
            Ok(()) => {
                arrived.push(id.clone());
                computations.push(computed);
                if let Some(m) = metrics {
                    node_metrics.insert(id, m);
                }
            }
            Err(e) => failures.push(NodeFailure {
                node_id: id,
                reason: e.to_string(),
            }),
        }
    }
    let survivors = match aggregator.survivors() {
        Ok(s) => s,
        // Fewer inputs than every node's (the threshold): redone among
        // those that sent one, if they are enough.
        Err(_) if arrived.len() >= need.max(2) => {
            arrived.sort();
            dropped(round_id, "masked input", &holders, &arrived, &failures)?;
            return Err(quorum_error(round_id, need, "masked input", 0, &failures));
        }
        Err(_) => return Err(quorum_error(round_id, need, "masked input", 0, &failures)),
    };
    dropped(round_id, "masked input", &holders, &survivors, &failures)?;
    let masked_ms = started.elapsed().as_secs_f64() * 1000.0;

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
    let seconds = started.elapsed().as_secs_f64();
    Ok(RoundSum {
        sum: ghx_secagg::decode(&aggregate.sum),
        contributors: aggregate.contributors,
        failures,
        node_metrics,
        seconds,
        local_seconds: Computation::longest(&computations),
        busy_seconds: Computation::busy_seconds(&computations),
        steps_ms: [keys_ms, masked_ms, seconds * 1000.0 - masked_ms, 0.0],
        last_answer_ms: [0.0; 3],
        keys_ahead: false,
        evidence: None,
    })
}

/// Refuses to go on with a round when only `left` of the nodes it was
/// keyed with (`keyed`) are left: [`Error::Dropped`].
fn dropped(
    round: &str,
    step: &'static str,
    keyed: &[String],
    left: &[String],
    failures: &[NodeFailure],
) -> Result<(), Error> {
    if keyed.len() == left.len() {
        return Ok(());
    }
    let mut failures = failures.to_vec();
    failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Err(Error::Dropped {
        round: round.to_owned(),
        step,
        left: left.to_vec(),
        failures,
    })
}

/// One whole round of secure aggregation over every registered node (or
/// those of `among`).
pub async fn secure_round(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    (model, previous): (Option<&ModelDocument>, Option<&lineage::Evidence>),
    among: Option<&[String]>,
) -> Result<RoundSum, Error> {
    let keyed = agree_keys(fed, round_id, phase, among).await?;
    let mut sum = complete_round(fed, keyed, model, previous).await?;
    sum.seconds += sum.steps_ms[0] / 1000.0;
    Ok(sum)
}

/// Runs a round, retrying a failed one. The first attempt completes the
/// keys agreed ahead for it, when there are any.
async fn with_retries(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    from: (Option<&ModelDocument>, Option<&lineage::Evidence>),
    mut ahead: Option<Keyed>,
    members: Option<Vec<String>>,
) -> Result<RoundSum, Error> {
    let mut attempt = 1;
    // The run's nodes so far; after a node dropped out, the nodes left.
    let mut among = members.clone();
    loop {
        let id = if attempt == 1 {
            round_id.to_owned()
        } else {
            format!("{round_id}/attempt-{attempt}")
        };
        let span = tracing::info_span!("training_round", round = %id, phase = phase.name());
        let started = Instant::now();
        let keyed = ahead
            .take()
            .filter(|k| k.round_id == id && k.phase == phase);
        let outcome = match keyed {
            Some(keyed) => complete_round(fed, keyed, from.0, from.1)
                .instrument(span)
                .await
                .map(|sum| RoundSum {
                    keys_ahead: true,
                    ..sum
                }),
            None => {
                secure_round(fed, &id, phase, from, among.as_deref())
                    .instrument(span)
                    .await
            }
        };
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
                among = match e {
                    Error::Dropped { left, .. } => Some(left),
                    _ => members.clone(),
                };
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a run's driver carries from one step to the next: the run's
/// session, the keys agreed ahead for the next one-off round, and when the
/// step before ended.
#[derive(Default)]
pub struct Pipeline {
    session: Option<Session>,
    ahead: Option<Keyed>,
    since: Option<Instant>,
    /// The audit write of the last session round's requests, done while
    /// the next round computes; every round waits for the one before's.
    behind: Option<dispatch::Behind>,
    /// The nodes the run's last round was summed over: a one-off round
    /// after it is keyed among them, since nodes sum a study's values over
    /// one set of nodes only.
    members: Option<Vec<String>>,
}

/// Every this many training rounds, a run whose session lacks registered
/// nodes opens a session with every node while the round computes, and
/// moves to it if more nodes joined.
pub const REJOIN_EVERY: u32 = 10;

/// What a step is: a one-off round (moments, evaluation) or a training
/// round of the run's session.
enum This<'a> {
    Round(&'a str, Phase),
    Session(u32),
}

/// What to prepare while a step computes.
enum Ahead {
    Keys(String, Phase),
    Session,
}

/// What was prepared while a step computed.
enum Prepared {
    Keys(Keyed),
    Session(Session),
}

/// Training round `number` in the run's session (opened now if there is
/// none fresh): a member missing from the round is named, a new session is
/// opened among the members that answered and the round is redone, up to
/// [`ATTEMPTS`] times.
async fn session_round(
    fed: &Federation<'_>,
    slot: &mut Option<Session>,
    behind: &mut Option<dispatch::Behind>,
    prefix: &str,
    number: u32,
    previous: Option<&lineage::Evidence>,
    members: Option<Vec<String>>,
) -> Result<RoundSum, Error> {
    let started = Instant::now();
    let mut open_ms = 0.0;
    // The run's nodes so far (nodes sum a study over one set of them).
    let mut among: Option<Vec<String>> = members.clone();
    let mut dropped: Vec<NodeFailure> = Vec::new();
    let mut attempt = 1;
    loop {
        let current = slot.take().filter(|s| s.fresh(fed.capability_valid_for));
        let session = match current {
            Some(s) => s,
            None => {
                let opening = Instant::now();
                let opened = session::open(fed, prefix, among.as_deref(), dropped.clone())
                    .instrument(tracing::info_span!("open_session", round = number))
                    .await;
                open_ms += opening.elapsed().as_secs_f64() * 1000.0;
                match opened {
                    Ok(s) => s,
                    Err(e) if attempt < ATTEMPTS => {
                        tracing::warn!(round = number, error = %e, "session not opened; retrying with the run's nodes");
                        attempt += 1;
                        among = members.clone();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let outcome = session::round(fed, &session, number, previous, behind)
            .instrument(
                tracing::info_span!("training_round", round = number, session = %session.id),
            )
            .await?;
        match outcome {
            session::Outcome::Summed(mut sum) => {
                sum.seconds = started.elapsed().as_secs_f64();
                sum.steps_ms[0] = open_ms;
                sum.keys_ahead = open_ms == 0.0;
                *slot = Some(session);
                return Ok(*sum);
            }
            session::Outcome::Dropped { answered, failures } => {
                let text = failures_text(&failures);
                tracing::warn!(
                    round = number,
                    "round not summed; keying again among the rest{text}"
                );
                if attempt >= ATTEMPTS {
                    return Err(quorum_error(
                        &format!("{prefix}/round-{number}"),
                        usize::from(fed.spec.quorum),
                        "masked input",
                        answered.len(),
                        &failures,
                    ));
                }
                attempt += 1;
                // Those left out of this session stay named in the next.
                dropped = session.left_out.clone();
                dropped.extend(failures);
                among = Some(answered);
            }
        }
    }
}

impl Pipeline {
    /// The step before is over (its outcome computed, its state not yet
    /// saved): the next round's time starts now, so it counts saving the
    /// state too.
    pub fn mark(&mut self) {
        self.since = Some(Instant::now());
    }
}

/// Runs a step and, at the same time, prepares what comes next (`next`),
/// which needs no model: the keys of the next one-off round, or a session
/// for the training rounds. What cannot be prepared ahead is prepared when
/// its round comes.
async fn round_and_next(
    fed: &Federation<'_>,
    pipeline: &mut Pipeline,
    prefix: &str,
    this: This<'_>,
    previous: Option<&lineage::Evidence>,
    next: Option<Ahead>,
) -> Result<RoundSum, Error> {
    let ahead = pipeline.ahead.take();
    let mut slot = pipeline.session.take();
    let mut behind = pipeline.behind.take();
    let members = pipeline.members.clone();
    let prefetch = async {
        match next? {
            Ahead::Keys(id, phase) => match agree_keys(fed, &id, phase, members.as_deref())
                .instrument(tracing::info_span!("agree_keys_ahead", round = %id))
                .await
            {
                Ok(keyed) => Some(Prepared::Keys(keyed)),
                Err(e) => {
                    tracing::warn!(round = %id, error = %e, "keys not agreed ahead; agreeing them when the round comes");
                    None
                }
            },
            Ahead::Session => match session::open(fed, prefix, members.as_deref(), Vec::new())
                .instrument(tracing::info_span!("open_session_ahead"))
                .await
            {
                Ok(s) => Some(Prepared::Session(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "session not opened ahead; opening it when a round needs it");
                    None
                }
            },
        }
    };
    let run = async {
        match this {
            This::Round(round_id, phase) => {
                settle(behind.take()).await?;
                // A run's one-off round (its evaluation) sends no model:
                // nodes evaluate the one their lineage reached.
                with_retries(
                    fed,
                    round_id,
                    phase,
                    (None, previous),
                    ahead,
                    members.clone(),
                )
                .await
            }
            This::Session(number) => {
                session_round(
                    fed,
                    &mut slot,
                    &mut behind,
                    prefix,
                    number,
                    previous,
                    members.clone(),
                )
                .await
            }
        }
    };
    let (outcome, prepared) = tokio::join!(run, prefetch);
    pipeline.behind = behind;
    let mut round = outcome?;
    pipeline.members = Some(round.contributors.clone());
    pipeline.session = slot;
    match prepared {
        Some(Prepared::Keys(keyed)) => pipeline.ahead = Some(keyed),
        // A session opened ahead replaces one with fewer members.
        Some(Prepared::Session(opened))
            if pipeline
                .session
                .as_ref()
                .is_none_or(|s| opened.members.len() > s.members.len()) =>
        {
            pipeline.session = Some(opened);
        }
        Some(Prepared::Session(_)) | None => {}
    }
    // The round's time on the run's critical path: from the end of the
    // step before (its state saved since) to now, when that is known.
    if let Some(since) = pipeline.since {
        round.seconds = round.seconds.max(since.elapsed().as_secs_f64());
    }
    let on_path = round.steps_ms[1]
        + round.steps_ms[2]
        + if round.keys_ahead {
            0.0
        } else {
            round.steps_ms[0]
        };
    round.steps_ms[3] = (round.seconds * 1000.0 - on_path).max(0.0);
    Ok(round)
}

/// Advances a run by one step (a moments, training or evaluation round),
/// updating `record` in place (its rounds are not copied: a long run's
/// step costs the same as a short one's); `Ok(false)` when the run is
/// finished. On an error `record` is as it was. While a step's round
/// computes, the keys of the run's next round are agreed and kept in
/// `pipeline`.
pub async fn advance(
    fed: &Federation<'_>,
    record: &mut TrainingRecord,
    pipeline: &mut Pipeline,
) -> Result<bool, Error> {
    if record.status != RunStatus::Running {
        return Ok(false);
    }
    let spec = fed.spec;
    let prefix = format!("{}/{}/{}", record.study_id, spec.name, record.run_id);
    let rounds_done = record.rounds.len() as u32;
    let rounds_total = record.rounds_total;
    // What to prepare while the step before training round `number`
    // computes: the evaluation's keys after the last round; a session with
    // every node when the run's session lacks some (every REJOIN_EVERY
    // rounds). A round otherwise leaves its session to the next (the
    // moments, round 0, open the run's first).
    // The run's evaluation is noised at the epsilon the training declares
    // for evaluations; a training that declares none is not evaluated.
    let evaluated = spec.validation.is_some();
    let ahead_of = |number: u32, pipeline: &Pipeline| {
        if number > rounds_total {
            return evaluated.then(|| Ahead::Keys(format!("{prefix}/evaluation"), Phase::Evaluate));
        }
        match &pipeline.session {
            Some(s)
                if number.is_multiple_of(REJOIN_EVERY)
                    && s.members.len() < fed.registry.list().len() =>
            {
                Some(Ahead::Session)
            }
            _ => None,
        }
    };
    let previous = record.lineage.clone();
    match record.model.clone() {
        None => {
            // The moments are the session's round 0: the standardisation
            // is part of the lineage the nodes check. Nothing is prepared
            // ahead: round 1 uses the session round 0 opens.
            let ahead = (rounds_total == 0).then(|| ahead_of(1, pipeline)).flatten();
            let round = round_and_next(
                fed,
                pipeline,
                &prefix,
                This::Session(0),
                previous.as_ref(),
                ahead,
            )
            .await?;
            // The standardisation, and the start the training declares
            // (not one the coordinator draws), read as nodes read them.
            let start = lineage::model_after(spec, None, &round.sum)?;
            record.moments_rows = start.rows.round().max(0.0) as u64;
            record.model = Some(start.model);
            record.lineage = round.evidence;
        }
        Some(model) if rounds_done < rounds_total => {
            let number = rounds_done + 1;
            let ahead = ahead_of(number + 1, pipeline);
            let round = round_and_next(
                fed,
                pipeline,
                &prefix,
                This::Session(number),
                previous.as_ref(),
                ahead,
            )
            .await?;
            let updating = Instant::now();
            let next = lineage::model_after(spec, Some(&model), &round.sum)?;
            let (weights, bias) = match &next.model.hidden {
                None => (next.model.weights.clone(), next.model.bias),
                Some(_) => (Vec::new(), 0.0),
            };
            let train_rows = next.rows;
            record.model = Some(next.model);
            record.lineage = round.evidence;
            // Reading the sum into the new model is part of the round.
            let update = updating.elapsed().as_secs_f64();
            let mut steps_ms = round.steps_ms;
            steps_ms[3] += update * 1000.0;
            record.rounds.push(RoundRecord {
                round: number,
                contributors: round.contributors,
                failures: round.failures,
                train_rows: train_rows.round().max(0.0) as u64,
                train_loss: None,
                holdout: None,
                seconds: round.seconds + update,
                local_seconds: round.local_seconds,
                busy_seconds: round.busy_seconds,
                steps_ms,
                last_answer_ms: round.last_answer_ms,
                keys_ahead: round.keys_ahead,
                weights,
                bias,
            });
        }
        Some(_) if !evaluated => record.status = RunStatus::Completed,
        Some(_) => {
            // Each node evaluates the model its lineage reached with the
            // last round's evidence (no model of the coordinator's), noised.
            let round = round_and_next(
                fed,
                pipeline,
                &prefix,
                This::Round(&format!("{prefix}/evaluation"), Phase::Evaluate),
                previous.as_ref(),
                None,
            )
            .await?;
            record.evaluation = Some(noised_evaluation(fed, round)?);
            record.status = RunStatus::Completed;
        }
    }
    Ok(true)
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
    let round = secure_round(fed, &round_id, Phase::Evaluate, (Some(model), None), None).await?;
    noised_evaluation(fed, round)
}

/// An evaluation's sum as released: the noised counts merged under the
/// study's largest cell size, with the noise the nodes added (each at the
/// epsilon the training declares), and nothing beside the noised pool: no
/// node's own figures, whatever an older or modified node sends.
fn noised_evaluation(fed: &Federation<'_>, round: RoundSum) -> Result<Evaluation, Error> {
    let noise = fed.spec.validation.map(|v| EvaluationNoise {
        epsilon: v.epsilon,
        bins: ghx_learn::evaluation::NOISED_SCORE_BINS,
        pooled_sd: (round.contributors.len() as f64
            * ghx_learn::noise::two_sided_geometric_variance(v.epsilon))
        .sqrt(),
    });
    Ok(Evaluation {
        noise,
        per_node: BTreeMap::new(),
        ..evaluation(round, pooled_cell_size(fed))?
    })
}

/// The cell size pooled metrics are released under: the study's largest.
fn pooled_cell_size(fed: &Federation<'_>) -> u64 {
    let sizes = &fed.manifest.min_cell_size;
    u64::from(sizes.nodes.values().copied().fold(sizes.default, u32::max))
}

fn evaluation(round: RoundSum, k: u64) -> Result<Evaluation, Error> {
    Ok(Evaluation {
        pooled: EvaluationSums::from_vec(&round.sum)?.disclosed(k),
        per_node: round.node_metrics,
        contributors: round.contributors,
        failures: round.failures,
        noise: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(started_us: u64, local_us: u64, handled_us: u64) -> pb::RoundMaskedInputResponse {
        pb::RoundMaskedInputResponse {
            local_started_micros: started_us,
            local_micros: local_us,
            handled_micros: handled_us,
            ..Default::default()
        }
    }

    #[test]
    fn the_last_answer_is_split_into_transport_and_handler_before_and_after() {
        // Sent at 1 s, back at 1.010 s, held 6 ms by the handler, which
        // computed from 1 ms to 5 ms into that.
        let first = AnswerTimes::of(1.0, 1.010, &answer(1_000, 4_000, 6_000));
        assert_eq!(first.back, 1.010);
        for (got, want) in first.ms.iter().zip([4.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-9, "{first:?}");
        }
        // Sent later but back last: its times are the round's.
        let last = AnswerTimes::of(1.002, 1.012, &answer(500, 8_000, 9_000));
        let ms = AnswerTimes::of_last(&[last, first]);
        for (got, want) in ms.iter().zip([1.0, 0.5, 0.5]) {
            assert!((got - want).abs() < 1e-9, "{ms:?}");
        }
        assert_eq!(AnswerTimes::of_last(&[]), [0.0; 3]);
        // A handler that claims to have computed longer than it held the
        // request is read as no time after computing, never negative.
        let odd = AnswerTimes::of(0.0, 0.001, &answer(200, 5_000, 300));
        assert_eq!(odd.ms[2], 0.0);
    }

    #[test]
    fn a_computation_is_placed_halfway_through_the_transport() {
        // Sent at 1 s, back at 1.010 s; the handler held it 6 ms and
        // computed from 1 ms to 5 ms into that: 2 ms each way.
        let c = Computation::placed(1.0, 1.010, &answer(1_000, 4_000, 6_000));
        assert!((c.start - 1.003).abs() < 1e-12, "{c:?}");
        assert!((c.end - 1.007).abs() < 1e-12, "{c:?}");
        // A node claiming more than the call took stays inside the call.
        let c = Computation::placed(1.0, 1.010, &answer(9_000, 40_000, 60_000));
        assert!(
            c.start <= 1.010 && c.end <= 1.010 && c.start >= 1.0,
            "{c:?}"
        );
    }

    #[test]
    fn an_undone_step_leaves_the_record_as_it_was() {
        use rand::SeedableRng;
        let manifest =
            StudyManifest::parse(include_bytes!("../../deploy/examples/study-t2d-model.json"))
                .unwrap();
        let spec = &manifest.trainings[0];
        let n = spec.features.len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let model = |mean: f64, rng: &mut rand::rngs::StdRng| {
            let initial = spec.initial_model(rng).unwrap();
            ModelDocument::new(spec, &vec![mean; n], &vec![1.0; n], &initial)
        };
        let metrics = EvaluationSums::from_vec(&vec![1.0; EvaluationSums::LEN])
            .unwrap()
            .metrics();
        let round = |number: u32| RoundRecord {
            round: number,
            contributors: vec!["a".to_owned(), "b".to_owned()],
            failures: Vec::new(),
            train_rows: 100,
            train_loss: None,
            holdout: None,
            seconds: 0.003,
            local_seconds: 0.002,
            busy_seconds: 0.002,
            steps_ms: [0.0, 2.5, 0.0, 0.5],
            last_answer_ms: [0.2, 0.1, 0.2],
            keys_ahead: true,
            weights: vec![0.1; n],
            bias: 0.0,
        };
        let mut record = TrainingRecord::new("run-1", "study-1", spec, "2026-12-04T00:00:00Z");
        // Undoing the moments step takes the initial model away again.
        let before = record.before_step();
        record.model = Some(model(0.0, &mut rng));
        record.moments_rows = 100;
        record.undo_step(before);
        assert_eq!(
            record,
            TrainingRecord::new("run-1", "study-1", spec, "2026-12-04T00:00:00Z")
        );
        // A training round and the evaluation: their round, model,
        // evaluation and status go.
        record.model = Some(model(0.0, &mut rng));
        record.moments_rows = 100;
        record.rounds.push(round(1));
        let kept = record.clone();
        let before = record.before_step();
        record.rounds.push(round(2));
        record.model = Some(model(0.5, &mut rng));
        record.evaluation = Some(Evaluation {
            pooled: Some(metrics.clone()),
            per_node: BTreeMap::new(),
            contributors: vec!["a".to_owned()],
            failures: Vec::new(),
            noise: None,
        });
        record.status = RunStatus::Completed;
        record.undo_step(before);
        assert_eq!(record, kept);
    }

    #[test]
    fn busy_time_is_the_union_of_the_computations() {
        let c = |start, end| Computation { start, end };
        assert_eq!(Computation::busy_seconds(&[]), 0.0);
        let busy = Computation::busy_seconds(&[c(2.0, 5.0), c(1.0, 3.0), c(7.0, 8.0), c(7.2, 7.5)]);
        assert!((busy - 5.0).abs() < 1e-12, "{busy}");
        // Touching spans join; a span inside another adds nothing.
        let busy = Computation::busy_seconds(&[c(0.0, 1.0), c(1.0, 2.0), c(0.5, 0.7)]);
        assert!((busy - 2.0).abs() < 1e-12, "{busy}");
        assert!((Computation::longest(&[c(0.0, 1.0), c(0.5, 2.5)]) - 2.0).abs() < 1e-12);
        assert_eq!(Computation::longest(&[]), 0.0);
    }
}

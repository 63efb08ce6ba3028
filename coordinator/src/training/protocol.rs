//! The secure-aggregation round protocol at the coordinator: what a round
//! runs with ([`Federation`]), one step fanned out to the nodes with a
//! deadline and named failures ([`step`]), keys agreed ([`agree_keys`]),
//! masked inputs summed ([`complete_round`]), a one-off round with retries
//! ([`secure_round`], [`with_retries`]), and why a round fails ([`Error`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::Instrument;

use ghx_learn::federated::{Metrics, Phase};
use ghx_proto::round;
use ghx_proto::v1 as pb;
use ghx_secagg::{Aggregator, RoundParams};
use ghx_study::capability::{self, Signer};
use ghx_study::lineage;
use ghx_study::manifest::StudyManifest;
use ghx_study::result::NodeFailure;
use ghx_study::training::{ModelDocument, TrainingSpec};

use super::timing::{AnswerSplit, Computation, StepTimes};
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

pub(super) fn failures_text(failures: &[NodeFailure]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let named: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.node_id, f.reason))
        .collect();
    format!(" ({})", named.join("; "))
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
pub(super) struct RoundSum {
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
    pub steps_ms: StepTimes,
    /// As [`RoundRecord::last_answer_ms`].
    pub last_answer_ms: AnswerSplit,
    /// Whether the round completed keys agreed ahead of it.
    pub keys_ahead: bool,
    /// A session round's evidence, for the next round.
    pub evidence: Option<lineage::Evidence>,
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
pub(super) struct Keyed {
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
pub(super) async fn agree_keys(
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
pub(super) async fn complete_round(
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
        steps_ms: StepTimes {
            open_ms: keys_ms,
            masked_ms,
            unmask_ms: seconds * 1000.0 - masked_ms,
            rest_ms: 0.0,
        },
        last_answer_ms: AnswerSplit::default(),
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
pub(super) async fn secure_round(
    fed: &Federation<'_>,
    round_id: &str,
    phase: Phase,
    (model, previous): (Option<&ModelDocument>, Option<&lineage::Evidence>),
    among: Option<&[String]>,
) -> Result<RoundSum, Error> {
    let keyed = agree_keys(fed, round_id, phase, among).await?;
    let mut sum = complete_round(fed, keyed, model, previous).await?;
    sum.seconds += sum.steps_ms.open_ms / 1000.0;
    Ok(sum)
}

/// Runs a round, retrying a failed one. The first attempt completes the
/// keys agreed ahead for it, when there are any.
pub(super) async fn with_retries(
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

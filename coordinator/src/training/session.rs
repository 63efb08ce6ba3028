//! A training run's secure-aggregation sessions at the coordinator
//! (`ghx_secagg::session`): the nodes are admitted and keyed once, then
//! each training round is one message per member, on the member's
//! `SessionRounds` stream of the session, and the sum of the answers.
//!
//! A session is opened under one capability for the run's training and
//! its members' signed keys are relayed once. A round sums only when every
//! member answered; a member that is down, refuses or misses the deadline
//! is named, and the driver ([`crate::training`]) opens a new session
//! among the members that did answer and redoes the round under fresh
//! keys. Nothing is ever unmasked, so no live node's secret is
//! reconstructed. A session is replaced before half of its capability's
//! validity is left, so revocation and expiry keep biting during a run.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ghx_learn::federated::Phase;
use ghx_proto::round;
use ghx_proto::v1 as pb;
use ghx_secagg::{MaskedInput, RoundParams};
use ghx_study::capability;
use ghx_study::lineage::{Evidence, Head, SignedInput};
use ghx_study::result::NodeFailure;

use super::protocol::{
    Error, Federation, RoundSum, keep, quorum_error, sent, settle, step, with_current_certificates,
};
use super::timing::{AnswerTimes, Computation, StepTimes};
use crate::dispatch;
use crate::fanout::{RegisteredNode, describe};

/// An open session: who is in it and under what capability.
pub(super) struct Session {
    pub id: String,
    /// Node ids, sorted.
    pub members: Vec<String>,
    /// Registered nodes outside the session and why (refused or failed
    /// opening it, or dropped from a session before it): named in every
    /// round the session sums.
    pub left_out: Vec<NodeFailure>,
    claims: capability::Claims,
    request_sha256: String,
    dim: usize,
    /// Each member's certificate, as it vouched for its key: its lineage
    /// inputs are checked against it.
    certificates: BTreeMap<String, String>,
    /// The digest of the agreed keys, which every lineage input names.
    keys_sha256: Head,
    /// Each member's signed confirmation of the keys it agreed, relayed
    /// with every round: a member masks nothing until all verify over its
    /// own agreed keys.
    confirmations: Vec<pb::SessionConfirmation>,
    /// Each member's stream of rounds, opened at its first round.
    links: HashMap<String, tokio::sync::Mutex<Option<Link>>>,
}

/// A member's `SessionRounds` stream: the session's rounds go out one
/// message each, answered in order.
struct Link {
    requests: tokio::sync::mpsc::Sender<pb::SessionInputRequest>,
    answers: tonic::Streaming<pb::RoundMaskedInputResponse>,
}

impl Link {
    async fn open(node: &RegisteredNode) -> Result<Link, String> {
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        let outgoing = futures::stream::unfold(outgoing, |mut outgoing| async move {
            outgoing.recv().await.map(|m| (m, outgoing))
        });
        let answers = node
            .round_client()
            .session_rounds(outgoing)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        Ok(Link { requests, answers })
    }
}

/// Sends `request` to `node` on its stream in `slot` (opened first when
/// there is none) and returns the answer. The stream is taken out while in
/// use and put back only after a whole exchange, so a round given up
/// midway (its deadline) leaves no half-used stream behind: the next round
/// opens a fresh one.
async fn exchange(
    node: &RegisteredNode,
    slot: &tokio::sync::Mutex<Option<Link>>,
    request: pb::SessionInputRequest,
) -> Result<pb::RoundMaskedInputResponse, String> {
    let mut slot = slot.lock().await;
    let mut link = match slot.take() {
        Some(link) => link,
        None => Link::open(node).await?,
    };
    link.requests
        .send(request)
        .await
        .map_err(|_| "closed the session's stream".to_owned())?;
    let answer = link
        .answers
        .message()
        .await
        .map_err(|s| describe(&s))?
        .ok_or_else(|| "ended the session's stream without an answer".to_owned())?;
    *slot = Some(link);
    Ok(answer)
}

/// `seconds` from a round's start as whole µs, for its timing logs.
fn micros(seconds: f64) -> i64 {
    (seconds * 1e6).round() as i64
}

impl Session {
    /// Whether more than half of the session capability's validity is
    /// left, so a round started now ends well before it expires.
    pub(super) fn fresh(&self, valid_for: Duration) -> bool {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.claims.exp - now > i64::try_from(valid_for.as_secs() / 2).unwrap_or(i64::MAX)
    }
}

/// A session round's outcome.
pub(super) enum Outcome {
    Summed(Box<RoundSum>),
    /// Some member did not answer: the round cannot be summed.
    Dropped {
        answered: Vec<String>,
        failures: Vec<NodeFailure>,
    },
}

/// Opens a session among `among` (every registered node when `None`):
/// admission and keys, then the keys relayed. Nodes that fail either step
/// are left out (and named with `left_out`); the session needs the
/// training's quorum.
pub(super) async fn open(
    fed: &Federation<'_>,
    prefix: &str,
    among: Option<&[String]>,
    mut left_out: Vec<NodeFailure>,
) -> Result<Session, Error> {
    let registered = fed.registry.list();
    if registered.is_empty() {
        return Err(Error::NoNodes);
    }
    let mut nodes: Vec<RegisteredNode> = match among {
        None => registered,
        Some(ids) => keep(&registered, ids),
    };
    let spec = fed.spec;
    let need = usize::from(spec.quorum);
    // Round 0 sums the moments, later rounds the training's parameters.
    let dim = ghx_learn::federated::session_len(spec.features.len(), spec.param_count());
    let training_json = spec.canonical_json();
    let request_sha256 = ghx_audit::digest(&training_json);
    let deadline = Duration::from_secs(u64::from(spec.round_deadline_seconds));
    let valid_for =
        time::Duration::try_from(fed.capability_valid_for).unwrap_or(time::Duration::minutes(5));
    // Each pass either keys every node it opened with or drops some, and
    // the next pass opens a new session among the rest.
    loop {
        let id = format!(
            "{prefix}/session-{}",
            time::OffsetDateTime::now_utc().unix_timestamp_nanos()
        );
        if nodes.len() < need {
            return Err(quorum_error(
                &id,
                need,
                "opening a session",
                nodes.len(),
                &left_out,
            ));
        }
        // As a one-off round's: every member (nodes refuse fewer).
        let threshold = u8::try_from(nodes.len()).unwrap_or(u8::MAX);
        let params = RoundParams::new(&id, nodes.iter().map(|n| n.id.clone()), threshold, dim)?;
        let claims = capability::claims_for(
            fed.manifest,
            fed.study_id,
            params.participants.clone(),
            &training_json,
            valid_for,
        );
        let token = fed.signer.sign(&claims)?;
        let wire_params = round::params_to_wire(&params);
        let (opened, failures) = step(&nodes, deadline, |node| {
            let request = pb::RoundAdvertiseRequest {
                capability: token.clone(),
                manifest_json: fed.manifest_json.to_vec(),
                training_json: training_json.clone(),
                params: Some(wire_params.clone()),
                phase: Phase::Train.name().to_owned(),
                run: fed.run.unwrap_or_default().to_owned(),
            };
            async move {
                let keys = node
                    .round_client()
                    .session_open(request)
                    .await
                    .map_err(|s| describe(&s))?
                    .into_inner()
                    .keys
                    .unwrap_or_default();
                if keys.node != node.id {
                    return Err(format!("opened the session as `{}`", keys.node));
                }
                // Relayed as signed: the other members check the signature.
                round::session_keys_from_wire(keys.clone())?;
                Ok(keys)
            }
        })
        .await;
        let action = ghx_audit::action::round(Phase::Train.name());
        dispatch::record(
            fed.audit,
            &sent(fed, &claims, &action, &request_sha256),
            opened
                .iter()
                .map(|(id, _)| (id.clone(), dispatch::Answer::default())),
            &failures,
        )?;
        left_out.extend(failures);
        if opened.len() < need {
            return Err(quorum_error(
                &id,
                need,
                "opening a session",
                opened.len(),
                &left_out,
            ));
        }
        let ids: Vec<String> = opened.iter().map(|(id, _)| id.clone()).collect();
        // A session's keys are agreed among every node it was opened with:
        // when some did not open it, open another among those that did.
        if ids.len() < nodes.len() {
            nodes = keep(&nodes, &ids);
            continue;
        }
        let keys: Vec<pb::SessionKeys> = opened.into_iter().map(|(_, k)| k).collect();
        let members = keep(&nodes, &ids);
        let (agreed, failures) = step(&members, deadline, |node| {
            let request = pb::SessionAgreeRequest {
                session: id.clone(),
                keys: keys.clone(),
            };
            async move {
                let agreed = node
                    .round_client()
                    .session_agree(request)
                    .await
                    .map_err(|s| describe(&s))?
                    .into_inner();
                Ok(pb::SessionConfirmation {
                    node: node.id.clone(),
                    signature: agreed.confirmation,
                })
            }
        })
        .await;
        if failures.is_empty() {
            let mut certificates = BTreeMap::new();
            let mut agreed_keys = Vec::new();
            for k in &keys {
                certificates.insert(k.node.clone(), k.certificate_pem.clone());
                // Read when the member opened the session.
                if let Ok(read) = round::session_keys_from_wire(k.clone()) {
                    agreed_keys.push((read.node, read.mask_key.to_vec()));
                }
            }
            let mut members = ids;
            members.sort();
            left_out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let links = members
                .iter()
                .map(|m| (m.clone(), tokio::sync::Mutex::new(None)))
                .collect();
            return Ok(Session {
                id,
                members,
                left_out,
                claims,
                request_sha256,
                dim,
                certificates,
                keys_sha256: ghx_study::lineage::keys_sha256(&agreed_keys),
                confirmations: agreed.into_iter().map(|(_, c)| c).collect(),
                links,
            });
        }
        // Those that agreed hold pair secrets with those that did not:
        // key again among the former.
        left_out.extend(failures);
        let agreed: Vec<String> = agreed.into_iter().map(|(id, _)| id).collect();
        nodes = keep(&nodes, &agreed);
    }
}

/// Round `number` of the run in `session`: the evidence of the round
/// before out (none for round 0, the moments), every member's masked
/// contribution back, signed over the lineage head it computed from,
/// summed; the round's own evidence is kept for the next. No model is
/// sent: each node computes it from the evidence. What was sent and received is
/// audited by a write started as the round ends (`behind`), once the write
/// of the round before (which overlapped this round's computation) has
/// succeeded: a failed audit write stops the run at the next round.
pub(super) async fn round(
    fed: &Federation<'_>,
    session: &Session,
    number: u32,
    previous: Option<&Evidence>,
    behind: &mut Option<dispatch::Behind>,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let deadline = Duration::from_secs(u64::from(fed.spec.round_deadline_seconds));
    // Each input with its member's certificate of this session.
    let previous = previous.map(|evidence| {
        round::evidence_to_wire(&with_current_certificates(evidence, &session.certificates))
    });
    let nodes = keep(&fed.registry.list(), &session.members);
    let (inputs, mut failures) = step(&nodes, deadline, |node| {
        let request = pb::SessionInputRequest {
            session: session.id.clone(),
            round: number,
            model_json: Vec::new(),
            previous: previous.clone(),
            confirmations: session.confirmations.clone(),
        };
        let slot = session.links.get(&node.id);
        async move {
            let sent = started.elapsed().as_secs_f64();
            let slot = slot.ok_or_else(|| "is not a member of the session".to_owned())?;
            let m = exchange(&node, slot, request).await?;
            let back = started.elapsed().as_secs_f64();
            let computed = (
                Computation::placed(sent, back, &m),
                AnswerTimes::of(sent, back, &m),
            );
            tracing::trace!(
                node = %node.id,
                sent = micros(sent),
                back = micros(back),
                handled = m.handled_micros,
                local_started = m.local_started_micros,
                local = m.local_micros,
                "session exchange"
            );
            if m.node != node.id {
                return Err(format!("sent a masked input as `{}`", m.node));
            }
            let parent: Head = m
                .lineage_parent
                .as_slice()
                .try_into()
                .map_err(|_| "sent a masked input without its lineage head".to_owned())?;
            let signature = m.lineage_signature.clone();
            Ok((round::masked_from_wire(m), (computed, (parent, signature))))
        }
    })
    .await;
    let answered_at = started.elapsed().as_secs_f64();
    settle(behind.take()).await?;
    let computations: Vec<Computation> = inputs.iter().map(|(_, (_, ((c, _), _)))| *c).collect();
    let answers: Vec<AnswerTimes> = inputs.iter().map(|(_, (_, ((_, a), _)))| *a).collect();
    let answered: Vec<String> = inputs.iter().map(|(id, _)| id.clone()).collect();
    let mut parents: Vec<Head> = Vec::new();
    let mut signed = Vec::new();
    let mut masked: Vec<MaskedInput> = Vec::new();
    for (_, (m, (_, (parent, signature)))) in inputs {
        parents.push(parent);
        signed.push(SignedInput {
            node: m.node.clone(),
            values: m.values.clone(),
            signature,
            certificate_pem: session
                .certificates
                .get(&m.node)
                .cloned()
                .unwrap_or_default(),
        });
        masked.push(m);
    }
    // Audited as sent and answered: a member gone from the registry was
    // sent nothing.
    let audited_failures = failures.clone();
    for member in &session.members {
        if !nodes.iter().any(|n| n.id == *member) {
            failures.push(NodeFailure {
                node_id: member.clone(),
                reason: "no longer registered".to_owned(),
            });
        }
    }
    let sum = failures
        .is_empty()
        .then(|| ghx_secagg::session::sum(&session.id, &session.members, session.dim, &masked));
    *behind = Some(dispatch::record_masked_behind(
        fed.audit,
        &sent(
            fed,
            &session.claims,
            ghx_audit::action::MASKED_INPUT,
            &session.request_sha256,
        ),
        masked.into_iter().map(|m| (m.node, m.values)).collect(),
        &audited_failures,
    ));
    let Some(sum) = sum else {
        return Ok(Outcome::Dropped { answered, failures });
    };
    let sum = sum?;
    // Every member computed from the same head, or the nodes' lineages
    // have parted: no evidence would convince all of them.
    let parent = parents[0];
    if parents.iter().any(|p| *p != parent) {
        return Err(Error::LineageParted {
            round: number,
            session: session.id.clone(),
        });
    }
    let evidence = Evidence {
        session: session.id.clone(),
        round: number,
        members: session.members.clone(),
        keys_sha256: session.keys_sha256,
        parent,
        inputs: signed,
    };
    let seconds = started.elapsed().as_secs_f64();
    // Where the round's time went, µs from its start (GHX_LOG=debug).
    tracing::debug!(
        round = number,
        first_start = micros(
            computations
                .iter()
                .map(|c| c.start)
                .fold(f64::MAX, f64::min)
        ),
        first_end = micros(computations.iter().map(|c| c.end).fold(f64::MAX, f64::min)),
        last_end = micros(computations.iter().map(|c| c.end).fold(0.0, f64::max)),
        answered = micros(answered_at),
        summed = micros(seconds),
        "session round timeline"
    );
    Ok(Outcome::Summed(Box::new(RoundSum {
        sum: ghx_secagg::decode(&sum),
        contributors: session.members.clone(),
        failures: session.left_out.clone(),
        node_metrics: Default::default(),
        seconds,
        local_seconds: Computation::longest(&computations),
        busy_seconds: Computation::busy_seconds(&computations),
        steps_ms: StepTimes {
            masked_ms: seconds * 1000.0,
            ..StepTimes::default()
        },
        last_answer_ms: AnswerTimes::of_last(&answers),
        keys_ahead: true,
        evidence: Some(evidence),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session_valid_for(seconds: i64) -> Session {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let training_json = manifest.trainings[0].canonical_json();
        Session {
            id: "s".to_owned(),
            members: vec!["a".to_owned(), "b".to_owned()],
            left_out: Vec::new(),
            claims: capability::claims_for(
                &manifest,
                "study-0001",
                vec!["a".to_owned(), "b".to_owned()],
                &training_json,
                time::Duration::seconds(seconds),
            ),
            request_sha256: String::new(),
            dim: 8,
            certificates: BTreeMap::new(),
            keys_sha256: [0; 32],
            confirmations: Vec::new(),
            links: HashMap::new(),
        }
    }

    #[test]
    fn a_session_is_replaced_before_half_its_capability_is_left() {
        let valid_for = Duration::from_secs(300);
        assert!(session_valid_for(300).fresh(valid_for));
        assert!(session_valid_for(200).fresh(valid_for));
        assert!(!session_valid_for(150).fresh(valid_for));
        assert!(!session_valid_for(-10).fresh(valid_for));
    }
}

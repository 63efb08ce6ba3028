//! A run's rounds: the moments, the training rounds of its session
//! (opened ahead of the round that needs it, redone among the members
//! left when one drops) and its evaluation, one step at a time
//! ([`advance`]); and external validations ([`validate`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::Instrument;

use ghx_learn::federated::{EvaluationSums, Phase};
use ghx_study::lineage;
use ghx_study::result::NodeFailure;
use ghx_study::training::ModelDocument;

use super::protocol::{
    ATTEMPTS, Error, Federation, Keyed, RoundSum, agree_keys, failures_text, quorum_error,
    secure_round, settle, with_retries,
};
use super::record::{Evaluation, EvaluationNoise, RoundRecord, RunStatus, TrainingRecord};
use super::session::{self, Session};
use crate::dispatch;

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
pub(super) const REJOIN_EVERY: u32 = 10;

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
                sum.steps_ms.open_ms = open_ms;
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
    let steps = &mut round.steps_ms;
    let on_path =
        steps.masked_ms + steps.unmask_ms + if round.keys_ahead { 0.0 } else { steps.open_ms };
    steps.rest_ms = (round.seconds * 1000.0 - on_path).max(0.0);
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
            steps_ms.rest_ms += update * 1000.0;
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

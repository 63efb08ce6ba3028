//! The node's side of a training round's steps and of a run's session,
//! as gRPC handlers: admission at step 1 (gate, participants, the
//! evaluation limit, the training's rows), the relayed keys checked against
//! their signers, and the masked contribution computed from the model a
//! round may use (the sender's for an external validation, the node's own
//! lineage in a run), charged where it is noised, signed for the lineage
//! and audited.

use ghx_audit::Decision;
use std::sync::Arc;

use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use ghx_study::query;
use ghx_study::training::ModelDocument;

use super::runs::Sealing;
use super::{ApiError, NodeApi, audit_entry, micros, note_capability};
use crate::gate;
use crate::store::AuditEntry;
use crate::training::{self, Phase};

impl NodeApi {
    /// Step 1 of a round: admits it under its capability, reads the
    /// training's rows (once per run) and starts secure aggregation with
    /// keys signed by this node; the contribution is computed at step 3.
    /// Audited.
    pub(super) fn round_advertise(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
    ) -> Result<pb::RoundAdvertiseResponse, ApiError> {
        self.admitted_round(caller, message, false, |api, admitted| {
            let round = admitted.params.round.clone();
            let advertise = api.inner.rounds.start(
                admitted.params,
                &api.inner.node_id,
                &admitted.origin,
                admitted.work,
                admitted.lifetime,
            )?;
            let (signature, certificate_pem) = api.sign_keys(&advertise.statement(&round))?;
            Ok(pb::RoundAdvertiseResponse {
                keys: Some(pb::AdvertisedKeys {
                    signature,
                    certificate_pem,
                    ..ghx_proto::round::advertise_to_wire(&advertise)
                }),
            })
        })
    }

    /// Opens a training run's session: admitted as a round's step 1 (a
    /// training phase only), refused up front when this node's rows are
    /// too few for the cell size, keyed once for the run. Audited.
    pub(super) fn session_open(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
    ) -> Result<pb::SessionOpenResponse, ApiError> {
        self.admitted_round(caller, message, true, |api, admitted| {
            training::check_enough(&admitted.work.data, admitted.work.min_cell_size)?;
            let session = admitted.params.round.clone();
            let keys = api.inner.rounds.open_session(
                admitted.params,
                &api.inner.node_id,
                &admitted.origin,
                admitted.work,
                admitted.lifetime,
            )?;
            let (signature, certificate_pem) = api.sign_keys(&keys.statement(&session))?;
            Ok(pb::SessionOpenResponse {
                keys: Some(pb::SessionKeys {
                    signature,
                    certificate_pem,
                    ..ghx_proto::round::session_keys_to_wire(&keys)
                }),
            })
        })
    }

    /// Signs a statement of this node's round or session keys with its
    /// certificate key: (signature, certificate PEM).
    pub(super) fn sign_keys(&self, statement: &[u8]) -> Result<(Vec<u8>, String), ApiError> {
        let (identity, _) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let current = identity.current_pem();
        let signature = ghx_pki::signed::sign(&current.key_pem, statement)
            .map_err(|e| training::Error::Signing(e.to_string()))?;
        Ok((signature, current.cert_pem))
    }

    /// Admits a round or (`session`) a run's session under its capability
    /// and reads the training's rows (once per run), then `start`s it;
    /// audits the outcome either way. A training round is computed only in
    /// a run's session, whose vectors hold the moments (round 0) or a
    /// training round's; a one-off round is an evaluation (a run's, or an
    /// external validation). A run's session or evaluation must be
    /// sealable to the rows read now (`sealed`).
    fn admitted_round<T>(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
        session: bool,
        start: impl FnOnce(&NodeApi, AdmittedRound) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let started = std::time::Instant::now();
        self.load_rotated_key(caller, &message.capability);
        let inner = &self.inner;
        let phase_name = message.phase.clone();
        let mut entry = AuditEntry {
            query_sha256: query::digest(&message.training_json),
            ..audit_entry(caller, ghx_audit::action::round(&phase_name))
        };
        let facts = gate::NodeFacts {
            node_id: &inner.node_id,
            min_cell_size: inner.min_cell_size,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        // An admitted evaluation counts against the study's limit until its
        // audit entry is written.
        let mut reservation = None;
        let outcome = (|| -> Result<T, ApiError> {
            // The caller's role before anything it sent is read.
            Self::require_coordinator(caller)?;
            let phase = Phase::parse(&message.phase)
                .ok_or_else(|| training::Error::Phase(message.phase.clone()))?;
            match (session, phase) {
                (true, Phase::Train) if message.run.is_empty() => {
                    return Err(training::Error::SessionWithoutRun.into());
                }
                (true, Phase::Train) => {}
                (true, other) => {
                    return Err(training::Error::SessionPhase(other.name().to_owned()).into());
                }
                (false, Phase::Train) => return Err(training::Error::TrainOutsideRun.into()),
                (false, Phase::Moments) => {
                    return Err(training::Error::MomentsOutsideRun.into());
                }
                (false, Phase::Evaluate) => {}
            }
            let params = ghx_proto::round::params_from_wire(message.params.unwrap_or_default())
                .map_err(ApiError::Malformed)?;
            let action = if phase == Phase::Evaluate {
                crate::policy::Action::Evaluation
            } else {
                crate::policy::Action::Training
            };
            let admitted = {
                let verifier = self.verifier()?;
                tracing::info_span!("gate")
                    .in_scope(|| {
                        gate::admit_training(
                            &verifier,
                            &inner.store,
                            &inner.policy,
                            facts,
                            gate::Request {
                                caller,
                                token: &message.capability,
                                query_json: &message.training_json,
                                manifest_json: &message.manifest_json,
                            },
                            action,
                        )
                    })
                    .inspect_err(|e| {
                        if let gate::Error::Forbidden { decision, .. } = e {
                            entry.policy_reasons = decision.summary();
                        }
                    })?
            };
            note_capability(&mut entry, &admitted.claims);
            entry.policy_reasons = admitted.access.summary();
            let spec = &admitted.training;
            let expected = if session {
                ghx_learn::federated::session_len(spec.features.len(), spec.param_count())
            } else {
                phase.len(spec.features.len(), spec.param_count())
            };
            if params.dim != expected {
                return Err(training::Error::Dimension {
                    round: params.round.clone(),
                    phase: phase.name().to_owned(),
                    got: params.dim,
                    expected,
                }
                .into());
            }
            inner
                .sums
                .check(
                    &inner.store,
                    &admitted.claims.sub,
                    &params.round,
                    &params.participants,
                )
                .and_then(|()| {
                    crate::participants::check_threshold(
                        &params.round,
                        params.threshold,
                        params.participants.len(),
                    )
                })
                .map_err(training::Error::from)?;
            // Every evaluation is noised here, at the epsilon the training
            // declares for it: an external validation scores the held-out
            // patients with a model the requester chose, and a run's
            // evaluation is summed into a 100-bin histogram the coordinator
            // sees before merging, whose tails hold a few patients.
            let validation = match phase {
                Phase::Evaluate => Some(
                    spec.validation
                        .ok_or_else(|| training::Error::ValidationUndeclared(spec.name.clone()))?
                        .epsilon,
                ),
                _ => None,
            };
            // Each evaluation scores the held-out patients with a model
            // someone chose: a study has a limited number of them here.
            if phase == Phase::Evaluate {
                let study = &admitted.claims.sub;
                let action = ghx_audit::action::round(Phase::Evaluate.name());
                let admitted_one = inner
                    .evaluations
                    .reserve(study, || {
                        inner
                            .audit
                            .count(study, &action, ghx_audit::Decision::Answered.as_str())
                    })
                    .map_err(|refusal| match refusal {
                        crate::evaluations::Refusal::Spent { study, limit } => {
                            ApiError::from(training::Error::Evaluations { study, limit })
                        }
                        crate::evaluations::Refusal::Count(e) => ApiError::from(e),
                    })?;
                reservation = Some(admitted_one);
            }
            let prepared = tracing::info_span!("consent")
                .in_scope(|| inner.eligibility.prepare(&inner.store, &admitted.consent))?;
            entry.consent_excluded =
                i64::try_from(prepared.summary.excluded_total()).unwrap_or(i64::MAX);
            // Rows are kept per consent context and data generation: an
            // import since is read afresh (a new run must see it).
            let key = format!(
                "{}/{}/{}/{}",
                admitted.claims.sub,
                entry.query_sha256,
                prepared.context,
                inner.store.data_generation()?
            );
            let data = {
                let _engine = tracing::info_span!("engine").entered();
                inner.rounds.data(&key, || {
                    training::extract(
                        &inner.store,
                        spec,
                        &prepared.context,
                        &inner.policy.consent.sensitive,
                    )
                })?
            };
            // A run's session or evaluation over rows it cannot be sealed
            // to is refused here, before anything is keyed.
            if !message.run.is_empty() {
                self.sealed(
                    Sealing {
                        run: crate::store::RunKey {
                            study_id: &admitted.claims.sub,
                            training_sha256: &entry.query_sha256,
                            run_id: &message.run,
                        },
                        organisation: &admitted.claims.org,
                        data: &data,
                        min_cell_size: admitted.min_cell_size,
                    },
                    false,
                )?;
            }
            // Steps 2 to 4 must all happen within the round's deadline.
            let lifetime =
                std::time::Duration::from_secs(u64::from(spec.round_deadline_seconds) * 4 + 30);
            entry.reason = format!(
                "round {}: admitted over [{}]; {} training and {} held-out patients, {} left out for missing features",
                params.round,
                params.participants.join(", "),
                data.train.len(),
                data.holdout.len(),
                data.incomplete,
            );
            let participants = params.participants.clone();
            start(
                self,
                AdmittedRound {
                    params,
                    origin: training::RoundOrigin {
                        study: admitted.claims.sub.clone(),
                        capability: admitted.claims.jti.clone(),
                        request_sha256: entry.query_sha256.clone(),
                        participants,
                    },
                    work: Arc::new(training::RoundWork {
                        phase,
                        spec: admitted.training,
                        data,
                        standardised: Default::default(),
                        min_cell_size: admitted.min_cell_size,
                        claims: admitted.claims,
                        manifest: Arc::new(admitted.manifest),
                        validation,
                        run: message.run.clone(),
                    }),
                    lifetime,
                },
            )
        })();
        entry.decision = match &outcome {
            Ok(_) => Decision::Answered.into(),
            Err(e) => {
                entry.reason = e.to_string();
                Decision::Refused.into()
            }
        };
        let settled = self.settle("training", started, &entry, &outcome);
        drop(reservation);
        settled?;
        tracing::info!(
            study = %entry.study_id, phase = %phase_name, decision = %entry.decision,
            "training round"
        );
        outcome
    }

    /// Step 2: every advertised key must be signed by its node's
    /// certificate key (so the coordinator relaying them cannot substitute
    /// its own); then this node's shares, encrypted to each node.
    pub(super) fn round_share_keys(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundShareKeysRequest,
    ) -> Result<pb::RoundShareKeysResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let round = &message.round;
        let advertised = self.vouched(
            round,
            message.advertised,
            |w| {
                let signed = (w.certificate_pem.clone(), w.signature.clone());
                Ok((ghx_proto::round::advertise_from_wire(w)?, signed))
            },
            |k| (k.node.clone(), k.statement(round)),
        )?;
        let shares = self.inner.rounds.share_keys(&message.round, &advertised)?;
        Ok(pb::RoundShareKeysResponse {
            shares: shares
                .into_iter()
                .map(ghx_proto::round::share_to_wire)
                .collect(),
        })
    }

    pub(super) fn require_coordinator(caller: &PeerIdentity) -> Result<(), ApiError> {
        if caller.role == ghx_pki::Role::Coordinator {
            Ok(())
        } else {
            Err(gate::Error::NotCoordinator {
                name: caller.name.clone(),
                role: caller.role,
            }
            .into())
        }
    }

    /// Step 3, the only step that computes and releases the contribution
    /// (masked). Audited.
    pub(super) fn round_masked(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundMaskedInputRequest,
        received: std::time::Instant,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let (origin, work) = self.inner.rounds.begin_masked(&message.round)?;
        // A run's evaluation scores the model this node computed for the
        // run's last round, whatever model is sent; an external validation
        // the sender's, noised.
        let source = if work.run.is_empty() {
            Source::Supplied(&message.model_json)
        } else {
            let previous = message
                .previous
                .map(ghx_proto::round::evidence_from_wire)
                .transpose()
                .map_err(ApiError::Malformed)?;
            Source::Evaluated(previous)
        };
        let release = Release {
            label: &message.round,
            charge_id: &work.claims.jti,
            origin: &origin,
            work: &work,
            phase: work.phase,
            source,
            in_session: false,
            received,
        };
        self.release_masked(
            caller,
            release,
            || Ok(()),
            |values, _| {
                let shares: Vec<_> = message
                    .shares
                    .into_iter()
                    .map(ghx_proto::round::share_from_wire)
                    .collect();
                Ok(self
                    .inner
                    .rounds
                    .masked_input(&message.round, &shares, values)?)
            },
        )
    }

    /// Round n of a training run's session: the model it computes from is
    /// this node's own, moved along the run's lineage by the evidence of
    /// the round before (checked before the round number is claimed, so a
    /// refused request burns none); the number is claimed (never masked
    /// twice), the capability must be unexpired, then as step 3, and the
    /// masked input is signed for the lineage. Audited.
    pub(super) fn session_input(
        &self,
        caller: &PeerIdentity,
        message: pb::SessionInputRequest,
        received: std::time::Instant,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        Self::require_coordinator(caller)?;
        // Every member agreed the keys this node did, before anything is
        // read or masked (THREATS 4(4)(c)).
        let (_, members) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let confirmations: Vec<(String, Vec<u8>)> = message
            .confirmations
            .into_iter()
            .map(|c| (c.node, c.signature))
            .collect();
        self.inner.rounds.confirm_session(
            &message.session,
            &self.inner.node_id,
            &confirmations,
            members,
        )?;
        let (origin, work, keys_sha256) = self.inner.rounds.session_work(&message.session)?;
        let previous = message
            .previous
            .map(ghx_proto::round::evidence_from_wire)
            .transpose()
            .map_err(ApiError::Malformed)?;
        let label = format!("{} round {}", message.session, message.round);
        let charge_id = format!("{}/round-{}", work.claims.jti, message.round);
        let release = Release {
            label: &label,
            charge_id: &charge_id,
            origin: &origin,
            work: &work,
            // The moments are a run's round 0.
            phase: if message.round == 0 {
                Phase::Moments
            } else {
                Phase::Train
            },
            source: Source::Lineage(LineageRound {
                session: &message.session,
                round: message.round,
                previous,
                keys_sha256,
            }),
            in_session: true,
            received,
        };
        self.release_masked(
            caller,
            release,
            || {
                self.inner
                    .rounds
                    .begin_session_round(&message.session, message.round)?;
                Ok(())
            },
            |values, head| {
                let len = ghx_learn::federated::session_len(
                    work.spec.features.len(),
                    work.spec.param_count(),
                );
                let padded = ghx_learn::federated::padded(values, len);
                // A session round always has a lineage step.
                let head = head.ok_or_else(|| {
                    ApiError::Task("a session round without a lineage step".to_owned())
                })?;
                Ok(self.inner.rounds.session_masked_input(
                    &message.session,
                    message.round,
                    head,
                    &padded,
                )?)
            },
        )
    }

    /// Relays a session's keys: every member's key must be signed by its
    /// node's certificate key, as at a round's step 2; nothing is dealt.
    pub(super) fn session_agree(
        &self,
        caller: &PeerIdentity,
        message: pb::SessionAgreeRequest,
    ) -> Result<pb::SessionAgreeResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let session = &message.session;
        // The certificates that vouch for the keys: members' confirmations
        // are checked against them.
        let certificates = message
            .keys
            .iter()
            .map(|k| (k.node.clone(), k.certificate_pem.clone()))
            .collect();
        let keys = self.vouched_session_keys(session, message.keys)?;
        let inner = &self.inner;
        let statement =
            inner
                .rounds
                .agree_session(session, &keys, certificates, |origin, members| {
                    Ok(inner
                        .sums
                        .check(&inner.store, &origin.study, session, members)?)
                })?;
        let (confirmation, _) = self.sign_keys(&statement)?;
        Ok(pb::SessionAgreeResponse { confirmation })
    }

    /// The members' session keys the coordinator relayed for `session`,
    /// each checked against its signer ([`Self::vouched`]): a run's
    /// session or a pooled query's.
    pub(super) fn vouched_session_keys(
        &self,
        session: &str,
        keys: Vec<pb::SessionKeys>,
    ) -> Result<Vec<ghx_secagg::session::SessionKeys>, ApiError> {
        self.vouched(
            session,
            keys,
            |w| {
                let signed = (w.certificate_pem.clone(), w.signature.clone());
                Ok((ghx_proto::round::session_keys_from_wire(w)?, signed))
            },
            |k| (k.node.clone(), k.statement(session)),
        )
    }

    /// Reads the keys of `round` (a round or a session) the coordinator
    /// relayed, each with (certificate PEM, signature), and checks that
    /// every other node's were signed by that node: `statement` says whose
    /// keys they are and what was signed. This node's own keys are checked
    /// against what it made, by its secagg client.
    pub(super) fn vouched<W, K>(
        &self,
        round: &str,
        wires: Vec<W>,
        read: impl Fn(W) -> Result<(K, (String, Vec<u8>)), String>,
        statement: impl Fn(&K) -> (String, Vec<u8>),
    ) -> Result<Vec<K>, ApiError> {
        let (_, members) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let mut out = Vec::with_capacity(wires.len());
        for wire in wires {
            let (keys, (certificate, signature)) = read(wire).map_err(ApiError::Malformed)?;
            let (node, signed) = statement(&keys);
            if node != self.inner.node_id {
                training::check_keys(members, round, &node, &signed, (&certificate, &signature))?;
            }
            out.push(keys);
        }
        Ok(out)
    }

    /// The model a round computes from, and for a run's round the lineage
    /// step it was reached by (the session round, when it is one, and the
    /// head its input is signed over). A run's rounds never read a model
    /// the coordinator sends.
    fn model_for<'s>(
        &self,
        origin: &training::RoundOrigin,
        work: &training::RoundWork,
        source: &'s Source<'s>,
    ) -> Result<RoundModel<'s>, ApiError> {
        let spec = &work.spec;
        let (at, previous) = match source {
            // One-off rounds are external validations only (step 1).
            Source::Supplied(json) => {
                return Ok(RoundModel {
                    model: Some(
                        ModelDocument::parse_for(json, spec).map_err(training::Error::from)?,
                    ),
                    lineage: None,
                    seed: None,
                });
            }
            // A run has the rounds its training declares, 0 (the moments)
            // to `rounds`, and no more.
            Source::Lineage(at) if at.round > spec.rounds => {
                return Err(training::Error::PastLastRound {
                    round: at.round,
                    rounds: spec.rounds,
                }
                .into());
            }
            Source::Lineage(at) => (Some(at), at.previous.as_ref()),
            Source::Evaluated(previous) => {
                let got = previous.as_ref().map_or(0, |e| e.round);
                if previous.is_some() && got != spec.rounds {
                    return Err(training::Error::NotFinal {
                        got,
                        rounds: spec.rounds,
                    }
                    .into());
                }
                (None, previous.as_ref())
            }
        };
        let (_, keys) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let run = crate::store::RunKey {
            study_id: &origin.study,
            training_sha256: &origin.request_sha256,
            run_id: &work.run,
        };
        let round = at.map_or(spec.rounds.saturating_add(1), |at| at.round);
        let sealing = || Sealing {
            run,
            organisation: &work.claims.org,
            data: &work.data,
            min_cell_size: work.min_cell_size,
        };
        // A new run refused for its rows, or for a budget that cannot pay
        // for it, starts no lineage (which would count against the runs a
        // training may have here).
        let known = self.sealed(sealing(), false)?;
        if at.is_some_and(|a| a.round == 0) && known.is_none() {
            self.check_affordable(work, &origin.request_sha256)?;
        }
        let step = crate::lineage::advance(
            &self.inner.store,
            keys,
            crate::lineage::At {
                run,
                round,
                members: &origin.participants,
                max_runs: self.inner.max_runs,
                // Each node evaluates a run at one step only: going back
                // to a sibling of its last would let evaluations that mix
                // members on sibling steps isolate one node's difference.
                may_rewind: at.is_some(),
            },
            previous,
            spec,
        )
        .map_err(training::Error::from)?;
        // A sealed run's secret was read above: one read per round.
        let secret = match known {
            Some(secret) => secret,
            None => self
                .sealed(sealing(), true)?
                .ok_or_else(|| training::Error::Unsealed(work.run.clone()))?,
        };
        let digest = work.data.digest();
        Ok(RoundModel {
            model: step.model,
            // A round's shuffle and DP noise, or the evaluation's noise
            // (round R + 1): a redo draws the same.
            seed: Some(training::round_seed(&secret, &step.parent, round, &digest)),
            lineage: Some((at, step.parent)),
        })
    }

    /// Computes and releases a round's masked contribution: the study must
    /// still stand (and, in a session, the capability be unexpired), and a
    /// noised training round is charged to the budget ledger before
    /// anything leaves; `mask` masks the contribution. Audited.
    fn release_masked(
        &self,
        caller: &PeerIdentity,
        release: Release<'_>,
        claim: impl FnOnce() -> Result<(), ApiError>,
        mask: impl FnOnce(
            &[f64],
            Option<&ghx_study::lineage::Head>,
        ) -> Result<ghx_secagg::MaskedInput, ApiError>,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        let Release {
            label,
            charge_id,
            origin,
            work,
            phase,
            source,
            in_session,
            received,
        } = release;
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let mut entry = AuditEntry {
            query_sha256: origin.request_sha256.clone(),
            ..audit_entry(caller, ghx_audit::action::MASKED_INPUT)
        };
        note_capability(&mut entry, &work.claims);
        let (mut checked_at, mut computed_at) = (None, None);
        let outcome = (|| -> Result<pb::RoundMaskedInputResponse, ApiError> {
            if inner.store.is_revoked(&origin.study)? {
                return Err(gate::Error::Revoked {
                    study: origin.study.clone(),
                }
                .into());
            }
            if in_session && time::OffsetDateTime::now_utc().unix_timestamp() >= work.claims.exp {
                return Err(training::Error::CapabilityExpired(label.to_owned()).into());
            }
            // A session round's sum is over its nodes as soon as every one
            // has sent its input: the study is bound to them from now on.
            // A one-off round binds when it is unmasked.
            let sums = &inner.sums;
            let (study, nodes) = (&origin.study, &origin.participants);
            if in_session {
                sums.bind(&inner.store, study, label, nodes)
            } else {
                sums.check(&inner.store, study, label, nodes)
            }
            .map_err(training::Error::from)?;
            let RoundModel {
                model,
                lineage,
                seed,
            } = self.model_for(origin, work, &source)?;
            claim()?;
            let computing = std::time::Instant::now();
            checked_at = Some(computing);
            let contribution = {
                let _engine = tracing::info_span!("engine").entered();
                training::contribution(
                    phase,
                    &work.spec,
                    (&work.data, &work.standardised),
                    (model.as_ref(), seed),
                    work.min_cell_size,
                    work.validation,
                )?
            };
            computed_at = Some(std::time::Instant::now());
            let local_micros = micros(computing.elapsed());
            let local_started_micros = micros(computing.saturating_duration_since(received));
            // A noised training round is paid for before it is released:
            // the growth of the training's epsilon from the rounds this
            // node already charged for it (over every run) to one more.
            let budget_note = match (&work.spec.privacy, phase, work.validation) {
                (Some(privacy), Phase::Train, _) => {
                    let _charging = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
                    let charged = inner.store.privacy_charges_for(
                        &work.claims.org,
                        &work.claims.sub,
                        &origin.request_sha256,
                    )?;
                    let cost = privacy.round_charge(charged + 1);
                    let note = self.budget().charge(
                        charge_id,
                        &work.claims,
                        &work.manifest,
                        &origin.request_sha256,
                        cost,
                    )?;
                    entry.epsilon = cost.0;
                    Some(format!(
                        "{note}; this training's noised rounds here: {} (epsilon {:.4} at delta {:e})",
                        charged + 1,
                        privacy.epsilon_after(charged + 1),
                        privacy.delta
                    ))
                }
                // An evaluation, under its own digest (the model's, or the
                // run's): the ledger counts a training's noised rounds by
                // the training's. One charge, atomic in the ledger: no lock
                // needed (a DP round's lock keeps its count and charge
                // together).
                (_, Phase::Evaluate, Some(epsilon)) => {
                    let (evaluated, kind) = match &source {
                        Source::Supplied(json) => (ghx_audit::digest(json), "validation"),
                        _ => (
                            ghx_audit::digest(
                                format!("{} run {}", origin.request_sha256, work.run).as_bytes(),
                            ),
                            "run's evaluation",
                        ),
                    };
                    // A run's evaluation redone gives the same noised counts
                    // (its noise is drawn from the run's seed): paid once.
                    let paid = matches!(source, Source::Evaluated(_))
                        && inner.store.privacy_charges_for(
                            &work.claims.org,
                            &work.claims.sub,
                            &evaluated,
                        )? > 0;
                    if paid {
                        Some(format!(
                            "the {kind}'s counts noised at epsilon {epsilon} as when first \
                             computed, and charged then"
                        ))
                    } else {
                        let note = self.budget().charge(
                            charge_id,
                            &work.claims,
                            &work.manifest,
                            &evaluated,
                            (epsilon, 0.0),
                        )?;
                        entry.epsilon = epsilon;
                        Some(format!(
                            "{note}; the {kind}'s counts noised at epsilon {epsilon}"
                        ))
                    }
                }
                _ => None,
            };
            let masked = mask(&contribution.values, lineage.as_ref().map(|(_, head)| head))?;
            entry.result_sha256 = ghx_audit::digest_words(&masked.values);
            entry.result_cells = i64::try_from(masked.values.len()).unwrap_or(i64::MAX);
            // A run's round: the masked input signed for the lineage, so
            // every member can check the sum the next round is read from.
            let (lineage_signature, lineage_parent) = match &lineage {
                Some((Some(at), parent)) => {
                    let statement = ghx_study::lineage::InputStatement {
                        study: &origin.study,
                        training_sha256: &origin.request_sha256,
                        run: &work.run,
                        session: at.session,
                        round: at.round,
                        parent,
                        keys_sha256: &at.keys_sha256,
                        members: &origin.participants,
                        node: &inner.node_id,
                        masked: &masked.values,
                    };
                    let (signature, _) = self.sign_keys(&statement.bytes())?;
                    (signature, parent.to_vec())
                }
                _ => (Vec::new(), Vec::new()),
            };
            entry.reason = format!(
                "round {}: sent the masked contribution ({} values){}{}",
                label,
                masked.values.len(),
                lineage
                    .as_ref()
                    .map(|(_, parent)| format!(
                        "; computed from lineage head {}",
                        hex::encode(parent)
                    ))
                    .unwrap_or_default(),
                budget_note.map(|n| format!("; {n}")).unwrap_or_default()
            );
            let node_metrics_json = match &contribution.metrics {
                Some(m) => serde_json::to_vec(m).map_err(|e| ApiError::Task(e.to_string()))?,
                None => Vec::new(),
            };
            Ok(pb::RoundMaskedInputResponse {
                local_micros,
                local_started_micros,
                node_metrics_json,
                lineage_signature,
                lineage_parent,
                ..ghx_proto::round::masked_to_wire(masked)
            })
        })();
        entry.decision = match &outcome {
            Ok(_) => Decision::Answered.into(),
            Err(e) => {
                entry.reason = e.to_string();
                Decision::Refused.into()
            }
        };
        let masked_at = std::time::Instant::now();
        self.settle("masked input", started, &entry, &outcome)?;
        // Where the handler's time went, µs from receiving the request
        // (GHX_LOG=ghx_node::api=debug).
        let us = |at: std::time::Instant| micros(at.saturating_duration_since(received));
        tracing::debug!(
            label,
            started = us(started),
            checked = us(checked_at.unwrap_or(started)),
            computed = us(computed_at.unwrap_or(started)),
            masked = us(masked_at),
            audited = us(std::time::Instant::now()),
            "masked input timeline"
        );
        outcome
    }
}

/// A round or session admitted at step 1, to be started.
struct AdmittedRound {
    params: ghx_secagg::RoundParams,
    origin: training::RoundOrigin,
    work: Arc<training::RoundWork>,
    /// How long the round (or session, past its last use) is kept.
    lifetime: std::time::Duration,
}

/// What a masked contribution is computed for.
struct Release<'a> {
    /// The round, as the audit entry names it.
    label: &'a str,
    /// The round's charge in the privacy ledger, if it is noised.
    charge_id: &'a str,
    origin: &'a training::RoundOrigin,
    work: &'a training::RoundWork,
    /// What the round computes: the moments, a training round or an
    /// evaluation.
    phase: Phase,
    source: Source<'a>,
    /// A session round: the capability must still be unexpired.
    in_session: bool,
    /// When the node's handler received the request.
    received: std::time::Instant,
}

/// Where a round's model comes from.
enum Source<'a> {
    /// The sender's: an external validation, the only one-off round.
    Supplied(&'a [u8]),
    /// A run's session round: the node's own lineage, moved by the
    /// evidence of the round before.
    Lineage(LineageRound<'a>),
    /// A run's evaluation: the model after the run's last round, by its
    /// evidence.
    Evaluated(Option<ghx_study::lineage::Evidence>),
}

/// The model a round computes from and, for a run's round, the lineage
/// step it was reached by: the session round, when it is one, and the head
/// its input is signed over.
/// A run's round also has the seed of its randomness.
struct RoundModel<'s> {
    model: Option<ModelDocument>,
    lineage: Option<(Option<&'s LineageRound<'s>>, ghx_study::lineage::Head)>,
    seed: Option<[u8; 32]>,
}

/// A session round of a run.
struct LineageRound<'a> {
    session: &'a str,
    round: u32,
    /// The evidence of round `round - 1`; none for round 0.
    previous: Option<ghx_study::lineage::Evidence>,
    keys_sha256: ghx_study::lineage::Head,
}

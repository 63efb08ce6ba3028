//! The exchange's handler: admit the request (`crate::exchange`), record
//! the disclosure in the audit log and the disclosure ledger before any
//! part leaves, then seal and send the parts one at a time, asking the
//! patient's consent again before each, so a withdrawal stops the
//! transfer at the next part (the recipient is told to discard it).

use std::collections::VecDeque;

use ghx_audit::Decision;
use ghx_exchange::part::Outcome;
use ghx_exchange::records::{self, Hospital, Outgoing};
use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::{ApiError, NodeApi, audit_entry, status};
use crate::consent::ConsentRequest;
use crate::exchange::{self, Answer, Refusal};
use crate::store::{AuditEntry, Disclosure};

/// The audit action of a decided exchange request (the coordinator
/// records relaying it under the same name).
pub(super) const ACTION: &str = ghx_audit::action::EXCHANGE;
/// The audit action of a transfer stopped before its end.
const STOPPED: &str = "exchange:stopped";
/// Longest a part waits for the recipient to take the one before.
const SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// An admitted transfer, ready to send.
pub(super) struct Transfer {
    outgoing: Outgoing,
    bundles: VecDeque<(Value, u64)>,
    /// The patient and the consent question asked again between parts,
    /// when anything is sent.
    recheck: Option<(String, ConsentRequest)>,
    request_id: String,
    entry: AuditEntry,
}

impl NodeApi {
    /// Decides an exchange request and records the decision; refusals are
    /// audited and returned.
    pub(super) fn exchange_open(
        &self,
        caller: &PeerIdentity,
        message: pb::ExchangeRequest,
    ) -> Result<Transfer, ApiError> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let mut entry = AuditEntry {
            query_sha256: hex::encode(Sha256::digest(message.request.as_bytes())),
            ..audit_entry(caller, ACTION)
        };
        let outcome = (|| -> Result<Transfer, ApiError> {
            Self::require_coordinator(caller)?;
            let Some((identity, members)) = &inner.round_keys else {
                return Err(Refusal::Off.into());
            };
            let key = ghx_exchange::keys::SignedKey {
                statement: message.key_statement,
                signature: message.key_signature,
                certificate_pem: message.recipient_certificate_pem,
            };
            let admitted = exchange::admit(
                &inner.exchange,
                &inner.identity_keys,
                members,
                &inner.store,
                &inner.node_id,
                &message.request,
                &key,
            )?;
            let claims = &admitted.claims;
            entry.capability_id = claims.jti.clone();
            entry.purpose = claims.purpose.clone();
            entry.requester = claims.recipient.clone();
            let now = time::OffsetDateTime::now_utc();
            let answer = exchange::prepare(
                &inner.store,
                &inner.policy.consent,
                &inner.exchange,
                (&inner.node_id, &inner.display_name),
                &admitted,
                now.unix_timestamp(),
            )?;
            let pem = identity.current_pem();
            let outgoing = Outgoing::new(
                &admitted.recipient_key,
                &claims.jti,
                &inner.node_id,
                &pem.key_pem,
                &pem.cert_pem,
            )
            .map_err(|e| ApiError::Malformed(e.to_string()))?;
            let recorded = ghx_audit::now_rfc3339();
            match answer {
                Answer::Nothing { why } => {
                    entry.reason = format!("nothing disclosed to {}: {why}", claims.recipient);
                    Ok(Transfer {
                        outgoing,
                        bundles: VecDeque::new(),
                        recheck: None,
                        request_id: claims.jti.clone(),
                        entry: entry.clone(),
                    })
                }
                Answer::Records(records) => {
                    let hospital = Hospital {
                        id: inner.node_id.clone(),
                        name: inner.display_name.clone(),
                    };
                    let bundles = records::bundles(
                        &records.resources,
                        &hospital,
                        &recorded,
                        usize::try_from(inner.exchange.part_bytes).unwrap_or(usize::MAX),
                    );
                    let mut digest = Sha256::new();
                    for (bundle, _) in &bundles {
                        digest.update(bundle.to_string().as_bytes());
                    }
                    let sha256 = hex::encode(digest.finalize());
                    let count = records.resources.len() as i64;
                    entry.result_cells = count;
                    // The patient is named in the disclosure ledger (by this
                    // request's id), not in the log the committee may read.
                    entry.reason = format!(
                        "{count} resources ({} bytes) in {} parts to {}, {} withheld by consent or sensitivity; content sha256 {sha256}",
                        records.bytes,
                        bundles.len(),
                        claims.recipient,
                        records.withheld,
                    );
                    inner.store.record_disclosure(&Disclosure {
                        patient_id: records.patient.clone(),
                        request_id: claims.jti.clone(),
                        recipient: claims.recipient.clone(),
                        purpose: claims.purpose.clone(),
                        scope: match claims.kind {
                            ghx_exchange::request::Kind::Records => claims.scope.clone(),
                            ghx_exchange::request::Kind::History => "history".to_owned(),
                        },
                        disclosed_at: recorded,
                        resources: count,
                        sha256,
                        outcome: "sent".to_owned(),
                    })?;
                    Ok(Transfer {
                        outgoing,
                        bundles: bundles.into(),
                        recheck: Some((records.patient, records.request)),
                        request_id: claims.jti.clone(),
                        entry: entry.clone(),
                    })
                }
            }
        })();
        match &outcome {
            Ok(_) => entry.decision = Decision::Answered.into(),
            Err(e) => {
                entry.decision = Decision::Refused.into();
                entry.reason = e.to_string();
            }
        }
        if let Err(e) = self.settle(ACTION, started, &entry, &outcome) {
            // Nothing is sent unaudited; the ledger says so.
            if let Ok(t) = &outcome
                && t.recheck.is_some()
            {
                let _ = inner
                    .store
                    .end_disclosure(&t.request_id, "not sent: the audit log failed");
            }
            return Err(e);
        }
        tracing::info!(decision = %entry.decision, resources = entry.result_cells, "exchange request");
        outcome
    }

    /// Seals and sends the parts, the consent asked again before each; on
    /// the blocking pool (it reads the store and signs).
    pub(super) fn exchange_send(
        &self,
        mut transfer: Transfer,
        frames: tokio::sync::mpsc::Sender<Result<pb::ExchangeFrame, Status>>,
    ) {
        let total = transfer.bundles.len();
        let mut first = true;
        let runtime = tokio::runtime::Handle::current();
        let mut send = |ciphertext: Vec<u8>, outgoing: &Outgoing| {
            let frame = pb::ExchangeFrame {
                encapsulated_key: if first {
                    outgoing.encapsulated().to_vec()
                } else {
                    Vec::new()
                },
                ciphertext,
            };
            first = false;
            // A recipient that stops reading does not hold this thread.
            matches!(
                runtime.block_on(tokio::time::timeout(SEND_WAIT, frames.send(Ok(frame)))),
                Ok(Ok(()))
            )
        };
        let patient = transfer.recheck.as_ref().map(|(p, _)| p.clone());
        while let Some((bundle, count)) = transfer.bundles.pop_front() {
            if let Some((patient, request)) = &mut transfer.recheck {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                request.at = now;
                request.last = now;
                let still = exchange::permitted(
                    &self.inner.store,
                    &self.inner.policy.consent,
                    patient,
                    request,
                );
                if !matches!(still, Ok(Ok(_))) {
                    let why = match still {
                        Ok(Err(why)) => why.describe().to_owned(),
                        Ok(Ok(_)) => unreachable!(),
                        Err(e) => {
                            tracing::error!(error = %e, "consent could not be read again");
                            "consent could not be read again".to_owned()
                        }
                    };
                    let sent = total - transfer.bundles.len() - 1;
                    if let Ok(end) = transfer.outgoing.end(Some(patient), Outcome::Withdrawn) {
                        send(end, &transfer.outgoing);
                    }
                    self.exchange_stopped(
                        &transfer,
                        &format!("stopped after {sent} of {total} parts: {why}"),
                    );
                    return;
                }
            }
            let sealed = match transfer.outgoing.bundle(
                patient.as_deref().unwrap_or_default(),
                bundle,
                count,
            ) {
                Ok(sealed) => sealed,
                Err(e) => {
                    tracing::error!(error = %e, "a part could not be sealed");
                    let _ = frames.blocking_send(Err(status(&ApiError::Malformed(
                        "a part could not be sealed".to_owned(),
                    ))));
                    self.exchange_stopped(&transfer, "a part could not be sealed");
                    return;
                }
            };
            if !send(sealed, &transfer.outgoing) {
                self.exchange_stopped(&transfer, "the transfer was not read to its end");
                return;
            }
        }
        let outcome = if transfer.recheck.is_some() {
            Outcome::Complete
        } else {
            Outcome::Nothing
        };
        match transfer.outgoing.end(patient.as_deref(), outcome) {
            Ok(end) => {
                if !send(end, &transfer.outgoing) {
                    self.exchange_stopped(&transfer, "the transfer's end was not read");
                }
            }
            Err(e) => tracing::error!(error = %e, "the end part could not be sealed"),
        }
    }

    /// Records a transfer that stopped before its end: in the audit log
    /// (its own action, so reconciliation still pairs the request) and in
    /// the disclosure ledger.
    fn exchange_stopped(&self, transfer: &Transfer, why: &str) {
        let mut entry = AuditEntry {
            action: STOPPED.to_owned(),
            decision: "stopped".to_owned(),
            reason: why.to_owned(),
            at: ghx_audit::now_rfc3339(),
            ..transfer.entry.clone()
        };
        entry.result_cells = 0;
        if let Err(e) = self.inner.audit.append(&entry) {
            tracing::error!(error = %e, "a stopped transfer could not be audited");
        }
        if transfer.recheck.is_some()
            && let Err(e) = self
                .inner
                .store
                .end_disclosure(&transfer.request_id, &format!("stopped: {why}"))
        {
            tracing::error!(error = %e, "a stopped transfer could not be recorded");
        }
        tracing::info!(why, "exchange transfer stopped");
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::Exchange(r)
    }
}

//! The exchange's relay: a registered recipient's request, signed by the
//! platform's identity service, to each hospital it names, and each
//! hospital's sealed frames back, as they come.
//!
//! The coordinator reads the request's claims only to route and record it
//! (the hospitals verify the signature); it holds no key that opens a
//! frame. It records the relay before the first request leaves (its own
//! entry) and, per hospital, what it relayed (frames and the SHA-256 of
//! their bytes) for reconciliation with the hospital's own entry.

use futures::StreamExt;
use ghx_db::audit::AuditLog;
use ghx_pki::{PeerIdentity, Role};
use ghx_proto::v1 as pb;
use ghx_study::result::NodeFailure;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::dispatch::{self, Answer, Sent};
use crate::fanout::NodeRegistry;

/// Why a relay is refused before anything is sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("role {0} may not relay an exchange request; it needs role recipient")]
    Role(Role),
    #[error("the request is not readable: {0}")]
    Request(#[from] ghx_exchange::request::Error),
    #[error("the request names recipient `{named}`; the caller is `{caller}`")]
    OtherRecipient { named: String, caller: String },
    #[error("the request names no hospital")]
    NoHospital,
    #[error("the audit log could not record the relay: {0}")]
    Audit(#[from] ghx_db::audit::Error),
}

/// The relayed frames, as the recipient reads them.
pub type Relayed =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RelayedFrame, Status>> + Send>>;

/// Frames relayed ahead of the recipient's reading, over all hospitals.
const BUFFERED: usize = 4;

/// Starts relaying `request` from `caller` (a recipient) to the hospitals
/// it names.
pub fn relay(
    registry: &NodeRegistry,
    audit: &AuditLog,
    caller: &PeerIdentity,
    request: pb::ExchangeRequest,
) -> Result<Relayed, Error> {
    if caller.role != Role::Recipient {
        return Err(Error::Role(caller.role));
    }
    let claims = ghx_exchange::request::unverified_claims(&request.request)?;
    if claims.recipient != caller.name {
        return Err(Error::OtherRecipient {
            named: claims.recipient,
            caller: caller.name.clone(),
        });
    }
    if claims.aud.is_empty() {
        return Err(Error::NoHospital);
    }
    let request_sha256 = hex::encode(Sha256::digest(request.request.as_bytes()));
    audit.append(&ghx_audit::Entry {
        at: ghx_audit::now_rfc3339(),
        caller: caller.name.clone(),
        caller_role: caller.role.to_string(),
        caller_org: caller.organisation.clone(),
        source: caller.source.map(|a| a.to_string()).unwrap_or_default(),
        requester: caller.name.clone(),
        requester_org: caller.organisation.clone(),
        capability_id: claims.jti.clone(),
        action: "exchange:relay".to_owned(),
        decision: "sent".to_owned(),
        reason: format!("to {}", claims.aud.join(", ")),
        purpose: claims.purpose.clone(),
        query_sha256: request_sha256.clone(),
        ..ghx_audit::Entry::default()
    })?;
    let (frames, relayed) = tokio::sync::mpsc::channel(BUFFERED);
    let registered = registry.list();
    let mut tasks = Vec::new();
    for hospital in claims.aud.iter().cloned() {
        let frames = frames.clone();
        let node = registered.iter().find(|n| n.id == hospital).cloned();
        let request = request.clone();
        let deadline = registry.deadline();
        tasks.push(tokio::spawn(async move {
            let outcome = match node {
                Some(node) => relay_one(&node, request, deadline, &frames).await,
                None => Err(Failed::Refused(format!(
                    "`{hospital}` is not a hospital of this federation"
                ))),
            };
            match outcome {
                Ok(answer) => Ok((hospital, answer)),
                Err(failed) => {
                    let reason = match failed {
                        Failed::Refused(reason) => {
                            // The recipient hears why, in the stream.
                            let _ = frames.send(Ok(refusal(&hospital, &reason))).await;
                            reason
                        }
                        Failed::NotRead => "the recipient stopped reading".to_owned(),
                    };
                    Err(NodeFailure {
                        node_id: hospital,
                        reason,
                    })
                }
            }
        }));
    }
    drop(frames);
    // What was relayed, per hospital, once every hospital is done.
    let audit = audit.clone();
    let jti = claims.jti.clone();
    let purpose = claims.purpose.clone();
    let requester = caller.name.clone();
    let requester_org = caller.organisation.clone();
    tokio::spawn(async move {
        let mut answered = Vec::new();
        let mut failures = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(answer)) => answered.push(answer),
                Ok(Err(failure)) => failures.push(failure),
                Err(e) => tracing::error!(error = %e, "a relay task failed"),
            }
        }
        let sent = Sent {
            action: ghx_audit::action::EXCHANGE,
            study_id: "",
            capability_id: &jti,
            request_sha256,
            requester: &requester,
            requester_org: &requester_org,
            purpose: &purpose,
            epsilon: 0.0,
        };
        if let Err(e) = dispatch::record(&audit, &sent, answered, &failures) {
            tracing::error!(error = %e, "the audit log could not record a relayed exchange");
        }
    });
    Ok(Box::pin(futures::stream::unfold(
        relayed,
        |mut relayed| async move { relayed.recv().await.map(|f| (f, relayed)) },
    )))
}

/// Why one hospital's answer was not relayed to its end.
enum Failed {
    /// The hospital refused, failed or did not answer in time.
    Refused(String),
    /// The recipient went away.
    NotRead,
}

/// Relays one hospital's frames as they come; what was relayed, by count
/// and the SHA-256 of its bytes.
async fn relay_one(
    node: &crate::fanout::RegisteredNode,
    request: pb::ExchangeRequest,
    deadline: std::time::Duration,
    frames: &tokio::sync::mpsc::Sender<Result<pb::RelayedFrame, Status>>,
) -> Result<Answer, Failed> {
    let late = || Failed::Refused(crate::fanout::no_answer(deadline));
    let refused = |status: Status| Failed::Refused(crate::fanout::describe(&status));
    let mut stream = tokio::time::timeout(deadline, node.query_client().exchange(request))
        .await
        .map_err(|_| late())?
        .map_err(refused)?
        .into_inner();
    let mut digest = Sha256::new();
    let mut count = 0i64;
    while let Some(frame) = tokio::time::timeout(deadline, stream.next())
        .await
        .map_err(|_| late())?
    {
        let frame = frame.map_err(refused)?;
        digest.update(&frame.encapsulated_key);
        digest.update(&frame.ciphertext);
        count += 1;
        let relayed = pb::RelayedFrame {
            node_id: node.id.clone(),
            frame: Some(frame),
            refusal: String::new(),
        };
        frames
            .send(Ok(relayed))
            .await
            .map_err(|_| Failed::NotRead)?;
    }
    Ok(Answer {
        result_sha256: hex::encode(digest.finalize()),
        cells: count,
    })
}

fn refusal(hospital: &str, reason: &str) -> pb::RelayedFrame {
    pb::RelayedFrame {
        node_id: hospital.to_owned(),
        frame: None,
        refusal: reason.to_owned(),
    }
}

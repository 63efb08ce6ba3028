//! The node's side of audit witnessing, around the gRPC service: every
//! response carries the node's signed audit head (after the request was
//! recorded) for the coordinator to keep, and the coordinator's head on a
//! request is kept here.
//!
//! Key decision: a layer around the whole service rather than a field per
//! message, so every RPC (refusals and streams included) carries it and no
//! wire message changes. Only the coordinator takes part: the node's head
//! (whose sequence number counts its audited requests) goes to no other
//! caller, and a head is kept only from the coordinator's own certificate
//! (role and name) and only if that certificate verifies it. Keeping runs
//! beside the request, never in its way.

use std::convert::Infallible;
use std::task::{Context, Poll};

use ghx_audit::checkpoint::{Checkpoint, Verifier};
use ghx_db::audit::AuditLog;
use ghx_pki::{PeerIdentity, Role};
use ghx_proto::AUDIT_HEAD_METADATA;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

/// A node gRPC service that witnesses and is witnessed.
#[derive(Clone)]
pub struct Witnessing<S> {
    inner: S,
    audit: AuditLog,
}

impl<S> Witnessing<S> {
    pub fn new(inner: S, audit: AuditLog) -> Self {
        Witnessing { inner, audit }
    }
}

impl<S: NamedService> NamedService for Witnessing<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for Witnessing<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let coordinator = coordinator_certificate(&request);
        let audit = self.audit.clone();
        if let Some(cert) = &coordinator
            && let Some(token) = request
                .headers()
                .get(AUDIT_HEAD_METADATA)
                .and_then(|v| v.to_str().ok())
        {
            let (keeping, token, cert) = (audit.clone(), token.to_owned(), cert.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = keep(&keeping, &token, &cert) {
                    tracing::warn!(error = %e, "the coordinator's audit head was not kept");
                }
            });
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if coordinator.is_none() {
                return Ok(response);
            }
            if let Some(token) = audit.signed_head_for_call().await
                && let Ok(value) = http::HeaderValue::from_str(&token)
            {
                response.headers_mut().insert(AUDIT_HEAD_METADATA, value);
            }
            Ok(response)
        })
    }
}

/// The caller's certificate (DER) when the caller is the coordinator: its
/// role and its name, whose key signs the coordinator's checkpoints.
fn coordinator_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    let peer = request.extensions().get::<ghx_pki::transport::Peer>()?;
    let identity = PeerIdentity::from_chain(&peer.certs).ok()?;
    if identity.role != Role::Coordinator || identity.name != ghx_audit::COORDINATOR {
        return None;
    }
    Some(peer.certs.first()?.to_vec())
}

/// Why a received head was not kept.
#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("the caller's certificate cannot verify it: {0}")]
    Certificate(#[from] ghx_audit::checkpoint::Error),
    #[error("it is not a checkpoint token")]
    NotAToken,
    #[error("its signature does not verify with the caller's certificate: {0}")]
    Signature(ghx_audit::checkpoint::Flaw),
    #[error(transparent)]
    Store(#[from] ghx_db::witnesses::NoteError),
}

fn keep(audit: &AuditLog, token: &str, cert_der: &[u8]) -> Result<bool, KeepError> {
    let verifier = Verifier::from_certificate_der(cert_der)?;
    let (checkpoint, _) = Checkpoint::from_token(token).ok_or(KeepError::NotAToken)?;
    verifier.check(&checkpoint).map_err(KeepError::Signature)?;
    Ok(audit.witnesses().note(verifier.keeper(), token)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ghx_audit::checkpoint::Signer;
    use ghx_pki::{CertificateAuthority, CertificateRequest, CertifiedKey};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::*;

    fn der(cert: &CertifiedKey) -> Vec<u8> {
        CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn request_from(cert: &CertifiedKey) -> http::Request<()> {
        let mut request = http::Request::new(());
        request.extensions_mut().insert(ghx_pki::transport::Peer {
            certs: Arc::new(vec![CertificateDer::from(der(cert))]),
            addr: None,
        });
        request
    }

    #[test]
    fn only_heads_the_coordinators_own_certificate_signed_are_kept() {
        let ca = CertificateAuthority::create("G-Health").unwrap();
        let issue = |name: &str, role: Role| {
            ca.issue(&CertificateRequest::new(name, role, "G-Health"))
                .unwrap()
        };
        let coordinator = issue("coordinator", Role::Coordinator);
        let relay = issue("relay", Role::Coordinator);
        let named_so = issue("coordinator", Role::Requester);
        assert!(coordinator_certificate(&request_from(&coordinator)).is_some());
        assert!(coordinator_certificate(&request_from(&relay)).is_none());
        assert!(coordinator_certificate(&request_from(&named_so)).is_none());
        assert!(coordinator_certificate(&http::Request::new(())).is_none());

        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path().join("node.db").to_str().unwrap()).unwrap();
        let audit = store.audit_log().clone();
        let sign = |key: &CertifiedKey, seq: i64| {
            Signer::from_pem("coordinator", &key.key_pem)
                .unwrap()
                .sign(seq, &"a".repeat(64))
                .unwrap()
                .token
        };
        assert!(keep(&audit, &sign(&coordinator, 5), &der(&coordinator)).unwrap());
        // Signed in the coordinator's name with another key: not kept.
        assert!(matches!(
            keep(&audit, &sign(&relay, 6), &der(&coordinator)),
            Err(KeepError::Signature(_))
        ));
        assert!(matches!(
            keep(&audit, "not a token", &der(&coordinator)),
            Err(KeepError::NotAToken)
        ));
        let held = audit.witnesses().all().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].keeper, "coordinator");
    }
}

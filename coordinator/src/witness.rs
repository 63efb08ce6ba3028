//! The coordinator's side of audit witnessing, around each node client:
//! every request carries the coordinator's signed audit head for the node
//! to keep, and the node's head on each response is kept here.
//!
//! Key decision: a layer under the generated client rather than a field per
//! message, so every RPC (streams and refusals included) carries a head and
//! no wire message changes. A node's head is kept as received when it names
//! that node (the registry's id for the connection); its signature is
//! checked when the node's log is verified, since only the node's
//! certificate, which the committee holds, can check it.

use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use ghx_db::audit::AuditLog;
use ghx_proto::AUDIT_HEAD_METADATA;
use tonic::codegen::{BoxFuture, Service, http};

/// The coordinator's audit log, once the service has one: shared by the
/// registry and every client it hands out.
pub type SharedAudit = Arc<RwLock<Option<AuditLog>>>;

/// A node client's transport that witnesses and is witnessed.
#[derive(Clone)]
pub struct Witnessed<S> {
    inner: S,
    node: String,
    audit: SharedAudit,
}

impl<S> Witnessed<S> {
    pub fn new(inner: S, node: &str, audit: SharedAudit) -> Self {
        Witnessed {
            inner,
            node: node.to_owned(),
            audit,
        }
    }
}

impl<S, B, RB> Service<http::Request<B>> for Witnessed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service made ready is the one that must be called.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let audit = self.audit.read().ok().and_then(|a| a.clone());
        let node = self.node.clone();
        Box::pin(async move {
            let Some(audit) = audit else {
                return inner.call(request).await;
            };
            if let Some(token) = audit.signed_head_for_call().await
                && let Ok(value) = http::HeaderValue::from_str(&token)
            {
                request.headers_mut().insert(AUDIT_HEAD_METADATA, value);
            }
            let response = inner.call(request).await?;
            let head = response
                .headers()
                .get(AUDIT_HEAD_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(token) = head {
                let kept =
                    tokio::task::spawn_blocking(move || audit.witnesses().note(&node, &token))
                        .await;
                if let Ok(Err(e)) = kept {
                    tracing::warn!(error = %e, "a node's audit head was not kept");
                }
            }
            Ok(response)
        })
    }
}

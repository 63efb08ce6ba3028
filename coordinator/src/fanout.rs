//! Sends one query to every registered node at once and collects what each
//! released. A node that is down, slow or refuses is reported by name with
//! its reason; it never silently disappears from the result.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

/// Largest answer the coordinator reads from a node.
const MAX_ANSWER_BYTES: usize = 12 * (ghx_study::query::MAX_LINKAGE_NUMBERS as usize) + (1 << 20);

use ghx_pki::transport::Conn;
use ghx_pki::transport::Transport;
use ghx_proto::v1 as pb;
use ghx_proto::v1::node_service_client::NodeServiceClient;
use ghx_study::result::{AggregateResult, NodeFailure};
use ghx_telemetry::propagation::Propagate;
use tonic::codegen::http::Uri;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::witness::{SharedAudit, Witnessed};

/// A client of one node; every call carries the caller's trace context and
/// the coordinator's audit head, and the node's head is kept from every
/// response.
pub type NodeClient = NodeServiceClient<Witnessed<InterceptedService<Channel, Propagate>>>;

/// The endpoint of a node that dials the coordinator's tunnel port itself
/// (hospital networks that allow outbound connections only).
pub const OUTBOUND: &str = "outbound";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refused an outbound node connection: {0}")]
    Tunnel(String),
    #[error("node `{id}` endpoint `{endpoint}` is not a valid URL: {message}")]
    Endpoint {
        id: String,
        endpoint: String,
        message: String,
    },
}

/// A node the coordinator can reach.
#[derive(Debug, Clone)]
pub struct RegisteredNode {
    pub id: String,
    pub endpoint: String,
    pub display_name: String,
    channel: Channel,
    /// For training rounds: no channel-wide deadline, since each round step
    /// has its own (the training's `round_deadline_seconds`).
    round_channel: Channel,
    audit: SharedAudit,
}

impl RegisteredNode {
    /// A client for training rounds.
    pub fn round_client(&self) -> NodeClient {
        self.witnessed(self.round_channel.clone())
    }

    /// A client for queries and revocations, bounded by the node deadline.
    pub(crate) fn query_client(&self) -> NodeClient {
        self.witnessed(self.channel.clone())
    }

    fn witnessed(&self, channel: Channel) -> NodeClient {
        NodeServiceClient::new(Witnessed::new(
            InterceptedService::new(channel, Propagate),
            &self.id,
            self.audit.clone(),
        ))
        // A pooled table that counts each patient once answers up to
        // MAX_LINKAGE_NUMBERS masked 64-bit numbers (ten bytes each at most).
        .max_decoding_message_size(MAX_ANSWER_BYTES)
    }
}

/// The nodes of the federation and a connection to each.
pub struct NodeRegistry {
    tls: Transport,
    deadline: Duration,
    nodes: RwLock<BTreeMap<String, RegisteredNode>>,
    /// Outbound nodes that have dialled in since they were registered.
    dialled_in: RwLock<std::collections::BTreeSet<String>>,
    /// The coordinator's audit log, whose head every call carries and
    /// where the nodes' heads are kept.
    audit: SharedAudit,
}

impl NodeRegistry {
    /// How long one call to a node may take.
    pub(crate) fn deadline(&self) -> Duration {
        self.deadline
    }

    pub fn new(tls: Transport, deadline: Duration) -> Self {
        NodeRegistry {
            tls,
            deadline,
            nodes: RwLock::new(BTreeMap::new()),
            dialled_in: RwLock::default(),
            audit: SharedAudit::default(),
        }
    }

    /// Sends the coordinator's signed head with every call and keeps the
    /// nodes' heads in `audit` (audit witnesses).
    pub fn witness_with(&self, audit: ghx_db::audit::AuditLog) {
        *self.audit.write().expect("audit lock") = Some(audit);
    }

    /// Adds or replaces a node. Connections are made lazily, on first use.
    pub fn register(&self, id: &str, endpoint: &str, display_name: &str) -> Result<(), Error> {
        let bad = |message: String| Error::Endpoint {
            id: id.to_owned(),
            endpoint: endpoint.to_owned(),
            message,
        };
        if endpoint == OUTBOUND {
            self.dialled_in.write().expect("registry lock").remove(id);
            // Until it dials in, calls to it fail with a clear reason.
            let channel = Endpoint::from_static("http://outbound.invalid")
                .connect_with_connector_lazy(Dialled::new(id, None));
            self.insert(id, endpoint, display_name, channel.clone(), channel);
            return Ok(());
        }
        if !endpoint.starts_with("https://") {
            return Err(bad(format!(
                "the coordinator only speaks mTLS; use https://host:port, or `{OUTBOUND}` for a node that dials in"
            )));
        }
        // TLS is the connector's (the node's certificate names the node
        // id); tonic sees plain HTTP/2.
        let plain = format!("http://{}", &endpoint["https://".len()..]);
        let base = Endpoint::from_shared(plain)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        let round_channel = base.connect_with_connector_lazy(self.tls.connector(id));
        let channel = base
            .timeout(self.deadline)
            .connect_with_connector_lazy(self.tls.connector(id));
        self.insert(id, endpoint, display_name, channel, round_channel);
        Ok(())
    }

    fn insert(
        &self,
        id: &str,
        endpoint: &str,
        display_name: &str,
        channel: Channel,
        round_channel: Channel,
    ) {
        self.nodes.write().expect("registry lock").insert(
            id.to_owned(),
            RegisteredNode {
                id: id.to_owned(),
                endpoint: endpoint.to_owned(),
                display_name: display_name.to_owned(),
                channel,
                round_channel,
                audit: self.audit.clone(),
            },
        );
    }

    /// Takes a connection a node dialled to the tunnel port (already
    /// verified against the federation CA) and from now on calls that
    /// node over it, as its HTTP/2 client; the node serves on its side.
    /// Only a node certificate of a node registered as [`OUTBOUND`] is
    /// taken. Returns the node's id.
    pub async fn attach(&self, conn: Conn) -> Result<String, Error> {
        let peer = ghx_pki::PeerIdentity::from_chain(&conn.connect_info().certs)
            .map_err(|e| Error::Tunnel(e.to_string()))?;
        if peer.role != ghx_pki::Role::Node {
            return Err(Error::Tunnel(format!(
                "`{}` has role {}, not node",
                peer.name, peer.role
            )));
        }
        let registered = self
            .nodes
            .read()
            .expect("registry lock")
            .get(&peer.name)
            .map(|n| (n.endpoint.clone(), n.display_name.clone()));
        let Some((endpoint, display_name)) = registered else {
            return Err(Error::Tunnel(format!(
                "node `{}` is not registered with this coordinator",
                peer.name
            )));
        };
        if endpoint != OUTBOUND {
            return Err(Error::Tunnel(format!(
                "node `{}` is registered at {endpoint}, not as `{OUTBOUND}`",
                peer.name
            )));
        }
        // HTTP/2 pings find a dead tunnel; the node then dials again.
        let channel = Endpoint::from_static("http://outbound.invalid")
            .http2_keep_alive_interval(TUNNEL_KEEPALIVE)
            .keep_alive_timeout(TUNNEL_KEEPALIVE)
            .keep_alive_while_idle(true)
            .connect_with_connector(Dialled::new(&peer.name, Some(conn)))
            .await
            .map_err(|e| Error::Tunnel(format!("HTTP/2 with node `{}`: {e}", peer.name)))?;
        self.insert(
            &peer.name,
            OUTBOUND,
            &display_name,
            channel.clone(),
            channel,
        );
        self.dialled_in
            .write()
            .expect("registry lock")
            .insert(peer.name.clone());
        Ok(peer.name)
    }

    /// Nodes registered as [`OUTBOUND`] that have not dialled in yet.
    pub fn awaiting_dial_in(&self) -> Vec<String> {
        let dialled = self.dialled_in.read().expect("registry lock");
        self.list()
            .into_iter()
            .filter(|n| n.endpoint == OUTBOUND && !dialled.contains(&n.id))
            .map(|n| n.id)
            .collect()
    }

    pub fn list(&self) -> Vec<RegisteredNode> {
        self.nodes
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Asks every node for its information, only so that the node's signed
    /// audit head comes back (and the coordinator's goes out) with the call
    /// (audit witnesses); a node that does not answer is tried next time.
    pub async fn exchange_heads(&self) {
        let deadline = self.deadline;
        let calls = self.list().into_iter().map(|node| async move {
            let mut client = node.query_client();
            let mut request = tonic::Request::new(pb::GetNodeInfoRequest {});
            request.set_timeout(deadline);
            match tokio::time::timeout(deadline, client.get_node_info(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    tracing::debug!(node = %node.id, error = %status.message(), "no audit head exchanged")
                }
                Err(_) => tracing::debug!(node = %node.id, "no audit head exchanged: no answer"),
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Tells every node that a study is revoked; returns the nodes that
    /// could not be told, and why.
    pub async fn revoke(&self, revocation: &str) -> Vec<NodeFailure> {
        let deadline = self.deadline;
        let calls = self.list().into_iter().map(|node| async move {
            let mut client = node.query_client();
            let mut request = tonic::Request::new(pb::RevokeStudyNodeRequest {
                revocation: revocation.to_owned(),
            });
            request.set_timeout(deadline);
            match tokio::time::timeout(deadline, client.revoke_study(request)).await {
                Ok(Ok(_)) => None,
                Ok(Err(status)) => Some(NodeFailure {
                    node_id: node.id.clone(),
                    reason: describe(&status),
                }),
                Err(_) => Some(NodeFailure {
                    node_id: node.id.clone(),
                    reason: no_answer(deadline),
                }),
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Runs the query on every node concurrently, each bounded by the
    /// deadline, and returns the released results and the failures.
    pub async fn run_aggregate(
        &self,
        capability: &str,
        query_json: &[u8],
        manifest_json: &[u8],
    ) -> (Vec<AggregateResult>, Vec<NodeFailure>) {
        let nodes = self.list();
        let deadline = self.deadline;
        let calls = nodes.into_iter().map(|node| {
            let request = pb::RunAggregateRequest {
                capability: capability.to_owned(),
                query: Some(pb::QuerySpec {
                    json: query_json.to_vec(),
                }),
                manifest_json: manifest_json.to_vec(),
            };
            let span = tracing::info_span!("node_call", node = %node.id);
            async move {
                let mut client = node.query_client();
                let mut request = tonic::Request::new(request);
                request.set_timeout(deadline);
                let outcome = tokio::time::timeout(deadline, client.run_aggregate(request)).await;
                let reason = match outcome {
                    Err(_) => no_answer(deadline),
                    Ok(Err(status)) => describe(&status),
                    Ok(Ok(response)) => match response.into_inner().result {
                        Some(result) => match result_from_wire(&node.id, result) {
                            Ok(result) => return Ok(result),
                            Err(reason) => reason,
                        },
                        None => "answered without a result".to_owned(),
                    },
                };
                Err(NodeFailure {
                    node_id: node.id.clone(),
                    reason,
                })
            }
            .instrument(span)
        });
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for outcome in futures::future::join_all(calls).await {
            match outcome {
                Ok(r) => results.push(r),
                Err(f) => {
                    tracing::warn!(node = %f.node_id, reason = %f.reason, "node did not contribute");
                    failures.push(f);
                }
            }
        }
        (results, failures)
    }
}

/// How often an idle tunnel is pinged (and how long a ping may take).
const TUNNEL_KEEPALIVE: Duration = Duration::from_secs(15);

type Connecting<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, std::io::Error>> + Send>>;

/// The connector of a node registered as outbound: the connection it
/// dialled, once; none before it dials in or after that connection closed.
#[derive(Clone)]
struct Dialled {
    id: String,
    conn: std::sync::Arc<std::sync::Mutex<Option<Conn>>>,
}

impl Dialled {
    fn new(id: &str, conn: Option<Conn>) -> Dialled {
        Dialled {
            id: id.to_owned(),
            conn: std::sync::Arc::new(std::sync::Mutex::new(conn)),
        }
    }
}

impl tonic::codegen::Service<Uri> for Dialled {
    type Response = hyper_util::rt::TokioIo<Conn>;
    type Error = std::io::Error;
    type Future = Connecting<Self::Response>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let conn = self.conn.lock().expect("tunnel lock").take();
        let message = format!(
            "node `{}` connects outbound and is not connected now; waiting for it to dial in",
            self.id
        );
        Box::pin(async move {
            conn.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, message))
        })
    }
}

const UNREACHABLE: &str = "unreachable";
const NO_ANSWER: &str = "no answer within";
const DEADLINE: &str = "deadline exceeded";

/// How a node that did not answer within `deadline` is reported.
pub(crate) fn no_answer(deadline: std::time::Duration) -> String {
    format!("{NO_ANSWER} {} s", deadline.as_secs())
}

/// A node's error status in words, for a failure reason.
pub(crate) fn describe(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unavailable => format!("{UNREACHABLE}: {}", status.message()),
        tonic::Code::PermissionDenied => format!("refused: {}", status.message()),
        tonic::Code::DeadlineExceeded => DEADLINE.to_owned(),
        code => format!("{code:?}: {}", status.message()),
    }
}

/// Whether a failure reason (as [`describe`] and [`no_answer`] word it)
/// means the node received and decided the request, rather than never
/// answering: what the coordinator's audit entry records.
pub(crate) fn node_decided(reason: &str) -> bool {
    !(reason.starts_with(UNREACHABLE)
        || reason.starts_with(NO_ANSWER)
        || reason.starts_with(DEADLINE))
}

/// Checks and converts a node's wire result. A result that claims to come
/// from another node, or has malformed cells, is not trusted.
fn result_from_wire(
    expected_node: &str,
    result: pb::AggregateResult,
) -> Result<AggregateResult, String> {
    if result.node_id != expected_node {
        return Err(format!("answered as `{}`", result.node_id));
    }
    ghx_proto::convert::result_from_wire(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_count_as_decided_by_the_node() {
        let decided = |code: tonic::Code| node_decided(&describe(&tonic::Status::new(code, "x")));
        assert!(decided(tonic::Code::PermissionDenied));
        assert!(decided(tonic::Code::InvalidArgument));
        assert!(decided(tonic::Code::ResourceExhausted));
        assert!(!decided(tonic::Code::Unavailable));
        assert!(!decided(tonic::Code::DeadlineExceeded));
        assert!(!node_decided(&no_answer(std::time::Duration::from_secs(
            30
        ))));
    }
}

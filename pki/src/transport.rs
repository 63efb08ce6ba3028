//! Mutual-TLS connections for the long-running services, with a certificate
//! that can be replaced on disk while they run.
//!
//! Key decision: the node and coordinator do TLS themselves (tokio-rustls
//! under tonic) rather than through tonic's TLS options, which fix the
//! certificate at start-up. A [`LiveIdentity`] re-reads the member's
//! certificate and key when the files change (looked at, at most every
//! [`LiveIdentity::CHECK_EVERY`], when a handshake needs them), so a
//! certificate renewed by `ghx pki renew` is presented on every new
//! connection from then on, without a restart; connections already open
//! carry on. A replacement is taken only if it parses, its key matches and
//! the federation CA issued it and it is valid now; otherwise the old one
//! stays and the log says why. The CA itself is fixed for the process.
//!
//! Both directions use the same pieces: [`Transport::incoming`] accepts
//! connections for a tonic server and hands it each verified peer as a
//! [`Peer`] request extension ([`crate::PeerIdentity::from_request`] reads
//! it); [`Transport::connector`] dials a server for a tonic `Channel`. The
//! outbound-only node mode runs a server over a connection it dialled:
//! [`Conn::dialled`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey as RustlsKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;

use crate::{CertifiedKey, Error, TlsFiles};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified peer of a connection, as tonic hands it to each request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's certificate chain, leaf first, verified against the
    /// federation CA during the handshake.
    pub certs: Arc<Vec<CertificateDer<'static>>>,
    /// Where the connection came from (or went to, for a dialled one).
    pub addr: Option<SocketAddr>,
}

/// A member's certificate and key, re-read from disk when they change.
pub struct LiveIdentity {
    files: Option<(PathBuf, PathBuf)>,
    ca: Arc<RootCertStore>,
    ca_pem: String,
    state: RwLock<Current>,
}

struct Current {
    key: Arc<RustlsKey>,
    pem: CertifiedKey,
    checked: Instant,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The CA certificate as a root store.
fn roots(ca_pem: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::Parse(format!("the federation CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Untrusted(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Parse(
            "the federation CA file holds no certificate".to_owned(),
        ));
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses `pem`, checks the key belongs to the certificate and that the
/// federation CA issued it and it is valid now.
fn usable(ca_pem: &str, pem: &CertifiedKey) -> Result<Arc<RustlsKey>, Error> {
    let chain = CertificateDer::pem_slice_iter(pem.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Parse(format!("the certificate: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Parse(
            "the certificate file holds no certificate".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes())
        .map_err(|e| Error::Parse(format!("the private key: {e}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::Parse(format!("the private key: {e}")))?;
    let key = RustlsKey::new(chain, signer);
    key.keys_match().map_err(|e| {
        Error::Untrusted(format!(
            "the private key does not match the certificate: {e}"
        ))
    })?;
    crate::verify_member(ca_pem, &pem.cert_pem)?;
    Ok(Arc::new(key))
}

impl LiveIdentity {
    /// How often the files are looked at, at most.
    pub const CHECK_EVERY: Duration = Duration::from_secs(2);

    /// Loads the CA and this member's certificate and key from `files`,
    /// watching the certificate and key for replacement.
    pub fn load(files: &TlsFiles) -> Result<Arc<LiveIdentity>, Error> {
        let ca_pem = read("the federation CA certificate", &files.ca)?;
        let pem = CertifiedKey {
            cert_pem: read("the certificate", &files.cert)?,
            key_pem: read("the private key", &files.key)?,
        };
        let key = usable(&ca_pem, &pem).map_err(|e| match e {
            Error::Untrusted(why) => Error::Untrusted(format!("{}: {why}", files.cert.display())),
            other => other,
        })?;
        Ok(Arc::new(LiveIdentity {
            files: Some((files.cert.clone(), files.key.clone())),
            ca: Arc::new(roots(&ca_pem)?),
            ca_pem,
            state: RwLock::new(Current {
                key,
                pem,
                checked: Instant::now(),
            }),
        }))
    }

    /// A fixed identity (no files to watch).
    pub fn fixed(ca_pem: &str, pem: CertifiedKey) -> Result<Arc<LiveIdentity>, Error> {
        Ok(Arc::new(LiveIdentity {
            files: None,
            ca: Arc::new(roots(ca_pem)?),
            ca_pem: ca_pem.to_owned(),
            state: RwLock::new(Current {
                key: usable(ca_pem, &pem)?,
                pem,
                checked: Instant::now(),
            }),
        }))
    }

    /// The federation CA certificate this identity is checked against.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The certificate and key in use now (after looking for a
    /// replacement, if one is due).
    pub fn current_pem(&self) -> CertifiedKey {
        self.refresh_if_due();
        self.state.read().expect("identity lock").pem.clone()
    }

    fn current(&self) -> Arc<RustlsKey> {
        self.refresh_if_due();
        self.state.read().expect("identity lock").key.clone()
    }

    fn refresh_if_due(&self) {
        let due = self.files.is_some()
            && self.state.read().expect("identity lock").checked.elapsed() >= Self::CHECK_EVERY;
        if due && let Err(e) = self.reload() {
            tracing::warn!(error = %e, "kept the current certificate: its replacement is unusable");
        }
    }

    /// Looks at the files now; takes a usable replacement. Returns whether
    /// the certificate changed.
    pub fn reload(&self) -> Result<bool, Error> {
        let Some((cert_path, key_path)) = &self.files else {
            return Ok(false);
        };
        // The files are small: compared whole, since modification times
        // are too coarse to see two writes in quick succession.
        self.state.write().expect("identity lock").checked = Instant::now();
        let pem = CertifiedKey {
            cert_pem: read("the certificate", cert_path)?,
            key_pem: read("the private key", key_path)?,
        };
        let mut state = self.state.write().expect("identity lock");
        if pem.cert_pem == state.pem.cert_pem && pem.key_pem == state.pem.key_pem {
            return Ok(false);
        }
        let key = usable(&self.ca_pem, &pem).map_err(|e| match e {
            Error::Untrusted(why) => Error::Untrusted(format!("{}: {why}", cert_path.display())),
            other => other,
        })?;
        state.key = key;
        state.pem = pem;
        tracing::info!(cert = %cert_path.display(), "loaded the renewed certificate");
        Ok(true)
    }
}

#[derive(Debug)]
struct ServerResolver(Arc<LiveIdentity>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<RustlsKey>> {
        Some(self.0.current())
    }
}

#[derive(Debug)]
struct ClientResolver(Arc<LiveIdentity>);

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<RustlsKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS for a service: its live identity and the federation CA.
#[derive(Debug, Clone)]
pub struct Transport {
    identity: Arc<LiveIdentity>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Transport {
    /// Server and client TLS over `identity`: peers must present a
    /// certificate the federation CA issued.
    pub fn new(identity: Arc<LiveIdentity>) -> Result<Transport, Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(identity.ca.clone(), provider())
            .build()
            .map_err(|e| Error::Untrusted(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Untrusted(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServerResolver(identity.clone())));
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Untrusted(e.to_string()))?
            .with_root_certificates(identity.ca.clone())
            .with_client_cert_resolver(Arc::new(ClientResolver(identity.clone())));
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Transport {
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// [`Transport::new`] over the certificate files, watched for renewal.
    pub fn load(files: &TlsFiles) -> Result<Transport, Error> {
        Transport::new(LiveIdentity::load(files)?)
    }

    pub fn identity(&self) -> &Arc<LiveIdentity> {
        &self.identity
    }

    /// Accepts connections on `listener` and yields each one whose TLS
    /// handshake succeeded, for tonic's `serve_with_incoming*`. The accept
    /// loop stops when the stream is dropped.
    pub fn incoming(&self, listener: TcpListener) -> Connections {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Conn>(64);
        let accept = self.accept(listener, sender);
        Connections {
            receiver,
            _accept: Some(AbortOnDrop(accept)),
        }
    }

    /// Accepts connections on `listener` and sends each one whose TLS
    /// handshake succeeded to `into` (handshakes run concurrently, each
    /// bounded by [`HANDSHAKE_TIMEOUT`]; a failed one is logged and
    /// dropped), until `into` closes or the task is aborted.
    pub fn accept(
        &self,
        listener: TcpListener,
        into: tokio::sync::mpsc::Sender<Conn>,
    ) -> tokio::task::JoinHandle<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        tokio::spawn(async move {
            while !into.is_closed() {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let into = into.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let certs = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                                .unwrap_or_default();
                            let conn = Conn::new(
                                tls,
                                Peer {
                                    certs: Arc::new(certs),
                                    addr: Some(addr),
                                },
                            );
                            let _ = into.send(conn).await;
                        }
                        // Closed before saying anything: a port probe, or a
                        // client that gave up while this side was not yet
                        // accepting.
                        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(peer = %addr, "connection closed before TLS")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %addr, error = %e, "TLS handshake refused")
                        }
                        Err(_) => tracing::warn!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        })
    }

    /// Dials `addr` and completes the TLS handshake, expecting the server's
    /// certificate to name `server_name` (and the federation CA to have
    /// issued it).
    pub async fn dial(
        &self,
        addr: &str,
        server_name: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, io::Error> {
        dial(self.client.clone(), addr, server_name).await
    }

    /// A connector for `Endpoint::connect_with_connector*`: dials the
    /// endpoint's host and port over mTLS, expecting `server_name`. Give
    /// tonic the endpoint with an `http://` scheme: TLS happens here.
    pub fn connector(&self, server_name: &str) -> Connector {
        Connector {
            client: self.client.clone(),
            server_name: server_name.to_owned(),
        }
    }
}

async fn dial(
    client: Arc<ClientConfig>,
    addr: &str,
    server_name: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, io::Error> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(client);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Verified connections handed over one by one (by [`Transport::accept`],
/// [`dial_out`], or both), as tonic's incoming stream.
pub struct Connections {
    receiver: tokio::sync::mpsc::Receiver<Conn>,
    _accept: Option<AbortOnDrop>,
}

impl Connections {
    pub fn new(receiver: tokio::sync::mpsc::Receiver<Conn>) -> Connections {
        Connections {
            receiver,
            _accept: None,
        }
    }
}

impl futures::Stream for Connections {
    type Item = Result<Conn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Backoff between dial attempts: from [`DIAL_BACKOFF_MIN`], doubling to
/// [`DIAL_BACKOFF_MAX`], with jitter so that nodes cut off together do not
/// all dial at once.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Outbound-only mode: keeps one connection dialled to `addr` (the
/// coordinator's tunnel, its certificate naming `server_name`) and hands
/// each to `serve`, whose server answers the coordinator's requests over
/// it. When the connection ends, dials again with backoff. Returns when
/// the server stops taking connections.
pub async fn dial_out(
    transport: Transport,
    addr: String,
    server_name: String,
    serve: tokio::sync::mpsc::Sender<Conn>,
) {
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        match transport.dial(&addr, &server_name).await {
            Ok(tls) => {
                let (closed, on_close) = tokio::sync::oneshot::channel();
                if serve
                    .send(Conn::dialled(tls).with_close_signal(closed))
                    .await
                    .is_err()
                {
                    return;
                }
                tracing::info!(coordinator = %addr, "connected to the coordinator; serving over it");
                backoff = DIAL_BACKOFF_MIN;
                let _ = on_close.await;
                tracing::warn!(coordinator = %addr, "the connection to the coordinator closed; dialling again");
            }
            Err(e) => {
                tracing::warn!(coordinator = %addr, error = %e, retry_in = ?backoff, "cannot reach the coordinator");
            }
        }
        if serve.is_closed() {
            return;
        }
        let jitter = Duration::from_millis(u64::from(std::process::id() % 7) * 13 + rand_millis());
        tokio::time::sleep(backoff + jitter.min(backoff / 2)).await;
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}

/// A few pseudo-random milliseconds (no cryptographic use).
fn rand_millis() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos % 97)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dials a federation server for a tonic `Channel`.
#[derive(Debug, Clone)]
pub struct Connector {
    client: Arc<ClientConfig>,
    server_name: String,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let client = self.client.clone();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no host in `{uri}`"))
            })?;
            let port = uri.port_u16().unwrap_or(443);
            let tls = dial(client, &format!("{host}:{port}"), &server_name).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Anything a connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A verified connection a tonic server serves; tonic puts its [`Peer`]
/// on every request.
pub struct Conn {
    io: Box<dyn Io>,
    peer: Peer,
    /// Dropped with the connection: tells a dialler to dial again.
    _closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Conn {
    fn new(io: impl Io, peer: Peer) -> Conn {
        Conn {
            io: Box::new(io),
            peer,
            _closed: None,
        }
    }

    /// A connection this side dialled, to be served (outbound-only mode):
    /// the peer is the server it dialled, verified during the handshake.
    pub fn dialled(tls: tokio_rustls::client::TlsStream<TcpStream>) -> Conn {
        let (tcp, session) = tls.get_ref();
        let addr = tcp.peer_addr().ok();
        let certs = session
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Conn::new(
            tls,
            Peer {
                certs: Arc::new(certs),
                addr,
            },
        )
    }

    /// `closed` fires when the server lets go of this connection.
    pub fn with_close_signal(mut self, closed: tokio::sync::oneshot::Sender<()>) -> Conn {
        self._closed = Some(closed);
        self
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

//! A whole federation in one process: a CA, a coordinator and the three
//! hospital nodes on loopback, each node with its own SQLite store filled
//! with synthetic data. `ghx demo` runs it; the whole-federation tests start
//! it too, so the demo and the tests exercise the same code.
//!
//! Everything is set up the way an operator would: certificates are issued
//! into a PKI directory, configuration files are written and then loaded with
//! the same loaders `ghx node run` and `ghx coordinator run` use, and all
//! traffic is gRPC over mutual TLS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ghx_coordinator::{Coordinator, CoordinatorConfig};
use ghx_node::import::{ImportOptions, ImportReport, import_path};
use ghx_node::{Node, NodeConfig, Store};
use ghx_pki::{CertificateRequest, PkiDir, Role};
use ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use ghx_synth::{HOSPITALS, HospitalProfile, SynthOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The signing key id the local coordinator uses.
pub const SIGNING_KID: &str = "coordinator-local-1";
/// The requester and committee member the local federation issues for.
pub const REQUESTER: &str = "demo-requester";
pub const COMMITTEE: &str = "demo-committee";
/// A requester from an academic organisation, whom hospital policies allow
/// more than a company (e.g. three-way tables at Chosun).
pub const RESEARCHER: &str = "demo-researcher";
/// A second committee member, for quorums of two.
pub const COMMITTEE_2: &str = "demo-committee-2";
/// The personal health report service: the exchange's registered recipient.
pub const RECIPIENT: &str = "report-service";
/// The platform identity service's key id at the hospitals.
pub const IDENTITY_KID: &str = "platform";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] ghx_pki::Error),
    #[error(transparent)]
    Synth(#[from] ghx_synth::Error),
    #[error(transparent)]
    Key(#[from] ghx_study::capability::Error),
    #[error("node: {0}")]
    Node(#[from] ghx_node::Error),
    #[error("node config: {0}")]
    NodeConfig(#[from] ghx_node::config::Error),
    #[error("import: {0}")]
    Import(#[from] ghx_node::import::Error),
    #[error("coordinator: {0}")]
    Coordinator(#[from] ghx_coordinator::Error),
    #[error("coordinator config: {0}")]
    CoordinatorConfig(#[from] ghx_coordinator::config::Error),
    #[error(transparent)]
    Connect(#[from] crate::client::Error),
    #[error("coordinator: {}", .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("nodes did not dial in to the coordinator within a minute: {0:?}")]
    NotDialledIn(Vec<String>),
    #[error("the identity service's key: {0}")]
    Identity(String),
}

/// How big a local federation to start.
#[derive(Debug, Clone)]
pub struct LocalFederationOptions {
    /// Working directory for PKI, configuration, data and databases.
    pub dir: PathBuf,
    pub patients_per_node: usize,
    pub seed: u64,
    pub min_cell_size: u32,
    /// Committee approvals a study needs (1 or 2).
    pub committee_quorum: usize,
    /// Entries between signed audit checkpoints; the default when `None`.
    pub audit_checkpoint_every: Option<i64>,
    /// Whether the coordinator dials the nodes or they dial it.
    pub node_link: NodeLink,
    /// Fewest nodes a node sums its values with in secure aggregation
    /// (`secure_aggregation.min_participants`); the three hospitals are
    /// its members.
    pub min_sum_participants: u32,
    /// Whether node-admins may register node ids the coordinator's
    /// configuration does not list (`registration.new_nodes`).
    pub open_registration: bool,
    /// Whether nodes contribute to pooled tables without noise
    /// (`release.pooled_without_noise`), and so release no cells of their
    /// own (`release.per_hospital = false`).
    pub pooled_without_noise: bool,
    /// Share of each hospital's patients who are residents treated at two
    /// or three of them (same RRN, own ids; [`SynthOptions::shared`]).
    pub shared: f64,
    /// About how many bytes of FHIR JSON go in one exchange part
    /// (`exchange.part_bytes`); the node's default when `None`.
    pub exchange_part_bytes: Option<u64>,
}

impl LocalFederationOptions {
    /// `patients_per_node` synthetic patients from `seed` under `dir`; cell
    /// size 10, a committee quorum of one, default audit checkpoints, nodes
    /// that listen.
    pub fn new(dir: &Path, patients_per_node: usize, seed: u64) -> Self {
        LocalFederationOptions {
            dir: dir.to_owned(),
            patients_per_node,
            seed,
            min_cell_size: 10,
            committee_quorum: 1,
            audit_checkpoint_every: None,
            node_link: NodeLink::Listen,
            min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
            open_registration: false,
            pooled_without_noise: false,
            shared: 0.0,
            exchange_part_bytes: None,
        }
    }
}

/// How the coordinator and the nodes connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodeLink {
    /// Nodes listen; the coordinator dials them.
    #[default]
    Listen,
    /// Nodes listen nowhere: they dial the coordinator's tunnel port
    /// (outbound-only hospital networks), at `via` when given (something
    /// in front of the tunnel port, such as a proxy), else directly.
    Outbound { via: Option<SocketAddr> },
}

/// One running node of the local federation.
pub struct LocalNode {
    pub profile: &'static HospitalProfile,
    /// Where it listens; none when it dials the coordinator instead.
    pub listen: Option<SocketAddr>,
    /// Where its synthetic NDJSON export was written.
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub store: Store,
    pub import: ImportReport,
}

impl LocalNode {
    /// Where it listens. Panics for a node that dials out instead.
    pub fn addr(&self) -> SocketAddr {
        self.listen
            .expect("this node listens (NodeLink::Listen), it does not dial out")
    }
}

/// A running in-process federation. Dropping it without [`shutdown`] aborts
/// the servers.
///
/// [`shutdown`]: LocalFederation::shutdown
pub struct LocalFederation {
    pub dir: PathBuf,
    pub pki: PkiDir,
    pub coordinator_addr: SocketAddr,
    /// Where nodes dial in, when they do ([`NodeLink::Outbound`]).
    pub tunnel_addr: Option<SocketAddr>,
    pub nodes: Vec<LocalNode>,
    coordinator: ghx_coordinator::api::CoordinatorApi,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(io("write", path))
}

async fn bind_loopback() -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind", Path::new("127.0.0.1:0")))?;
    let addr = listener
        .local_addr()
        .map_err(io("bind", Path::new("127.0.0.1:0")))?;
    Ok((listener, addr))
}

/// Creates the CA, the member certificates and the coordinator signing key.
pub fn provision_pki(dir: &Path) -> Result<PkiDir, Error> {
    let pki = PkiDir::new(dir.join("pki"));
    let ca = pki.init("G-Health")?;
    pki.issue(
        &ca,
        &CertificateRequest::new("coordinator", Role::Coordinator, "G-Health"),
    )?;
    for h in &HOSPITALS {
        pki.issue(&ca, &CertificateRequest::new(h.id, Role::Node, h.name))?;
    }
    pki.issue(
        &ca,
        &CertificateRequest::new(REQUESTER, Role::Requester, "Gwangju Health Startup"),
    )?;
    pki.issue(
        &ca,
        &CertificateRequest::new(
            RESEARCHER,
            Role::Requester,
            "Chonnam National University Medical School",
        ),
    )?;
    for member in [COMMITTEE, COMMITTEE_2] {
        pki.issue(
            &ca,
            &CertificateRequest::new(member, Role::Committee, "G-Health Steering Committee"),
        )?;
    }
    pki.issue(
        &ca,
        &CertificateRequest::new("demo-auditor", Role::Auditor, "G-Health Steering Committee"),
    )?;
    pki.issue(
        &ca,
        &CertificateRequest::new(
            RECIPIENT,
            Role::Recipient,
            "G-Health Personal Health Report",
        ),
    )?;
    // The platform identity service's signing key (the hospitals pin its
    // public half).
    let (identity, identity_public) = ghx_exchange::request::generate_identity_key()
        .map_err(|e| Error::Identity(e.to_string()))?;
    write(&pki.root().join("identity.pem"), &identity)?;
    write(&pki.root().join("identity.pub.pem"), &identity_public)?;
    let (private, public) = ghx_study::capability::generate_signing_key()?;
    let private_path = pki.root().join("coordinator-signing.pem");
    write(&private_path, &private)?;
    write(&pki.root().join("coordinator-signing.pub.pem"), &public)?;
    Ok(pki)
}

impl LocalFederation {
    /// Provisions everything under `options.dir` and starts the servers.
    pub async fn start(options: &LocalFederationOptions) -> Result<LocalFederation, Error> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let pki = provision_pki(&dir)?;
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        let audit_table = options
            .audit_checkpoint_every
            .map(|n| format!("\n[audit]\ncheckpoint_every = {n}\n"))
            .unwrap_or_default();
        // The coordinator's addresses first: outbound nodes dial them.
        let (coordinator_listener, coordinator_addr) = bind_loopback().await?;
        let tunnel = match options.node_link {
            NodeLink::Listen => None,
            NodeLink::Outbound { .. } => Some(bind_loopback().await?),
        };
        let tunnel_addr = tunnel.as_ref().map(|(_, addr)| *addr);
        // Every member's key pinned at every node.
        let mut pins = Vec::new();
        for h in HOSPITALS {
            let path = pki.tls_files(h.id).cert;
            let cert = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                action: "read",
                path,
                source,
            })?;
            pins.push(format!(
                "{} = \"{}\"",
                h.id,
                ghx_pki::signed::key_pin(&cert)?
            ));
        }
        let sums_table = format!(
            "\n[secure_aggregation]\nmin_participants = {}\nmembers = [{}]\nmember_keys = {{ {} }}\n",
            options.min_sum_participants,
            HOSPITALS
                .iter()
                .map(|h| format!("\"{}\"", h.id))
                .collect::<Vec<_>>()
                .join(", "),
            pins.join(", ")
        );
        let release_table = if options.pooled_without_noise {
            "\n[release]\npooled_without_noise = true\nper_hospital = false\n"
        } else {
            ""
        };
        // One link key for the three hospitals, never the coordinator's.
        let link_key_path = dir.join("linkage.key");
        if !link_key_path.exists() {
            write(
                &link_key_path,
                &ghx_disclosure::linkage::LinkKey::generate(),
            )?;
        }
        let linkage_table = format!("\n[linkage]\nkey_file = \"{}\"\n", link_key_path.display());
        let exchange_table = format!(
            "\n[exchange]\nidentity_keys = {{ {IDENTITY_KID} = \"{}\" }}\n{}",
            pki.root().join("identity.pub.pem").display(),
            options
                .exchange_part_bytes
                .map(|b| format!("part_bytes = {b}\n"))
                .unwrap_or_default()
        );
        let mut nodes = Vec::new();
        let mut pending = Vec::new();
        for profile in &HOSPITALS {
            let data_dir = dir.join("data").join(profile.id);
            ghx_synth::write_ndjson_dir(
                &SynthOptions {
                    hospital: profile,
                    patients: options.patients_per_node,
                    seed: options.seed,
                    as_of: ghx_synth::default_as_of(),
                    shared: options.shared,
                },
                &data_dir,
            )?;
            // Top-level `listen`, or an `[outbound]` table at the end.
            let (listener, listen_key, outbound_table) = match (options.node_link, tunnel_addr) {
                (NodeLink::Outbound { via }, Some(tunnel)) => (
                    None,
                    String::new(),
                    format!(
                        "\n[outbound]\ncoordinator = \"{}\"\n",
                        via.unwrap_or(tunnel)
                    ),
                ),
                _ => {
                    let (listener, addr) = bind_loopback().await?;
                    (
                        Some(listener),
                        format!("listen = \"{addr}\"\n"),
                        String::new(),
                    )
                }
            };
            let listen = listener.as_ref().and_then(|l| l.local_addr().ok());
            let tls = pki.tls_files(profile.id);
            let policy_dir = dir.join("policies").join(profile.id);
            ghx_node::policy::write_defaults(
                profile.id,
                &policy_dir,
                ghx_node::policy::Overwrite::Keep,
            )
            .map_err(ghx_node::Error::from)?;
            let config_path = dir.join(format!("node-{}.toml", profile.id));
            write(
                &config_path,
                &format!(
                    "id = \"{id}\"\ndisplay_name = \"{name}\"\n{listen_key}\
                     database_url = \"{db}\"\nmin_cell_size = {min}\n\
                     policy_dir = \"{policies}\"\ncoordinator_keys_dir = \"{rotated}\"\n\n\
                     [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                     renew_from = \"https://localhost:{coordinator_port}\"\nrenew_check_secs = 1\n\n\
                     [[coordinator_keys]]\nkid = \"{SIGNING_KID}\"\npublic_key = \"{pubkey}\"\n{audit}{sums_table}{release_table}{linkage_table}{exchange_table}{outbound_table}",
                    id = profile.id,
                    name = profile.name,
                    db = dir.join(format!("{}.db", profile.id)).display(),
                    min = options.min_cell_size,
                    policies = policy_dir.display(),
                    ca = tls.ca.display(),
                    cert = tls.cert.display(),
                    key = tls.key.display(),
                    pubkey = pki.root().join("coordinator-signing.pub.pem").display(),
                    rotated = pki.root().join("rotated-keys").display(),
                    audit = audit_table,
                    coordinator_port = coordinator_addr.port(),
                ),
            )?;
            let config = NodeConfig::load(&config_path)?;
            let import_options = ImportOptions {
                link_key: config.linkage.key().map_err(ghx_node::Error::from)?,
                ..ImportOptions::default()
            };
            let node = Node::build(config)?;
            let store = node.store().clone();
            let import = {
                let store = store.clone();
                let data_dir = data_dir.clone();
                tokio::task::spawn_blocking(move || import_path(&store, &data_dir, &import_options))
                    .await
                    .expect("import task")?
            };
            // Served once the coordinator accepts: an outbound node would
            // otherwise dial an idle port and back off.
            let (stop, stopped) = oneshot::channel::<()>();
            pending.push((node, listener, stopped));
            stops.push(stop);
            nodes.push(LocalNode {
                profile,
                listen,
                data_dir,
                config_path,
                store,
                import,
            });
        }

        let tls = pki.tls_files("coordinator");
        let mut config = format!(
            "listen = \"{coordinator_addr}\"\nnode_deadline_secs = 30\n\
             exchange_heads_every_secs = 2\n{tunnel}\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [signing_key]\nkid = \"{SIGNING_KID}\"\nprivate_key = \"{}\"\n\n\
             [issuer]\nca_cert = \"{ca_cert}\"\nca_key = \"{ca_key}\"\n\n\
             [committee]\nquorum = {}\nmembers = [\"{COMMITTEE}\", \"{COMMITTEE_2}\"]\n\
             [registration]\nnew_nodes = {}\n{audit_table}",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
            pki.root().join("coordinator-signing.pem").display(),
            options.committee_quorum,
            options.open_registration,
            ca_cert = pki.root().join("ca.pem").display(),
            ca_key = pki.root().join("ca.key").display(),
            tunnel = tunnel_addr
                .map(|addr| format!("tunnel_listen = \"{addr}\"\n"))
                .unwrap_or_default(),
        );
        for node in &nodes {
            let endpoint = match node.listen {
                Some(addr) => format!("https://localhost:{}", addr.port()),
                None => ghx_coordinator::fanout::OUTBOUND.to_owned(),
            };
            config.push_str(&format!(
                "\n[[nodes]]\nid = \"{}\"\nendpoint = \"{endpoint}\"\ndisplay_name = \"{}\"\n",
                node.profile.id, node.profile.name
            ));
        }
        let config_path = dir.join("coordinator.toml");
        write(&config_path, &config)?;
        let mut coordinator = Coordinator::build(CoordinatorConfig::load(&config_path)?)?;
        if let Some((listener, _)) = tunnel {
            coordinator = coordinator.with_tunnel(listener);
        }
        let listener = coordinator_listener;
        let coordinator_api = coordinator.api();
        let (stop, stopped) = oneshot::channel::<()>();
        let coordinator_task = tokio::spawn(async move {
            if let Err(e) = coordinator
                .serve(listener, async { stopped.await.unwrap_or(()) })
                .await
            {
                tracing::error!(error = %e, "coordinator stopped with an error");
            }
        });
        // Node tasks and stops come first, in order (`stop_node` relies on it).
        for (node, listener, stopped) in pending {
            tasks.push(tokio::spawn(async move {
                if let Err(e) = node
                    .serve(listener, async { stopped.await.unwrap_or(()) })
                    .await
                {
                    tracing::error!(error = %e, "node stopped with an error");
                }
            }));
        }
        tasks.push(coordinator_task);
        stops.push(stop);
        // Outbound nodes that dial the coordinator directly answer once
        // they have dialled in; through `via`, that is up to the caller.
        let waiting_since = std::time::Instant::now();
        if options.node_link == (NodeLink::Outbound { via: None }) {
            loop {
                let waiting = coordinator_api.awaiting_dial_in();
                if waiting.is_empty() {
                    break;
                }
                if waiting_since.elapsed() > std::time::Duration::from_secs(60) {
                    return Err(Error::NotDialledIn(waiting));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Ok(LocalFederation {
            dir,
            pki,
            coordinator_addr,
            tunnel_addr,
            nodes,
            coordinator: coordinator_api,
            stops,
            tasks,
        })
    }

    /// A coordinator client presenting the certificate of `member`.
    pub async fn client(&self, member: &str) -> Result<CoordinatorServiceClient<Channel>, Error> {
        crate::client::connect_coordinator(
            &format!("https://localhost:{}", self.coordinator_addr.port()),
            &self.pki.tls_files(member),
        )
        .await
        .map_err(Error::from)
    }

    /// Runs `query` (empty: the first) of an approved study as [`REQUESTER`]
    /// and returns the combined result.
    pub async fn run_study(
        &self,
        study_id: &str,
        query: &str,
    ) -> Result<ghx_proto::v1::StudyResult, Error> {
        self.client(REQUESTER)
            .await?
            .run_study(ghx_proto::v1::RunStudyRequest {
                study_id: study_id.to_owned(),
                query: query.to_owned(),
            })
            .await?
            .into_inner()
            .result
            .ok_or_else(|| {
                Error::Rpc(tonic::Status::internal(
                    "RunStudy answered without a result",
                ))
            })
    }

    /// Submits a manifest as `requester` and has [`COMMITTEE`] approve it
    /// (enough for a quorum of one); returns the study id.
    pub async fn approved_study(
        &self,
        requester: &str,
        manifest_json: Vec<u8>,
    ) -> Result<String, Error> {
        let study_id = self
            .client(requester)
            .await?
            .submit_study(ghx_proto::v1::SubmitStudyRequest { manifest_json })
            .await?
            .into_inner()
            .study_id;
        self.client(COMMITTEE)
            .await?
            .approve_study(ghx_proto::v1::ApproveStudyRequest {
                study_id: study_id.clone(),
                note: String::new(),
            })
            .await?;
        Ok(study_id)
    }

    /// Stops one node's server (as if the hospital went offline), letting
    /// its in-flight requests finish; the rest of the federation runs on.
    pub async fn stop_node(&mut self, id: &str) {
        let Some(i) = self.nodes.iter().position(|n| n.profile.id == id) else {
            return;
        };
        // Nodes were started first, in order, so their stop handles and
        // tasks come first too.
        let (stop, _) = oneshot::channel::<()>();
        let _ = std::mem::replace(&mut self.stops[i], stop).send(());
        let task = std::mem::replace(&mut self.tasks[i], tokio::spawn(async {}));
        let _ = task.await;
    }

    /// Restarts one node's server on its address from its configuration and
    /// database, as after a hospital's maintenance window; the coordinator
    /// keeps running and reconnects on its next call.
    pub async fn restart_node(&mut self, id: &str) -> Result<(), Error> {
        let Some(i) = self.nodes.iter().position(|n| n.profile.id == id) else {
            return Ok(());
        };
        self.stop_node(id).await;
        let listener = match self.nodes[i].listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io("bind", Path::new(&addr.to_string())))?,
            ),
            None => None,
        };
        let node = Node::build(NodeConfig::load(&self.nodes[i].config_path)?)?;
        self.nodes[i].store = node.store().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        self.stops[i] = stop;
        self.tasks[i] = tokio::spawn(async move {
            if let Err(e) = node
                .serve(listener, async { stopped.await.unwrap_or(()) })
                .await
            {
                tracing::error!(error = %e, "node stopped with an error");
            }
        });
        Ok(())
    }

    /// The report service as the exchange's recipient, with a new HPKE
    /// key bound to its certificate.
    pub fn recipient(&self) -> Result<crate::exchange::Recipient, Error> {
        let tls = self.pki.tls_files(RECIPIENT);
        let read = |path: &Path| std::fs::read_to_string(path).map_err(io("read", path));
        let mut pins = BTreeMap::new();
        for node in &self.nodes {
            let cert = read(&self.pki.tls_files(node.profile.id).cert)?;
            pins.insert(
                node.profile.id.to_owned(),
                ghx_pki::signed::key_pin(&cert).map_err(|e| Error::Identity(e.to_string()))?,
            );
        }
        Ok(crate::exchange::Recipient::new(
            RECIPIENT,
            ghx_exchange::keys::RecipientKey::generate(),
            &read(&tls.cert)?,
            &read(&tls.key)?,
            &read(&tls.ca)?,
        )
        .map_err(|e| Error::Identity(e.to_string()))?
        .with_hospital_pins(pins))
    }

    /// A resident treated at the most hospitals who consents to the
    /// exchange at each (of those, one with the most diagnoses): their RRN
    /// and their patient id per hospital (read
    /// from the synthetic exports, as the platform's own records would
    /// say).
    pub fn exchange_resident(&self) -> Option<(String, Vec<(String, String)>)> {
        let mut at: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut diagnoses: BTreeMap<String, usize> = BTreeMap::new();
        for node in &self.nodes {
            let lines = |kind: &str| -> Vec<serde_json::Value> {
                std::fs::read_to_string(node.data_dir.join(format!("{kind}.ndjson")))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            };
            let consenting: std::collections::BTreeSet<String> = lines("Consent")
                .iter()
                .filter(|c| c["scope"]["coding"][0]["code"] == "patient-privacy")
                .filter_map(|c| c["patient"]["reference"].as_str())
                .map(|r| r.trim_start_matches("Patient/").to_owned())
                .collect();
            let mut diagnosed: BTreeMap<String, usize> = BTreeMap::new();
            for c in lines("Condition") {
                if let Some(r) = c["subject"]["reference"].as_str() {
                    *diagnosed
                        .entry(r.trim_start_matches("Patient/").to_owned())
                        .or_default() += 1;
                }
            }
            for p in lines("Patient") {
                let id = p["id"].as_str().unwrap_or_default().to_owned();
                let rrn = p["identifier"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|i| {
                        (i["system"] == ghx_synth::RRN_SYSTEM).then(|| i["value"].as_str())?
                    });
                if let Some(rrn) = rrn
                    && consenting.contains(&id)
                {
                    *diagnoses.entry(rrn.to_owned()).or_default() +=
                        diagnosed.get(&id).copied().unwrap_or(0);
                    at.entry(rrn.to_owned())
                        .or_default()
                        .push((node.profile.id.to_owned(), id));
                }
            }
        }
        at.into_iter()
            .max_by_key(|(rrn, ids)| (ids.len(), diagnoses.get(rrn).copied().unwrap_or(0)))
    }

    /// Signs `claims` as the platform's identity service.
    pub fn authorise(&self, claims: &ghx_exchange::request::Claims) -> Result<String, Error> {
        let path = self.pki.root().join("identity.pem");
        let pem = std::fs::read_to_string(&path).map_err(io("read", &path))?;
        ghx_exchange::request::IdentitySigner::from_pem(IDENTITY_KID, &pem)
            .and_then(|s| s.sign(claims))
            .map_err(|e| Error::Identity(e.to_string()))
    }

    /// The running coordinator's service, e.g. to resume training runs.
    pub fn coordinator_api(&self) -> ghx_coordinator::api::CoordinatorApi {
        self.coordinator.clone()
    }

    /// The coordinator's audit trail so far.
    pub fn coordinator_audit(&self) -> Vec<ghx_audit::Entry> {
        self.coordinator
            .audit_trail()
            .expect("the coordinator's audit trail is readable")
    }

    /// Where every keeper's audit log is, to read as `ghx audit` reads it,
    /// also after [`LocalFederation::shutdown`].
    pub fn audit_keepers(&self) -> AuditKeepers {
        AuditKeepers {
            dir: self.dir.clone(),
            pki: self.pki.clone(),
            nodes: self.nodes.iter().map(|n| n.profile.id).collect(),
        }
    }

    /// Stops every server, letting in-flight requests finish.
    pub async fn shutdown(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// A study manifest for `queries` (name, ghx.query/v1 JSON): it declares
/// exactly the resource types and codes the queries read, uses a minimum
/// cell size of 10, no privacy budget, and is valid from a month ago for a
/// year, so demos and tests never depend on the calendar.
pub fn manifest_for(title: &str, purpose: &str, queries: &[(&str, &str)]) -> Vec<u8> {
    manifest_with_budget(title, purpose, queries, 0.0)
}

/// [`manifest_for`] with a differential-privacy budget (epsilon per node).
pub fn manifest_with_budget(
    title: &str,
    purpose: &str,
    queries: &[(&str, &str)],
    privacy_budget: f64,
) -> Vec<u8> {
    use ghx_study::query::QuerySpec;
    let today = time::OffsetDateTime::now_utc().date();
    let date = |d: time::Date| format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day());
    let mut resource_types = std::collections::BTreeSet::new();
    let mut codes = Vec::new();
    let mut named = Vec::new();
    for (name, json) in queries {
        let spec = QuerySpec::parse(json.as_bytes()).expect("a valid query");
        resource_types.extend(spec.resource_types());
        for c in spec.codes_read() {
            codes
                .push(serde_json::json!({"system": c.system, "code": c.code, "match": c.matching}));
        }
        named.push(serde_json::json!({"name": name, "query": spec}));
    }
    serde_json::json!({
        "version": ghx_study::manifest::VERSION,
        "title": title,
        "purpose": purpose,
        "ethics": {
            "committee": "G-Health Data Review Committee",
            "reference": "GH-DRC-DEMO-0001",
            "approved_on": date(today - time::Duration::days(40)),
        },
        "data": {"resource_types": resource_types, "codes": codes},
        "queries": named,
        "min_cell_size": {"default": 10},
        "privacy_budget": privacy_budget,
        "valid_from": date(today - time::Duration::days(30)),
        "valid_until": date(today + time::Duration::days(365)),
    })
    .to_string()
    .into_bytes()
}

/// Where a local federation's keepers keep their audit logs.
pub struct AuditKeepers {
    dir: PathBuf,
    pki: PkiDir,
    nodes: Vec<&'static str>,
}

impl AuditKeepers {
    /// Every keeper's log, read from its database with its certificate, the
    /// coordinator's first.
    pub fn read(&self) -> Result<Vec<ghx_audit::LogExport>, crate::audit_files::Error> {
        let mut keepers = vec![("coordinator", self.dir.join("ghx-coordinator.db"))];
        keepers.extend(
            self.nodes
                .iter()
                .map(|id| (*id, self.dir.join(format!("{id}.db")))),
        );
        keepers
            .iter()
            .map(|(keeper, db)| {
                let cert = crate::audit_files::read_pem(&self.pki.tls_files(keeper).cert)?;
                crate::audit_files::read_database(&db.to_string_lossy(), &cert)
            })
            .collect()
    }

    /// The federation CA certificate file.
    pub fn ca(&self) -> PathBuf {
        self.pki.tls_files("coordinator").ca
    }

    /// Where the federation's files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

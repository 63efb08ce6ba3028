//! The coordinator's configuration file, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The prefix of environment variables that set this service's keys.
pub const ENV_PREFIX: &str = "GHX_COORDINATOR__";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layers(#[from] ghx_config::Error),
    #[error("invalid configuration: {0}")]
    Telemetry(#[from] ghx_telemetry::Error),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    /// Where nodes in outbound-only mode dial in (mTLS); their `[[nodes]]`
    /// entry has `endpoint = "outbound"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_listen: Option<SocketAddr>,
    /// Where studies, votes, results and the audit trail live: a SQLite file
    /// path (relative to this file) or a postgres:// URL.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    pub tls: TlsConfig,
    pub signing_key: SigningKeyConfig,
    /// How long an issued capability stays valid.
    #[serde(default = "default_capability_secs")]
    pub capability_valid_for_secs: u64,
    /// How long the coordinator waits for each node's answer.
    #[serde(default = "default_deadline_secs")]
    pub node_deadline_secs: u64,
    /// How often the coordinator asks every node for its signed audit head
    /// (and gives its own), so that the heads of an idle node, or an idle
    /// coordinator, are witnessed too.
    #[serde(default = "default_heads_secs")]
    pub exchange_heads_every_secs: u64,
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub committee: CommitteeConfig,
    /// Who may add nodes through `RegisterNode`.
    #[serde(default)]
    pub registration: RegistrationConfig,
    /// Audit checkpoints and retention.
    #[serde(default)]
    pub audit: ghx_audit::Settings,
    /// Renewing nodes' short-lived certificates (`RenewCertificate`): the
    /// issuing CA's certificate and key. None: nodes' certificates are
    /// renewed by hand (`ghx pki renew`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerConfig>,
    /// Traces and metrics: exported over OTLP when an endpoint is set.
    #[serde(default)]
    pub telemetry: ghx_telemetry::Settings,
}

/// The CA the coordinator renews node certificates with.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// How long a renewed node certificate is valid.
    #[serde(default = "default_node_cert_hours")]
    pub node_valid_for_hours: u32,
}

fn default_node_cert_hours() -> u32 {
    7 * 24
}

/// Who may add nodes at run time.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Whether a node-admin may register a node id that `[[nodes]]` does
    /// not list (under its own organisation). Off by default: a new id
    /// with a node certificate would receive every query and manifest and
    /// join rounds, so new hospitals are added to this file.
    #[serde(default)]
    pub new_nodes: bool,
}

/// The steering committee: who may decide and how many must approve.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommitteeConfig {
    /// Distinct approvals a study needs (m of n).
    #[serde(default = "default_quorum")]
    pub quorum: usize,
    /// Certificate names of the members; empty admits any committee
    /// certificate.
    #[serde(default)]
    pub members: Vec<String>,
}

impl Default for CommitteeConfig {
    fn default() -> Self {
        CommitteeConfig {
            quorum: default_quorum(),
            members: Vec::new(),
        }
    }
}

fn default_quorum() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    pub kid: String,
    /// Ed25519 private key, PKCS#8 PEM.
    pub private_key: PathBuf,
}

/// A node the coordinator knows from its configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: String,
    /// `https://host:port`, or `outbound` for a node that dials the
    /// coordinator's `tunnel_listen` address.
    pub endpoint: String,
    #[serde(default)]
    pub display_name: String,
}

fn default_database_url() -> String {
    "ghx-coordinator.db".to_owned()
}

fn default_capability_secs() -> u64 {
    300
}

fn default_deadline_secs() -> u64 {
    30
}

fn default_heads_secs() -> u64 {
    3600
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_sources(&ghx_config::Sources {
            file: Some(path.to_owned()),
            ..ghx_config::Sources::default()
        })
    }

    /// Every layer: the defaults, `file`, `GHX_COORDINATOR__*` environment variables
    /// (`__` between table levels) and `--set key=value` overrides, strongest
    /// last; then validated. Relative paths resolve against the file's
    /// directory (the working directory without a file).
    pub fn layered(file: Option<&Path>, overrides: &[String]) -> Result<Self, Error> {
        Self::from_sources(&ghx_config::Sources::from_process(
            file, ENV_PREFIX, overrides,
        ))
    }

    fn from_sources(sources: &ghx_config::Sources) -> Result<Self, Error> {
        let mut config: CoordinatorConfig = sources.load()?;
        let base = sources.base_dir();
        for p in [
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.signing_key.private_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(issuer) = &mut config.issuer {
            for p in [&mut issuer.ca_cert, &mut issuer.ca_key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if !config.database_url.contains("://") && Path::new(&config.database_url).is_relative() {
            config.database_url = base.join(&config.database_url).display().to_string();
        }
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, database password redacted:
    /// what `--print-config` shows.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = ghx_db::redact_url(&shown.database_url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    pub fn validate(&self) -> Result<(), Error> {
        if let Some(node) = self
            .nodes
            .iter()
            .find(|n| n.endpoint == crate::fanout::OUTBOUND)
            && self.tunnel_listen.is_none()
        {
            return Err(Error::Invalid {
                key: "tunnel_listen".to_owned(),
                problem: format!(
                    "must be set: node `{}` connects outbound and dials it",
                    node.id
                ),
            });
        }
        self.telemetry.validate()?;
        if let Err((key, problem)) = self.audit.check() {
            return Err(Error::Invalid {
                key: key.to_owned(),
                problem,
            });
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.endpoint.starts_with("https://") && node.endpoint != crate::fanout::OUTBOUND {
                return Err(Error::Invalid {
                    key: format!("nodes[{i}].endpoint"),
                    problem: format!(
                        "must be an https:// URL, or `{}` for a node that dials in; got `{}`",
                        crate::fanout::OUTBOUND,
                        node.endpoint
                    ),
                });
            }
            if self.nodes[..i].iter().any(|n| n.id == node.id) {
                return Err(Error::Invalid {
                    key: format!("nodes[{i}].id"),
                    problem: format!("`{}` is listed twice", node.id),
                });
            }
        }
        let committee = &self.committee;
        if committee.quorum == 0
            || (!committee.members.is_empty() && committee.quorum > committee.members.len())
        {
            return Err(Error::Invalid {
                key: "committee.quorum".to_owned(),
                problem: format!(
                    "must be between 1 and the number of members ({}), got {}",
                    committee.members.len(),
                    committee.quorum
                ),
            });
        }
        if !(1..=86_400).contains(&self.exchange_heads_every_secs) {
            return Err(Error::Invalid {
                key: "exchange_heads_every_secs".to_owned(),
                problem: format!(
                    "must be between 1 second and a day (witnesses accept heads up to a day old), got {}",
                    self.exchange_heads_every_secs
                ),
            });
        }
        if self.node_deadline_secs == 0 || self.capability_valid_for_secs == 0 {
            return Err(Error::Invalid {
                key: "node_deadline_secs/capability_valid_for_secs".to_owned(),
                problem: "must be at least 1 second".to_owned(),
            });
        }
        Ok(())
    }

    pub fn node_deadline(&self) -> Duration {
        Duration::from_secs(self.node_deadline_secs)
    }

    pub fn exchange_heads_every(&self) -> Duration {
        Duration::from_secs(self.exchange_heads_every_secs)
    }
}

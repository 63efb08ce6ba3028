//! The node's configuration file, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration that cannot be used; the message names the key.
/// The prefix of environment variables that set this service's keys.
pub const ENV_PREFIX: &str = "GHX_NODE__";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layers(#[from] ghx_config::Error),
    #[error("invalid configuration: {0}")]
    Telemetry(#[from] ghx_telemetry::Error),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node id; must equal the common name of the node's certificate.
    pub id: String,
    pub display_name: String,
    /// Address the gRPC server listens on (direct mode). Optional when the
    /// node dials the coordinator instead (`[outbound]`); both may be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Outbound-only mode: the node dials the coordinator and serves its
    /// requests over that connection (for networks that allow outbound
    /// connections only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundConfig>,
    /// A SQLite file path, or a postgres:// URL.
    pub database_url: String,
    /// Smallest count released; smaller cells are suppressed.
    #[serde(default = "default_min_cell_size")]
    pub min_cell_size: u32,
    /// What import does with a resident registration number found in an
    /// identifier: "strip" it (and warn) or "reject" the resource.
    #[serde(default = "default_rrn_policy")]
    pub rrn_policy: String,
    /// The hospital's policy directory: access.cedar, entities.json,
    /// consent.toml (see policies/README.md).
    pub policy_dir: PathBuf,
    pub tls: TlsConfig,
    /// Public keys of the coordinator that sign capabilities, by key id.
    pub coordinator_keys: Vec<CoordinatorKey>,
    /// A directory watched for rotated coordinator keys: a capability signed
    /// with an unknown key id `K` is checked against `K.pub.pem` found here,
    /// so the coordinator can rotate keys without restarting nodes.
    #[serde(default)]
    pub coordinator_keys_dir: Option<PathBuf>,
    /// Most differential-privacy epsilon one requesting organisation may
    /// spend at this node over all its studies, on top of each study's own
    /// budget. On by default ([`DEFAULT_ORGANISATION_EPSILON`]): a study
    /// budget alone starts afresh with every manifest an organisation
    /// submits.
    #[serde(default = "default_organisation_epsilon")]
    pub max_epsilon_per_organisation: Option<f64>,
    /// Which sets of nodes this node sums its values with in secure
    /// aggregation.
    #[serde(default)]
    pub secure_aggregation: SumSettings,
    /// Most model evaluations (a training run's final one, or an external
    /// validation) one study may have at this node: each scores the
    /// held-out patients with a model the requester or the coordinator
    /// chose, so each can be crafted to read something of them.
    #[serde(default = "default_max_evaluations")]
    pub max_evaluations_per_study: u32,
    /// Most runs of one training of a study this node takes part in: each
    /// run is another honest trajectory of the training whose sums the
    /// coordinator sees.
    #[serde(default = "default_max_training_runs")]
    pub max_training_runs_per_study: u32,
    /// Audit checkpoints and retention.
    #[serde(default)]
    pub audit: ghx_audit::Settings,
    /// Traces and metrics: exported over OTLP when an endpoint is set.
    #[serde(default)]
    pub telemetry: ghx_telemetry::Settings,
    /// How `ghx node import` treats what departs from the FHIR format.
    #[serde(default)]
    pub import: ImportSettings,
    /// Which ways of releasing query results this hospital takes part in.
    #[serde(default)]
    pub release: ReleaseSettings,
    /// The federation's link key, for counting each patient once.
    #[serde(default)]
    pub linkage: LinkageSettings,
    /// Residents' own records to the services they choose.
    #[serde(default)]
    pub exchange: ExchangeSettings,
}

/// The exchange ([`ghx_exchange`]): whose signed requests the hospital
/// takes, what it sends, and how much at most.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSettings {
    /// Public keys (Ed25519 SPKI PEM files) of the platform's identity
    /// service, by key id. None: the hospital takes no exchange requests.
    #[serde(default)]
    pub identity_keys: std::collections::BTreeMap<String, PathBuf>,
    /// Resource types the hospital sends (the Patient always).
    #[serde(default = "default_exchange_types")]
    pub types: Vec<String>,
    /// Most resources one answer may hold; larger answers are refused
    /// whole (the resident narrows the period).
    #[serde(default = "default_exchange_max_resources")]
    pub max_resources: u64,
    /// Most bytes of FHIR JSON one answer may hold.
    #[serde(default = "default_exchange_max_bytes")]
    pub max_bytes: u64,
    /// About how many bytes of FHIR JSON go in one part.
    #[serde(default = "default_exchange_part_bytes")]
    pub part_bytes: u64,
}

/// The types import files by patient, which the exchange can find.
pub const EXCHANGEABLE_TYPES: [&str; 4] =
    ["Condition", "Observation", "MedicationRequest", "Encounter"];

fn default_exchange_types() -> Vec<String> {
    EXCHANGEABLE_TYPES.map(str::to_owned).to_vec()
}

fn default_exchange_max_resources() -> u64 {
    50_000
}

fn default_exchange_max_bytes() -> u64 {
    64 << 20
}

fn default_exchange_part_bytes() -> u64 {
    96 << 10
}

impl Default for ExchangeSettings {
    fn default() -> Self {
        ExchangeSettings {
            identity_keys: Default::default(),
            types: default_exchange_types(),
            max_resources: default_exchange_max_resources(),
            max_bytes: default_exchange_max_bytes(),
            part_bytes: default_exchange_part_bytes(),
        }
    }
}

impl ExchangeSettings {
    /// The identity service's keys, read and checked.
    pub fn identity_keys(&self) -> Result<ghx_exchange::request::IdentityKeys, Error> {
        let mut pems = Vec::new();
        for (kid, path) in &self.identity_keys {
            let pem = std::fs::read_to_string(path).map_err(|e| Error::Invalid {
                key: "exchange.identity_keys",
                problem: format!("`{kid}` cannot be read ({}): {e}", path.display()),
            })?;
            pems.push((kid.clone(), pem));
        }
        ghx_exchange::request::IdentityKeys::new(pems.iter().map(|(k, p)| (k.as_str(), p.as_str())))
            .map_err(|e| Error::Invalid {
                key: "exchange.identity_keys",
                problem: e.to_string(),
            })
    }

    fn resolve(&mut self, base: &Path) {
        for p in self.identity_keys.values_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// Where the federation's link key is ([`ghx_disclosure::linkage`]): 64
/// hexadecimal characters the hospitals share and the coordinator never
/// has. Import turns each Patient's RRN into a token under it; pooled
/// queries that count each patient once place patients by it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LinkageSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl LinkageSettings {
    /// The key, read and checked; `None` when no file is set.
    pub fn key(&self) -> Result<Option<ghx_disclosure::linkage::LinkKey>, Error> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::Invalid {
            key: "linkage.key_file",
            problem: format!("cannot be read ({}): {e}", path.display()),
        })?;
        ghx_disclosure::linkage::LinkKey::parse(&text)
            .map(Some)
            .map_err(|e| Error::Invalid {
                key: "linkage.key_file",
                problem: format!("({}): {e}", path.display()),
            })
    }

    fn resolve(&mut self, base: &Path) {
        if let Some(p) = &mut self.key_file
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }
}

/// Which ways of releasing query results this hospital takes part in: its
/// own cells (suppressed here), and pooled tables (its raw cells summed
/// with the other hospitals' under secure aggregation).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSettings {
    /// Release this hospital's own cells (a manifest query whose release
    /// is `per_hospital`). Off: only pooled tables, so that no table of
    /// this hospital alone ever leaves it.
    #[serde(default = "yes")]
    pub per_hospital: bool,
    /// Contribute to pooled tables.
    #[serde(default = "yes")]
    pub pooled: bool,
    /// Contribute to a pooled table without noise. Off by default: then
    /// the coordinator would see the federation's small totals before
    /// suppressing them. Needs `per_hospital = false`: an exact pooled
    /// total less the other hospitals' released cells is this one's.
    #[serde(default)]
    pub pooled_without_noise: bool,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        ReleaseSettings {
            per_hospital: true,
            pooled: true,
            pooled_without_noise: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// How import treats resources that depart from the FHIR format.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// Accept resources with unknown elements or empty values (counted and
    /// listed in the rejects file) instead of rejecting them. Off: the
    /// standard's strictness.
    #[serde(default)]
    pub lenient: bool,
}

/// What the offline commands (`ghx node import`, `export`, `status`,
/// `load-code-map`, `reindex`) read from a node's configuration file: the
/// database and how import treats data. The running node's keys (TLS,
/// coordinator keys, listening address) may be absent, so a hospital can
/// load data before it has certificates; an unknown key is still an error.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    pub database_url: String,
    #[serde(default = "default_rrn_policy")]
    pub rrn_policy: String,
    #[serde(default)]
    pub import: ImportSettings,
    /// The link key import derives Patients' linkage tokens with.
    #[serde(default)]
    pub linkage: LinkageSettings,
    /// For the consent picture (`consent.toml`), when set.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    // The running node's keys, accepted and not read offline.
    #[serde(default, rename = "id")]
    _id: Option<toml::Value>,
    #[serde(default, rename = "display_name")]
    _display_name: Option<toml::Value>,
    #[serde(default, rename = "listen")]
    _listen: Option<toml::Value>,
    #[serde(default, rename = "outbound")]
    _outbound: Option<toml::Value>,
    #[serde(default, rename = "min_cell_size")]
    _min_cell_size: Option<toml::Value>,
    #[serde(default, rename = "tls")]
    _tls: Option<toml::Value>,
    #[serde(default, rename = "coordinator_keys")]
    _coordinator_keys: Option<toml::Value>,
    #[serde(default, rename = "coordinator_keys_dir")]
    _coordinator_keys_dir: Option<toml::Value>,
    #[serde(default, rename = "max_epsilon_per_organisation")]
    _max_epsilon_per_organisation: Option<toml::Value>,
    #[serde(default, rename = "secure_aggregation")]
    _secure_aggregation: Option<toml::Value>,
    #[serde(default, rename = "max_evaluations_per_study")]
    _max_evaluations_per_study: Option<toml::Value>,
    #[serde(default, rename = "max_training_runs_per_study")]
    _max_training_runs_per_study: Option<toml::Value>,
    #[serde(default, rename = "audit")]
    _audit: Option<toml::Value>,
    #[serde(default, rename = "telemetry")]
    _telemetry: Option<toml::Value>,
    #[serde(default, rename = "release")]
    _release: Option<toml::Value>,
}

impl OfflineConfig {
    /// Reads the file (and `GHX_NODE__*` variables) for an offline command.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let sources = ghx_config::Sources::from_process(Some(path), ENV_PREFIX, &[]);
        let mut config: OfflineConfig = sources.load()?;
        let base = sources.base_dir();
        if !config.database_url.contains("://") && Path::new(&config.database_url).is_relative() {
            config.database_url = base.join(&config.database_url).display().to_string();
        }
        if let Some(dir) = &mut config.policy_dir
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
        config.linkage.resolve(&base);
        if config.linkage.key()?.is_some() && config.rrn_policy == "reject" {
            return Err(Error::Invalid {
                key: "linkage.key_file",
                problem: "is of no use with rrn_policy = \"reject\": a Patient with an RRN is rejected, so none gets a linkage token".to_owned(),
            });
        }
        if let Err(problem) = config.rrn_policy.parse::<crate::import::RrnPolicy>() {
            return Err(Error::Invalid {
                key: "rrn_policy",
                problem,
            });
        }
        Ok(config)
    }
}

/// Where an outbound-only node dials.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// The coordinator's tunnel address, `host:port`.
    pub coordinator: String,
    /// The name the coordinator's certificate must carry.
    #[serde(default = "default_coordinator_name")]
    pub server_name: String,
}

fn default_coordinator_name() -> String {
    "coordinator".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The coordinator's gRPC address (`https://host:port`) to renew this
    /// node's certificate through, in the last third of its life; none:
    /// renewed by hand (`ghx pki renew`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_from: Option<String>,
    /// How often renewal looks at the certificate.
    #[serde(default = "default_renew_check_secs")]
    pub renew_check_secs: u64,
}

fn default_renew_check_secs() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorKey {
    pub kid: String,
    /// Ed25519 public key, SPKI PEM.
    pub public_key: PathBuf,
}

/// Which sets of nodes this node sums its values with
/// ([`crate::participants`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SumSettings {
    /// Fewest nodes a sum may be taken over, this node included: with two,
    /// either one learns the other's values from the sum.
    #[serde(default = "default_min_participants")]
    pub min_participants: u32,
    /// The federation's node ids. When set, a round naming any other node
    /// is refused, so that whoever can issue node certificates cannot make
    /// up a node whose values it knows and subtract them. Empty: any node
    /// holding a certificate of the federation's CA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Node id to the pin of its certificate key (`ghx pki pin --cert
    /// FILE`: hex SHA-256 of the raw public key, the EC point, not of the
    /// DER SubjectPublicKeyInfo that `openssl` pins hash). A pinned node's
    /// round keys and lineage inputs are taken only under a certificate
    /// of that key, so that whoever can issue certificates cannot
    /// impersonate it. Renewal keeps a node's key; a new key needs new
    /// pins at the other nodes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub member_keys: std::collections::BTreeMap<String, String>,
}

impl Default for SumSettings {
    fn default() -> Self {
        SumSettings {
            min_participants: default_min_participants(),
            members: Vec::new(),
            member_keys: Default::default(),
        }
    }
}

/// Evaluations one study may have at a node unless configured otherwise.
pub const DEFAULT_MAX_EVALUATIONS: u32 = 20;

fn default_max_evaluations() -> u32 {
    DEFAULT_MAX_EVALUATIONS
}

/// Runs of one training of a study a node takes part in unless configured
/// otherwise.
pub const DEFAULT_MAX_TRAINING_RUNS: u32 = 20;

fn default_max_training_runs() -> u32 {
    DEFAULT_MAX_TRAINING_RUNS
}

/// Fewest nodes in a sum unless configured otherwise.
pub const DEFAULT_MIN_PARTICIPANTS: u32 = 3;

fn default_min_participants() -> u32 {
    DEFAULT_MIN_PARTICIPANTS
}

fn default_min_cell_size() -> u32 {
    10
}

fn default_rrn_policy() -> String {
    "strip".to_owned()
}

/// What one organisation may spend at a node over all its studies unless
/// the node's configuration says otherwise.
pub const DEFAULT_ORGANISATION_EPSILON: f64 = 10.0;

fn default_organisation_epsilon() -> Option<f64> {
    Some(DEFAULT_ORGANISATION_EPSILON)
}

impl NodeConfig {
    /// Reads and validates a TOML configuration file. Relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_sources(&ghx_config::Sources {
            file: Some(path.to_owned()),
            ..ghx_config::Sources::default()
        })
    }

    /// Every layer: the defaults, `file`, `GHX_NODE__*` environment variables
    /// (`__` between table levels) and `--set key=value` overrides, strongest
    /// last; then validated. Relative paths resolve against the file's
    /// directory (the working directory without a file).
    pub fn layered(file: Option<&Path>, overrides: &[String]) -> Result<Self, Error> {
        Self::from_sources(&ghx_config::Sources::from_process(
            file, ENV_PREFIX, overrides,
        ))
    }

    fn from_sources(sources: &ghx_config::Sources) -> Result<Self, Error> {
        let mut config: NodeConfig = sources.load()?;
        config.resolve_paths(&sources.base_dir());
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

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.policy_dir);
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        for key in &mut self.coordinator_keys {
            fix(&mut key.public_key);
        }
        if let Some(dir) = &mut self.coordinator_keys_dir {
            fix(dir);
        }
        self.linkage.resolve(base);
        self.exchange.resolve(base);
        let is_url = self.database_url.contains("://");
        if !is_url && Path::new(&self.database_url).is_relative() {
            self.database_url = base.join(&self.database_url).display().to_string();
        }
    }

    /// Checks the values that TOML types alone cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let id_ok = !self.id.is_empty()
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(Error::Invalid {
                key: "id",
                problem: "must be lowercase letters, digits and '-'".to_owned(),
            });
        }
        if self.listen.is_none() && self.outbound.is_none() {
            return Err(Error::Invalid {
                key: "listen",
                problem:
                    "or [outbound] must be set: the node either listens or dials the coordinator"
                        .to_owned(),
            });
        }
        if let Some(outbound) = &self.outbound {
            let port_ok = outbound
                .coordinator
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Error::Invalid {
                    key: "outbound.coordinator",
                    problem: format!(
                        "`{}` must be host:port of the coordinator's tunnel",
                        outbound.coordinator
                    ),
                });
            }
        }
        if let Some(from) = &self.tls.renew_from
            && !from.starts_with("https://")
        {
            return Err(Error::Invalid {
                key: "tls.renew_from",
                problem: format!("`{from}` must be the coordinator's https://host:port"),
            });
        }
        if self.tls.renew_check_secs == 0 {
            return Err(Error::Invalid {
                key: "tls.renew_check_secs",
                problem: "must be at least 1".to_owned(),
            });
        }
        if self.min_cell_size == 0 {
            return Err(Error::Invalid {
                key: "min_cell_size",
                problem: "must be at least 1".to_owned(),
            });
        }
        if let Err(problem) = self.rrn_policy.parse::<crate::import::RrnPolicy>() {
            return Err(Error::Invalid {
                key: "rrn_policy",
                problem,
            });
        }
        if let Some(epsilon) = self.max_epsilon_per_organisation
            && !(epsilon.is_finite() && epsilon >= 0.0)
        {
            return Err(Error::Invalid {
                key: "max_epsilon_per_organisation",
                problem: "must be a finite, non-negative epsilon".to_owned(),
            });
        }
        self.exchange.identity_keys()?;
        if let Some(t) = self
            .exchange
            .types
            .iter()
            .find(|t| !EXCHANGEABLE_TYPES.contains(&t.as_str()))
        {
            return Err(Error::Invalid {
                key: "exchange.types",
                problem: format!(
                    "names {t}; the exchange sends {} (the types import files by patient)",
                    EXCHANGEABLE_TYPES.join(", ")
                ),
            });
        }
        if self.exchange.part_bytes < 4096 || self.exchange.max_resources == 0 {
            return Err(Error::Invalid {
                key: "exchange.part_bytes",
                problem: "must be at least 4096, and exchange.max_resources above 0".to_owned(),
            });
        }
        if self.linkage.key()?.is_some() && self.rrn_policy == "reject" {
            return Err(Error::Invalid {
                key: "linkage.key_file",
                problem: "is of no use with rrn_policy = \"reject\": a Patient with an RRN is rejected, so none gets a linkage token".to_owned(),
            });
        }
        if self.release.pooled_without_noise && self.release.per_hospital {
            return Err(Error::Invalid {
                key: "release.pooled_without_noise",
                problem: "needs release.per_hospital = false: an exact pooled total less the other hospitals' own cells is this hospital's cell".to_owned(),
            });
        }
        if self.secure_aggregation.min_participants < 2 {
            return Err(Error::Invalid {
                key: "secure_aggregation.min_participants",
                problem: "must be at least 2: a sum over one node is that node's values".to_owned(),
            });
        }
        if !self.secure_aggregation.members.is_empty()
            && !self.secure_aggregation.members.contains(&self.id)
        {
            return Err(Error::Invalid {
                key: "secure_aggregation.members",
                problem: format!("must include this node's own id `{}`", self.id),
            });
        }
        for (node, pin) in &self.secure_aggregation.member_keys {
            if pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(Error::Invalid {
                    key: "secure_aggregation.member_keys",
                    problem: format!(
                        "the pin of `{node}` must be 64 hex digits (`ghx pki pin --cert FILE`)"
                    ),
                });
            }
            let members = &self.secure_aggregation.members;
            if !members.is_empty() && !members.contains(node) {
                return Err(Error::Invalid {
                    key: "secure_aggregation.member_keys",
                    problem: format!("pins `{node}`, which is not one of the members"),
                });
            }
        }
        if self.coordinator_keys.is_empty() {
            return Err(Error::Invalid {
                key: "coordinator_keys",
                problem: "must list at least one coordinator public key".to_owned(),
            });
        }
        self.telemetry.validate()?;
        if let Err((key, problem)) = self.audit.check() {
            return Err(Error::Invalid { key, problem });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    const GOOD: &str = r#"
        id = "chosun"
        display_name = "Chosun University Hospital"
        listen = "127.0.0.1:7443"
        database_url = "chosun.db"
        policy_dir = "policies/chosun"
        [tls]
        ca = "pki/ca.pem"
        cert = "pki/chosun.pem"
        key = "pki/chosun.key"
        [[coordinator_keys]]
        kid = "k1"
        public_key = "coordinator.pub.pem"
    "#;

    #[test]
    fn defaults_apply_and_relative_paths_resolve_against_the_file() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.min_cell_size, 10);
        // Issue 38 (10): an organisation's budget over all its studies is
        // capped unless configured otherwise.
        assert_eq!(
            config.max_epsilon_per_organisation,
            Some(DEFAULT_ORGANISATION_EPSILON)
        );
        // Issue 38 (4): sums over at least three nodes unless configured.
        assert_eq!(config.secure_aggregation, SumSettings::default());
        assert_eq!(config.secure_aggregation.min_participants, 3);
        assert_eq!(config.max_evaluations_per_study, DEFAULT_MAX_EVALUATIONS);
        assert_eq!(
            config.max_training_runs_per_study,
            DEFAULT_MAX_TRAINING_RUNS
        );
        assert!(config.tls.ca.is_absolute());
        assert!(config.database_url.ends_with("/chosun.db"));
    }

    #[test]
    fn a_node_listens_or_dials_out() {
        let listen = "        listen = \"127.0.0.1:7443\"\n";
        assert!(GOOD.contains(listen));
        let neither = GOOD.replace(listen, "");
        let err = parse(&neither).unwrap_err().to_string();
        assert!(err.contains("`listen` or [outbound] must be set"), "{err}");
        let outbound = parse(&format!(
            "{neither}\n[outbound]\ncoordinator = \"ghealth.example.kr:7444\"\n"
        ))
        .unwrap();
        assert_eq!(outbound.listen, None);
        let dial = outbound.outbound.unwrap();
        assert_eq!(
            (dial.coordinator.as_str(), dial.server_name.as_str()),
            ("ghealth.example.kr:7444", "coordinator")
        );
        let err = parse(&format!(
            "{neither}\n[outbound]\ncoordinator = \"https://ghealth.example.kr\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`outbound.coordinator`"), "{err}");
        let err = parse(&format!(
            "{GOOD}\n[telemetry]\notlp_endpoint = \"collector:4317\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("telemetry.otlp_endpoint `collector:4317`"),
            "{err}"
        );
    }

    #[test]
    fn exact_pooling_needs_no_release_per_hospital() {
        let err = parse(&format!("{GOOD}\n[release]\npooled_without_noise = true\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`release.pooled_without_noise` needs release.per_hospital = false"),
            "{err}"
        );
        let ok = parse(&format!(
            "{GOOD}\n[release]\npooled_without_noise = true\nper_hospital = false\n"
        ))
        .unwrap();
        assert!(ok.release.pooled && !ok.release.per_hospital);
        assert_eq!(parse(GOOD).unwrap().release, ReleaseSettings::default());
    }

    #[test]
    fn a_link_key_file_is_read_and_checked_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("link.key");
        std::fs::write(&good, ghx_disclosure::linkage::LinkKey::generate()).unwrap();
        let config = parse(&format!(
            "{GOOD}\n[linkage]\nkey_file = \"{}\"\n",
            good.display()
        ))
        .unwrap();
        assert!(config.linkage.key().unwrap().is_some());
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "secret-but-not-hex").unwrap();
        let err = parse(&format!(
            "{GOOD}\n[linkage]\nkey_file = \"{}\"\n",
            bad.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`linkage.key_file`") && err.contains("64 hexadecimal"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        assert!(matches!(parse(GOOD).unwrap().linkage.key(), Ok(None)));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let err = parse(&GOOD.replace("127.0.0.1:7443", "nowhere")).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = parse(&GOOD.replace("id = \"chosun\"", "id = \"Chosun Hospital\"")).unwrap_err();
        assert!(err.to_string().contains("`id`"), "{err}");
        let err = parse(&format!("min_cell_size = 0\n{GOOD}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`min_cell_size` must be at least 1"),
            "{err}"
        );
        let err = parse(&format!("max_epsilon_per_organisation = -1.0\n{GOOD}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`max_epsilon_per_organisation` must be a finite, non-negative epsilon"),
            "{err}"
        );
        let err = parse(&format!(
            "{GOOD}\n[secure_aggregation]\nmin_participants = 1\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`secure_aggregation.min_participants` must be at least 2"),
            "{err}"
        );
        let pin = "ab".repeat(32);
        let err = parse(&format!(
            "{GOOD}\n[secure_aggregation]\nmembers = [\"chosun\"]\nmember_keys = {{ chonnam = \"{pin}\" }}\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("pins `chonnam`, which is not one of the members"),
            "{err}"
        );
        let err = parse(&format!(
            "{GOOD}\n[secure_aggregation]\nmember_keys = {{ chonnam = \"abc\" }}\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("must be 64 hex digits"), "{err}");
        let ok = parse(&format!(
            "{GOOD}\n[secure_aggregation]\nmember_keys = {{ chonnam = \"{pin}\" }}\n"
        ))
        .unwrap();
        assert_eq!(ok.secure_aggregation.member_keys["chonnam"], pin);
        let err = parse(&format!(
            "{GOOD}\n[secure_aggregation]\nmembers = [\"chonnam\", \"christian\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("must include this node's own id `chosun`"),
            "{err}"
        );
        let err = parse(&format!("rrn_policy = \"keep\"\n{GOOD}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`rrn_policy` unknown RRN policy `keep`"),
            "{err}"
        );
        let err = parse(&format!("colour = 1\n{GOOD}")).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let err = parse(&format!("{GOOD}\n[audit]\nretention_days = 365\n")).unwrap_err();
        assert!(
            err.to_string().contains(
                "`audit.retention_days` must be at least 730 (access logs are kept at least 2 years), got 365"
            ),
            "{err}"
        );
        let err = parse(&format!("{GOOD}\n[audit]\ncheckpoint_every = 0\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`audit.checkpoint_every` must be between 1 and 100000"),
            "{err}"
        );
        assert_eq!(parse(GOOD).unwrap().audit, ghx_audit::Settings::default());
    }
}

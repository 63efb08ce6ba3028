//! The command line of `ghx`: every command, its arguments and their help
//! text (clap), and nothing that runs them (that is `cmd`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ghx",
    version,
    about = "G-Health federation: hospital nodes, coordinator and tools"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run a coordinator and three hospital nodes in this process on synthetic
    /// data, run one approved study, and print the result.
    Demo(DemoArgs),
    /// Write seeded synthetic FHIR R4 NDJSON for one hospital.
    Synth(SynthArgs),
    /// Measure end-to-end federated query latency over mTLS against the
    /// same SQL run locally (numbers only; build with --release).
    Bench(BenchArgs),
    /// Measure federated training: per-round coordination overhead and
    /// total time, against Flower on the same rows (build with --release).
    BenchTrain(BenchTrainArgs),
    /// Measure the exchange: one resident's long record from the three
    /// hospitals delivered, opened, checked and merged (build with
    /// --release).
    BenchExchange(BenchExchangeArgs),
    /// Manage the federation CA, certificates and the coordinator signing key.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run or load data into a hospital node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run the coordinator.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Requester commands: submit studies, run them, read results.
    #[command(subcommand)]
    Study(StudyCommand),
    /// Steering committee commands.
    #[command(subcommand)]
    Committee(CommitteeCommand),
    /// Requester commands for federated training: start a run and follow
    /// it, check on one, validate a model at every hospital.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Privacy officer commands: write, validate and try out a hospital's
    /// access and consent policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Steering committee and hospital audit: verify a log's hash chain and
    /// signatures, export it (chain or FHIR AuditEvent), reconcile the
    /// coordinator's record with the nodes', write the monthly review.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The exchange: a resident's own records from the hospitals they
    /// name to the service they chose (identity service and recipient
    /// commands).
    #[command(subcommand)]
    Exchange(ExchangeCommand),
}

#[derive(Subcommand)]
pub(crate) enum ExchangeCommand {
    /// The platform identity service: write a new Ed25519 signing key
    /// (`identity.pem`) and its public half (`identity.pub.pem`, for the
    /// hospitals' `[exchange] identity_keys`).
    IdentityKey {
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// The recipient service: write a new HPKE (X25519) key file.
    RecipientKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// The platform identity service: sign a resident's request (after
    /// proofing their identity) and print it.
    Authorise(AuthoriseArgs),
    /// The recipient service: relay a signed request through the
    /// coordinator, open and check every hospital's answer, and write the
    /// merged record as one FHIR Bundle.
    Fetch {
        #[command(flatten)]
        client: ClientArgs,
        /// The recipient's HPKE key file (`ghx exchange recipient-key`).
        #[arg(long)]
        recipient_key: PathBuf,
        /// The signed request, or @FILE holding it.
        #[arg(long)]
        request: String,
        /// Where to write the merged Bundle (JSON).
        #[arg(long)]
        out: PathBuf,
        /// A hospital's certificate key pin, HOSPITAL=PIN (`ghx pki pin`;
        /// repeat): its parts are taken only under that key.
        #[arg(long)]
        hospital_pin: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct AuthoriseArgs {
    /// The identity service's signing key (`identity.pem`).
    #[arg(long)]
    pub identity_key: PathBuf,
    /// Its key id, as the hospitals name it in `[exchange] identity_keys`.
    #[arg(long, default_value = "platform")]
    pub kid: String,
    /// The hospitals (node ids) asked, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub hospitals: Vec<String>,
    /// The recipient service's certificate name.
    #[arg(long)]
    pub recipient: String,
    /// The recipient's registered HPKE public key (hex; `ghx exchange
    /// recipient-key` prints it): hospitals seal only to this key.
    #[arg(long)]
    pub recipient_key: String,
    /// FHIR search parameters, e.g. `_type=Observation,Condition&date=ge2021-01-01`.
    #[arg(
        long,
        default_value = "_type=Condition,Observation,MedicationRequest,Encounter"
    )]
    pub scope: String,
    /// HL7 v3 ActReason: PATRQT (the resident's own request) or TREAT.
    #[arg(long, default_value = "PATRQT")]
    pub purpose: String,
    /// The resident's registration number, turned into their linkage token
    /// with --link-key (the number itself is not in the request).
    #[arg(long, requires = "link_key", conflicts_with_all = ["link_token", "patient"])]
    pub rrn: Option<String>,
    /// The federation's link key file.
    #[arg(long)]
    pub link_key: Option<PathBuf>,
    /// The resident's linkage token, when already known.
    #[arg(long, conflicts_with = "patient")]
    pub link_token: Option<String>,
    /// Or the resident's patient id at a hospital, as HOSPITAL=ID (repeat).
    #[arg(long)]
    pub patient: Vec<String>,
    /// Ask for the history of who received the resident's records instead.
    #[arg(long)]
    pub history: bool,
    /// Seconds the request stays valid (at most 900).
    #[arg(long, default_value_t = 300)]
    pub valid_secs: i64,
}

/// Where a log comes from: a keeper's database (with the keeper's
/// certificate) or a chain export file.
#[derive(Args)]
pub(crate) struct LogArgs {
    /// The keeper's database: a SQLite path or a postgres:// URL. Opened as
    /// it is: nothing is migrated or written.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub db: Option<String>,
    /// A chain export (`ghx audit export --format chain`).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The keeper's certificate (PEM): names the keeper and checks its
    /// signed checkpoints. Required with --db.
    #[arg(long, required_unless_present = "file")]
    pub cert: Option<PathBuf>,
    /// The federation CA certificate: the certificate used (given, or the
    /// one inside an export) must be one it issued.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Another keeper's database, for the signed heads of this log it holds
    /// (the coordinator's for a node's log, any node's for the
    /// coordinator's): the log must reach and agree with each. Read before
    /// the log, as it is. Repeatable.
    #[arg(long = "witness-db")]
    pub witness_dbs: Vec<String>,
    /// Another keeper's chain export, for the heads of this log it holds.
    /// Repeatable.
    #[arg(long = "witness-file")]
    pub witness_files: Vec<PathBuf>,
    /// The retention period in days: a log that starts after entry 1 must
    /// be anchored by a checkpoint signed at least this long ago.
    #[arg(long, default_value_t = ghx_audit::MIN_RETENTION_DAYS)]
    pub retention_days: u32,
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Checks every entry's hash and link and every signed checkpoint;
    /// names the first broken entry and exits with status 1 if any.
    Verify(LogArgs),
    /// Writes the log: `chain` (the whole log with checkpoints and
    /// certificate, for verify and reconcile elsewhere) or `fhir` (FHIR R4
    /// AuditEvent NDJSON for a period). A broken log is not exported.
    Export {
        #[command(flatten)]
        log: LogArgs,
        #[arg(long, default_value = "chain", value_parser = ["chain", "fhir"])]
        format: String,
        #[arg(long)]
        out: PathBuf,
        /// A calendar month, YYYY-MM (fhir only).
        #[arg(long, conflicts_with_all = ["from", "to"])]
        month: Option<String>,
        /// First day, YYYY-MM-DD (fhir only).
        #[arg(long)]
        from: Option<String>,
        /// Day after the last, YYYY-MM-DD (fhir only).
        #[arg(long)]
        to: Option<String>,
    },
    /// Compares the coordinator's record of every request it sent with each
    /// node's record of what it answered; exits with status 1 on any alarm
    /// (a request a node answered that the coordinator never sent, a lost
    /// record, a different result) or any log that does not verify.
    Reconcile {
        /// The coordinator's chain export.
        #[arg(long)]
        coordinator: PathBuf,
        /// Each node's chain export.
        #[arg(long = "node", required = true)]
        nodes: Vec<PathBuf>,
        /// The federation CA: each export's certificate must be one it issued.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Limit to one calendar month, YYYY-MM.
        #[arg(long)]
        month: Option<String>,
        /// The retention period in days (see `verify`).
        #[arg(long, default_value_t = ghx_audit::MIN_RETENTION_DAYS)]
        retention_days: u32,
    },
    /// The review of a period per requester and per study: requests,
    /// answers, refusals with reasons, cells released, budget spent.
    Report {
        #[command(flatten)]
        log: LogArgs,
        /// The calendar month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Write the Markdown here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Write the shipped default policies of a hospital into a directory.
    Init {
        /// chonnam, chosun or christian.
        #[arg(long)]
        hospital: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Validate a policy directory against the ghx schema; given a query,
    /// also decide whether a study running it would be allowed here. Exits
    /// with status 1 when the study would be refused.
    Check {
        /// The policy directory (access.cedar, entities.json, consent.toml).
        dir: PathBuf,
        /// A study manifest (ghx.manifest/v1) or a single query
        /// (ghx.query/v1) to decide.
        query: Option<PathBuf>,
        /// The requesting organisation, as its certificates name it.
        #[arg(long, default_value = "Gwangju Health Startup")]
        org: String,
        #[arg(long, default_value = "requester")]
        requester: String,
        /// Purpose of use (HL7 v3 ActReason code).
        #[arg(long, default_value = "HRESCH")]
        purpose: String,
        /// count, statistics, training or evaluation; by default what the
        /// node would ask for each query (count or statistics).
        #[arg(long)]
        action: Option<String>,
        /// The node id; defaults to the directory's name.
        #[arg(long)]
        node: Option<String>,
        /// The node's minimum cell size.
        #[arg(long, default_value_t = 10)]
        min_cell_size: u32,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 100_000)]
    pub patients: usize,
    /// Measured runs per query.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Nodes dial the coordinator (outbound-only mode) instead of listening.
    #[arg(long)]
    pub outbound: bool,
}

#[derive(Args)]
pub(crate) struct BenchExchangeArgs {
    /// Measured runs (after one warm-up).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// The resident's resources at each hospital (about).
    #[arg(long, default_value_t = 667)]
    pub per_hospital: usize,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct BenchTrainArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 50_000)]
    pub patients: usize,
    #[arg(long, default_value_t = 50)]
    pub rounds: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train a small MLP with this many hidden units instead of logistic
    /// regression (Flower trains the same MLP).
    #[arg(long)]
    pub mlp_hidden_units: Option<u32>,
    /// A Python interpreter with flwr and numpy installed
    /// (`pip install flwr numpy`); without it Flower is skipped.
    #[arg(long)]
    pub flower_python: Option<PathBuf>,
    /// The Flower side of the comparison.
    #[arg(long, default_value = "bench/flower_fedavg.py")]
    pub flower_script: PathBuf,
    /// Make ghx's run and Flower's two runs this many times, taking turns on
    /// the same federation, and give each figure's median over them too.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 2000)]
    pub patients: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Minimum cell size every node applies.
    #[arg(long, default_value_t = 10)]
    pub min_cell_size: u32,
    /// Keep the working directory (PKI, configs, databases) here instead of a
    /// temporary directory that is removed at exit.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// chonnam, chosun or christian.
    #[arg(long)]
    pub hospital: String,
    #[arg(long, default_value_t = 1000)]
    pub patients: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory; one <ResourceType>.ndjson file per type.
    #[arg(long)]
    pub out: PathBuf,
    /// The code system of diagnoses, as other tools write them: kcd8,
    /// icd10cm or snomed (snomed also writes snomed-kcd.csv, the map to load).
    #[arg(long, default_value = "kcd8")]
    pub coding: String,
    /// Write no Consent resources (an EHR export without them).
    #[arg(long)]
    pub no_consents: bool,
    /// Export noise: lab values with many decimals, unknown extensions,
    /// Patients repeated in a second file.
    #[arg(long)]
    pub noise: bool,
    /// Share (0 to 1, e.g. 0.2) of the hospital's patients who are also
    /// treated at one or two of the others: with the same seed, the
    /// hospitals' exports hold the same residents (the same resident
    /// registration number) under their own ids. Above zero every patient
    /// carries a resident registration number.
    #[arg(long, default_value_t = 0.0)]
    pub shared: f64,
}

#[derive(Subcommand)]
pub(crate) enum PkiCommand {
    /// Create a new federation CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "G-Health")]
        federation: String,
    },
    /// Issue a certificate signed by the CA in DIR, as <name>.pem/<name>.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Node id, `coordinator`, or a user name.
        #[arg(long)]
        name: String,
        /// coordinator, node, requester, committee, auditor or node-admin.
        #[arg(long)]
        role: String,
        /// The holder's institution.
        #[arg(long)]
        org: String,
        /// Host names or IP addresses the service is reached at (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Validity as a duration (`7d`, `36h`, `90m`), instead of --days:
        /// short-lived certificates for nodes, renewed with `ghx pki renew`.
        #[arg(long, value_parser = parse_validity)]
        valid_for: Option<time::Duration>,
    },
    /// Renew <name>.pem with the CA in DIR: same holder, role, organisation
    /// and hosts, valid from now; the same key unless --new-key. The file is
    /// replaced atomically and a running node or coordinator presents the
    /// renewed certificate on new connections within seconds, without a
    /// restart.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// `7d`, `36h`, `90m`.
        #[arg(long, default_value = "7d", value_parser = parse_validity)]
        valid_for: time::Duration,
        /// Also replace the key pair (audit checkpoints signed before are
        /// then verified with the previous certificate).
        #[arg(long)]
        new_key: bool,
    },
    /// Print the pin of a node certificate's key, for the other nodes'
    /// `secure_aggregation.member_keys` (renewal keeps it).
    Pin {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Create the coordinator's Ed25519 capability signing key pair.
    SigningKey {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "coordinator-signing")]
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum NodeCommand {
    /// Serve the node's gRPC API until interrupted. Configuration layers:
    /// defaults, the --config file, GHX_NODE__* variables (e.g.
    /// GHX_NODE__AUDIT__RETENTION_DAYS=1000), --set flags.
    Run {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: Option<PathBuf>,
        /// Override one key, as in the file: `--set audit.retention_days=1000`
        /// (repeatable; stronger than the file and GHX_NODE__* variables).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the effective configuration (every layer applied and
        /// validated, database password redacted) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Import FHIR NDJSON files, Bundles (optionally .gz) or directories of
    /// them. Offline: needs only the database settings of the node's file.
    /// Each file is imported whole or not at all; the exit code is non-zero
    /// when any file was not imported.
    Import {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        batch_size: usize,
        /// Parser threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Start files from the beginning even if an earlier import of them
        /// was interrupted.
        #[arg(long)]
        no_resume: bool,
        /// The rejects file: one line per rejected resource, failed file and
        /// warning (always written; default ghx-import-<time>.rejects.txt in
        /// the working directory).
        #[arg(long)]
        rejects: Option<PathBuf>,
        /// Accept resources that depart from the FHIR format (unknown
        /// elements, empty values), counting them (overrides import.lenient).
        #[arg(long)]
        lenient: bool,
    },
    /// What the node holds at a glance: resources by type, the code systems
    /// of its diagnoses, labs and prescriptions, and the consent picture.
    Status {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
    },
    /// Export the current resources as NDJSON, one file per resource type.
    Export {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Only this resource type.
        #[arg(long = "type")]
        resource_type: Option<String>,
    },
    /// Load a local code map and re-index: HIRA EDI -> LOINC lab codes
    /// (CSV edi_code,loinc_code) or SNOMED CT -> KCD-8 diagnoses (CSV
    /// snomed_code,kcd_code), so that local codes count under the standard.
    LoadCodeMap {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
        /// edi-loinc or snomed-kcd.
        #[arg(long, default_value = "edi-loinc", value_parser = ["edi-loinc", "snomed-kcd"])]
        kind: String,
        csv: PathBuf,
    },
    /// Re-derive every index row from the stored resources.
    Reindex {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum CoordinatorCommand {
    /// Serve the coordinator's gRPC API until interrupted. Configuration
    /// layers: defaults, the --config file, GHX_COORDINATOR__* variables,
    /// --set flags.
    Run {
        #[arg(long, env = "GHX_COORDINATOR_CONFIG")]
        config: Option<PathBuf>,
        /// Override one key, as in the file: `--set audit.retention_days=1000`
        /// (repeatable; stronger than the file and GHX_COORDINATOR__* variables).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the effective configuration (every layer applied and
        /// validated, database password redacted) and exit.
        #[arg(long)]
        print_config: bool,
    },
}

/// How a person's client reaches the coordinator.
#[derive(Args)]
pub(crate) struct ClientArgs {
    /// Coordinator URL, e.g. https://coordinator.g-health.kr:7000
    #[arg(long, env = "GHX_COORDINATOR")]
    pub coordinator: String,
    /// Federation CA certificate.
    #[arg(long, env = "GHX_CA")]
    pub ca: PathBuf,
    /// Your certificate.
    #[arg(long, env = "GHX_CERT")]
    pub cert: PathBuf,
    /// Your private key.
    #[arg(long, env = "GHX_KEY")]
    pub key: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub(crate) enum StudyCommand {
    /// Submit a study manifest (ghx.manifest/v1 JSON; see
    /// deploy/examples/study-e11.json).
    Submit {
        #[command(flatten)]
        client: ClientArgs,
        manifest: PathBuf,
    },
    /// Show your studies, or one study with its committee votes.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        study: Option<String>,
    },
    /// Run one query of an approved study on every node.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        /// The manifest query to run (default: the first).
        #[arg(long, default_value = "")]
        query: String,
    },
    /// Show the latest result of a study.
    Result {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        /// The manifest query (default: the one run last).
        #[arg(long, default_value = "")]
        query: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TrainCommand {
    /// Start a training of an approved study, show each round as it
    /// completes, and write the model, its card and curves.
    Start {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        /// The manifest training (default: the first).
        #[arg(long, default_value = "")]
        training: String,
        /// Where to write model.json, model-card.md, curves.svg, run.json.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Return once started instead of following the run.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show a run's progress; with --out, write its outputs.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        run: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Evaluate a model (ghx.model/v1 JSON: weights only) at every
    /// hospital on its held-out patients.
    Validate {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        #[arg(long, default_value = "")]
        training: String,
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum CommitteeCommand {
    /// List every study with its status and votes.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a submitted study (it is approved at the quorum).
    Approve {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Reject a submitted study.
    Reject {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        #[arg(long)]
        reason: String,
    },
    /// Revoke an approved study; nodes refuse its capabilities from now on.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        study: String,
        #[arg(long)]
        reason: String,
    },
}

/// A validity such as `7d`, `36h` or `90m`.
pub(crate) fn parse_validity(text: &str) -> Result<time::Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = number.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        format!("`{text}`: expected a positive number and d, h or m (7d, 36h, 90m)")
    })?;
    match unit {
        "d" => Ok(time::Duration::days(n)),
        "h" => Ok(time::Duration::hours(n)),
        "m" => Ok(time::Duration::minutes(n)),
        _ => Err(format!(
            "`{text}`: the unit must be d, h or m (7d, 36h, 90m)"
        )),
    }
}

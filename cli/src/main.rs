//! `ghx`: one command for every role in the G-Health federation.
//!
//! This binary only parses arguments, builds what the library crates
//! provide, waits for a signal and reports errors; all behaviour lives in
//! the libraries.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ghx::local_federation::{
    self, COMMITTEE, COMMITTEE_2, LocalFederation, LocalFederationOptions, REQUESTER,
};
use ghx::{render, training_report};
use ghx_node::import::{ImportOptions, import_path};
use ghx_pki::{CertificateRequest, PkiDir, Role, TlsFiles};
use ghx_proto::v1 as pb;

#[derive(Parser)]
#[command(
    name = "ghx",
    version,
    about = "G-Health federation: hospital nodes, coordinator and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

/// Where a log comes from: a keeper's database (with the keeper's
/// certificate) or a chain export file.
#[derive(Args)]
struct LogArgs {
    /// The keeper's database: a SQLite path or a postgres:// URL. Opened as
    /// it is: nothing is migrated or written.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    db: Option<String>,
    /// A chain export (`ghx audit export --format chain`).
    #[arg(long)]
    file: Option<PathBuf>,
    /// The keeper's certificate (PEM): names the keeper and checks its
    /// signed checkpoints. Required with --db.
    #[arg(long, required_unless_present = "file")]
    cert: Option<PathBuf>,
    /// The federation CA certificate: the certificate used (given, or the
    /// one inside an export) must be one it issued.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Another keeper's database, for the signed heads of this log it holds
    /// (the coordinator's for a node's log, any node's for the
    /// coordinator's): the log must reach and agree with each. Read before
    /// the log, as it is. Repeatable.
    #[arg(long = "witness-db")]
    witness_dbs: Vec<String>,
    /// Another keeper's chain export, for the heads of this log it holds.
    /// Repeatable.
    #[arg(long = "witness-file")]
    witness_files: Vec<PathBuf>,
    /// The retention period in days: a log that starts after entry 1 must
    /// be anchored by a checkpoint signed at least this long ago.
    #[arg(long, default_value_t = ghx_audit::MIN_RETENTION_DAYS)]
    retention_days: u32,
}

#[derive(Subcommand)]
enum AuditCommand {
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
enum PolicyCommand {
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
struct BenchArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 100_000)]
    patients: usize,
    /// Measured runs per query.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Nodes dial the coordinator (outbound-only mode) instead of listening.
    #[arg(long)]
    outbound: bool,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 50_000)]
    patients: usize,
    #[arg(long, default_value_t = 50)]
    rounds: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train a small MLP with this many hidden units instead of logistic
    /// regression (Flower trains the same MLP).
    #[arg(long)]
    mlp_hidden_units: Option<u32>,
    /// A Python interpreter with flwr and numpy installed
    /// (`pip install flwr numpy`); without it Flower is skipped.
    #[arg(long)]
    flower_python: Option<PathBuf>,
    /// The Flower side of the comparison.
    #[arg(long, default_value = "bench/flower_fedavg.py")]
    flower_script: PathBuf,
    /// Make ghx's run and Flower's two runs this many times, taking turns on
    /// the same federation, and give each figure's median over them too.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Synthetic patients per hospital.
    #[arg(long, default_value_t = 2000)]
    patients: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Minimum cell size every node applies.
    #[arg(long, default_value_t = 10)]
    min_cell_size: u32,
    /// Keep the working directory (PKI, configs, databases) here instead of a
    /// temporary directory that is removed at exit.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// chonnam, chosun or christian.
    #[arg(long)]
    hospital: String,
    #[arg(long, default_value_t = 1000)]
    patients: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory; one <ResourceType>.ndjson file per type.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum PkiCommand {
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
enum NodeCommand {
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
    /// Import FHIR NDJSON files, Bundles (optionally .gz) or directories of them.
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
        /// Write one line per rejected resource to this file.
        #[arg(long)]
        rejects: Option<PathBuf>,
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
    /// Load a HIRA EDI -> LOINC lab code map (CSV: edi_code,loinc_code) and
    /// re-index so that EDI-coded labs count under their LOINC codes.
    LoadCodeMap {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
        csv: PathBuf,
    },
    /// Re-derive every index row from the stored resources.
    Reindex {
        #[arg(long, env = "GHX_NODE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CoordinatorCommand {
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
struct ClientArgs {
    /// Coordinator URL, e.g. https://coordinator.g-health.kr:7000
    #[arg(long, env = "GHX_COORDINATOR")]
    coordinator: String,
    /// Federation CA certificate.
    #[arg(long, env = "GHX_CA")]
    ca: PathBuf,
    /// Your certificate.
    #[arg(long, env = "GHX_CERT")]
    cert: PathBuf,
    /// Your private key.
    #[arg(long, env = "GHX_KEY")]
    key: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StudyCommand {
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
enum TrainCommand {
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
enum CommitteeCommand {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The services set up their telemetry once their configuration is read
    // (it may export over OTLP); every other command logs warnings to stderr.
    let service = matches!(
        cli.command,
        Command::Node(NodeCommand::Run { .. })
            | Command::Coordinator(CoordinatorCommand::Run { .. })
    );
    if !service {
        ghx_telemetry::Telemetry::logs_only("warn")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(run(cli.command));
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Reads a log and checks it; returns it with its verdict, printed.
fn checked_log(args: &LogArgs) -> Result<(ghx_audit::LogExport, ghx_audit::verify::Verification)> {
    use ghx::audit_files;
    let cert = args
        .cert
        .as_deref()
        .map(audit_files::read_pem)
        .transpose()?;
    let ca = args.ca.as_deref().map(audit_files::read_pem).transpose()?;
    let retention_days = audit_files::retention(args.retention_days)?;
    // Witnesses first: every head they hold was signed before the log is read.
    let mut held = Vec::new();
    for url in &args.witness_dbs {
        held.push((ghx_db::redact_url(url), audit_files::read_witnessed(url)?));
    }
    for path in &args.witness_files {
        let export = audit_files::read_export(path)?;
        held.push((export.keeper, export.witnessed));
    }
    let log = match (&args.db, &args.file) {
        (Some(url), _) => audit_files::read_database(
            url,
            cert.as_deref().context("--db needs the keeper's --cert")?,
        )?,
        (None, Some(path)) => audit_files::read_export(path)?,
        (None, None) => bail!("give --db or --file"),
    };
    let verifier = audit_files::verifier_for(&log, cert.as_deref(), ca.as_deref())?;
    let witnesses: Vec<_> = held
        .iter()
        .flat_map(|(by, heads)| audit_files::witnesses_for(&log.keeper, by, heads))
        .collect();
    let given = !args.witness_dbs.is_empty() || !args.witness_files.is_empty();
    let verdict = audit_files::verify(
        &log,
        verifier.as_ref(),
        audit_files::Expect {
            retention_days,
            witnesses: given.then_some(witnesses.as_slice()),
            // A database is read after its witnesses; an export says when
            // it was made.
            window: if args.db.is_some() {
                audit_files::Window::ReadFirst
            } else {
                audit_files::Window::Exported
            },
        },
    )?;
    println!("{}", audit_files::verification_text(&log.keeper, &verdict));
    if given && witnesses.is_empty() {
        eprintln!(
            "warning: no witness given holds a head of {}'s log: is it the other side's database or export (the coordinator's for a node, a node's for the coordinator)?",
            log.keeper
        );
    }
    Ok((log, verdict))
}

fn audit(command: AuditCommand) -> Result<()> {
    use ghx::audit_files;
    match command {
        AuditCommand::Verify(args) => {
            let (_, verdict) = checked_log(&args)?;
            if !verdict.is_intact() {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditCommand::Export {
            log,
            format,
            out,
            month,
            from,
            to,
        } => {
            let (log, verdict) = checked_log(&log)?;
            if let Some(broken) = verdict.broken {
                bail!("not exporting a broken log: {broken}");
            }
            if format == "chain" {
                if month.is_some() || from.is_some() || to.is_some() {
                    bail!(
                        "a chain export is the whole log; --month, --from and --to apply to --format fhir"
                    );
                }
                audit_files::write(&out, &serde_json::to_string_pretty(&log)?)?;
                println!(
                    "wrote {} entries and {} checkpoints to {}",
                    log.entries.len(),
                    log.checkpoints.len(),
                    out.display()
                );
            } else {
                let period = audit_files::period(month.as_deref(), from.as_deref(), to.as_deref())?;
                let (ndjson, n) =
                    ghx_audit::fhir::export_ndjson(&log.keeper, &log.entries, period.0, period.1)?;
                audit_files::write(&out, &ndjson)?;
                println!(
                    "wrote {n} FHIR R4 AuditEvent resources to {}",
                    out.display()
                );
            }
            Ok(())
        }
        AuditCommand::Reconcile {
            coordinator,
            nodes,
            ca,
            month,
            retention_days,
        } => {
            let ca = ca.as_deref().map(audit_files::read_pem).transpose()?;
            let period = audit_files::period(month.as_deref(), None, None)?;
            let retention_days = audit_files::retention(retention_days)?;
            // Each export carries the heads of the others it holds: the
            // coordinator's log is compared with what every node holds of
            // it, each node's with what the coordinator holds.
            let mut logs = vec![audit_files::read_export(&coordinator)?];
            for path in &nodes {
                logs.push(audit_files::read_export(path)?);
            }
            // Reviewing a month that has ended: every head signed before
            // its end must be in an export made after it. Otherwise each
            // export's own date decides.
            let window = match period.1 {
                Some(end) if month.is_some() && end <= time::OffsetDateTime::now_utc() => {
                    audit_files::Window::Until(end)
                }
                _ => audit_files::Window::Exported,
            };
            let mut intact = true;
            for log in &logs {
                let witnesses = audit_files::witnesses_among(log, &logs);
                let verdict = audit_files::verify_with_ca(
                    log,
                    ca.as_deref(),
                    audit_files::Expect {
                        retention_days,
                        witnesses: Some(&witnesses),
                        window,
                    },
                )?;
                println!("{}", audit_files::verification_text(&log.keeper, &verdict));
                intact &= verdict.is_intact();
            }
            let (coordinator_log, node_logs) = logs.split_first().context("no coordinator log")?;
            let result = audit_files::reconcile_logs(coordinator_log, node_logs, period);
            print!("{}", audit_files::reconciliation_text(&result));
            if !intact || result.alarms() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditCommand::Report { log, month, out } => {
            let (log, verdict) = checked_log(&log)?;
            if let Some(broken) = &verdict.broken {
                eprintln!(
                    "warning: the log is broken at {broken}; the review below cannot be trusted"
                );
            }
            let period = audit_files::period(Some(&month), None, None)?;
            let review = ghx_audit::report::review(&audit_files::entries_in(&log, period));
            let text = ghx_audit::report::render(&log.keeper, &month, &review);
            match out {
                Some(path) => {
                    audit_files::write(&path, &text)?;
                    println!("wrote the {month} review to {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

fn policy(command: PolicyCommand) -> Result<()> {
    use ghx_node::policy::{self, Overwrite, PolicyDir};
    match command {
        PolicyCommand::Init {
            hospital,
            out,
            force,
        } => {
            let overwrite = if force {
                Overwrite::Replace
            } else {
                Overwrite::Keep
            };
            policy::write_defaults(&hospital, &out, overwrite)?;
            println!(
                "wrote the default policies of {hospital} to {}; review them with your privacy officer",
                out.display()
            );
            Ok(())
        }
        PolicyCommand::Check {
            dir,
            query,
            org,
            requester,
            purpose,
            action,
            node,
            min_cell_size,
            json,
        } => {
            let loaded = PolicyDir::load(&dir)?;
            let Some(query) = query else {
                println!(
                    "{}: {} access rules valid against the ghx schema; consent default {}; {} rare-disease codes",
                    dir.display(),
                    loaded.rule_count,
                    loaded.consent.default,
                    loaded.consent.sensitive.rare_disease_prefixes.len()
                );
                return Ok(());
            };
            ghx_study::purpose::check(&purpose)?;
            let node = match node {
                Some(node) => node,
                None => dir
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .context("name the node with --node")?,
            };
            let text = std::fs::read(&query)
                .with_context(|| format!("cannot read {}", query.display()))?;
            // A bare query is checked as the only query of a manifest with
            // the given purpose and cell size.
            let manifest_json = match ghx_study::manifest::StudyManifest::parse(&text) {
                Ok(_) => text.clone(),
                Err(
                    ghx_study::manifest::Error::Version(_) | ghx_study::manifest::Error::Syntax(_),
                ) if ghx_study::query::QuerySpec::parse(&text).is_ok() => {
                    let query_text = String::from_utf8_lossy(&text).into_owned();
                    ghx::local_federation::manifest_for(
                        "policy check",
                        &purpose,
                        &[("query", &query_text)],
                    )
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{} is neither a valid manifest nor a valid query",
                            query.display()
                        )
                    });
                }
            };
            let mut manifest = ghx_study::manifest::StudyManifest::parse(&manifest_json)?;
            manifest.requester.organisation = org.clone();
            manifest.requester.user = requester.clone();
            let facts = ghx_node::gate::NodeFacts {
                node_id: &node,
                min_cell_size: min_cell_size.max(manifest.min_cell_size.for_node(&node)),
                now: time::OffsetDateTime::now_utc().unix_timestamp(),
            };
            let action: Option<ghx_node::policy::Action> = action
                .map(|a| a.parse().map_err(anyhow::Error::msg))
                .transpose()?;
            let mut decisions = Vec::new();
            for named in &manifest.queries {
                let query_json = named.query.canonical_json();
                let claims = ghx_study::capability::claims_for(
                    &manifest,
                    "policy-check",
                    vec![node.clone()],
                    &query_json,
                    time::Duration::minutes(5),
                );
                let mut request = ghx_node::gate::access_request(
                    &claims,
                    &named.query,
                    manifest.privacy_budget,
                    facts,
                    &loaded.consent.sensitive,
                );
                if let Some(action) = action {
                    request.action = action;
                }
                let decision = loaded.authorize(&request)?;
                decisions.push((named.name.clone(), request, decision));
            }
            let purpose = &manifest.purpose;
            if json {
                let out: Vec<_> = decisions
                    .iter()
                    .map(|(name, request, decision)| {
                        serde_json::json!({"query": name, "request": request, "decision": decision})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for (name, request, decision) in &decisions {
                    println!(
                        "{} {} `{name}` by {org} for {purpose} at {node}: {}",
                        if decision.allowed { "ALLOW" } else { "DENY" },
                        request.action.name(),
                        decision.summary()
                    );
                    for error in &decision.errors {
                        println!("  rule error (skipped, which can only deny): {error}");
                    }
                }
            }
            let allowed = decisions.iter().all(|(_, _, d)| d.allowed);
            if !allowed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn bench_train(args: BenchTrainArgs) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.unwrap_or_else(|| temp.path().to_owned());
    println!(
        "bench train: 3 nodes x {} patients, {} rounds of FedAvg, {} ({} build)",
        args.patients,
        args.rounds,
        args.mlp_hidden_units.map_or_else(
            || "logistic regression".to_owned(),
            |units| format!("MLP with {units} hidden units")
        ),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let report = ghx::bench_train::run(&ghx::bench_train::TrainBenchOptions {
        dir,
        patients_per_node: args.patients,
        rounds: args.rounds,
        seed: args.seed,
        mlp_hidden_units: args.mlp_hidden_units,
        flower_python: args.flower_python,
        flower_script: args.flower_script,
        repeat: args.repeat,
    })
    .await?;
    println!(
        "setup (synthesise + import, 3 nodes): {:.1} s; {} training rows, {} held out (complete cases of consenting patients)",
        report.setup.as_secs_f64(),
        report.train_rows,
        report.holdout_rows
    );
    println!(
        "{:<34} {:>7} {:>10} {:>10} {:>10} {:>12} {:>13} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "framework",
        "rounds",
        "total s",
        "round p50",
        "local p50",
        "overhead p50",
        "overhead mean",
        "busy p50",
        "idle p50",
        "idle mean",
        "rounds s",
        "AUC"
    );
    let line = |name: &str, t: &ghx::bench_train::Timing| {
        println!(
            "{:<34} {:>7} {:>10.2} {:>8.2}ms {:>8.2}ms {:>10.2}ms {:>11.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9.2} {:>7}",
            name,
            t.rounds,
            t.total_seconds,
            t.round_p50_ms,
            t.local_p50_ms,
            t.overhead_p50_ms,
            t.overhead_mean_ms,
            t.busy_p50_ms,
            t.idle_p50_ms,
            t.idle_mean_ms,
            t.rounds_seconds,
            t.auc
                .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.4}"))
        );
    };
    println!(
        "(local: the slowest node's computation; overhead: round time outside it; busy: time some node was computing; idle: round time when none was)"
    );
    let turns = report.repetitions.len();
    for (i, rep) in report.repetitions.iter().enumerate() {
        if turns > 1 {
            println!("repetition {} of {turns}:", i + 1);
        }
        bench_train_lines(rep, &line);
    }
    if turns > 1 {
        // Flower's medians are over the turns it ran in; say so when it
        // did not run in every one.
        let (fit, evaluating) = report.flower_ran();
        let flower_turns = if (1..turns).contains(&fit) || (1..turns).contains(&evaluating) {
            format!(
                " (Flower's over those it ran in: fit rounds only {fit}, with evaluation {evaluating})"
            )
        } else {
            String::new()
        };
        println!("median over the {turns} repetitions{flower_turns}:");
        bench_train_lines(&report.median(), &line);
    }
    Ok(())
}

/// One repetition's (or the medians') lines of `ghx bench-train`.
fn bench_train_lines(
    rep: &ghx::bench_train::Repetition,
    line: &dyn Fn(&str, &ghx::bench_train::Timing),
) {
    line("ghx (mTLS gRPC, secure aggregation)", &rep.ghx);
    let s = rep.ghx_steps_ms;
    println!(
        "ghx median per round: session opened on the round's path {:.2} ms (opened while the moments round computes), masked input incl. local {:.2} ms, unmasking {:.2} ms (none in a session), rest (state read for saving, study check started, model updated) {:.2} ms",
        s[0], s[1], s[2], s[3]
    );
    let a = rep.ghx_last_answer_ms;
    println!(
        "ghx median per round, the answer that ended it: {:.3} ms outside the node's handler (wire, TLS, HTTP/2, both ways), {:.3} ms in the handler before computing (admission, checks), {:.3} ms after (masking, audit write, hand-back)",
        a[0], a[1], a[2]
    );
    for (name, flower) in [
        ("Flower FedAvg, fit rounds only", &rep.flower),
        ("Flower FedAvg + evaluation rounds", &rep.flower_evaluating),
    ] {
        match flower {
            Ok(flower) => {
                line(name, flower);
                let ratio = |theirs: f64, ours: f64| theirs / ours.max(1e-9);
                println!(
                    "  {name} / ghx: per-round overhead p50 {:.1}x (mean {:.1}x); time with no node computing p50 {:.1}x (mean {:.1}x)",
                    ratio(flower.overhead_p50_ms, rep.ghx.overhead_p50_ms),
                    ratio(flower.overhead_mean_ms, rep.ghx.overhead_mean_ms),
                    ratio(flower.idle_p50_ms, rep.ghx.idle_p50_ms),
                    ratio(flower.idle_mean_ms, rep.ghx.idle_mean_ms),
                );
            }
            Err(why) => println!("{name}: not run ({why})"),
        }
    }
}

async fn bench(args: BenchArgs) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.unwrap_or_else(|| temp.path().to_owned());
    println!(
        "bench: 3 nodes x {} patients, {} runs per query ({} build)",
        args.patients,
        args.runs,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let report = ghx::bench::run(&ghx::bench::BenchOptions {
        dir,
        patients_per_node: args.patients,
        runs: args.runs,
        seed: args.seed,
        outbound: args.outbound,
    })
    .await?;
    println!(
        "setup (synthesise + import, 3 nodes): {:.1} s; resources: {}",
        report.setup.as_secs_f64(),
        report
            .resources_per_node
            .iter()
            .map(|(n, r)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "first federated query (consent decisions evaluated for every patient): {:.1} ms",
        report.first_query.as_secs_f64() * 1000.0
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "operation", "p50 ms", "p95 ms", "max ms"
    );
    for l in &report.latencies {
        println!(
            "{:<40} {:>9.2} {:>9.2} {:>9.2}",
            l.name,
            l.p50.as_secs_f64() * 1000.0,
            l.p95.as_secs_f64() * 1000.0,
            l.max.as_secs_f64() * 1000.0
        );
    }
    for name in ["count", "grouped"] {
        if let Some((ratio, node)) = report.overhead(name) {
            println!("federated {name} p50 / slowest local SQL p50 ({node}): {ratio:.2}x");
        }
        if let Some((ratio, node)) = report.over_node_work(name) {
            println!("federated {name} p50 / slowest node work p50 ({node}): {ratio:.2}x");
        }
    }
    Ok(())
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(args) => demo(args).await,
        Command::Bench(args) => bench(args).await,
        Command::BenchTrain(args) => bench_train(args).await,
        Command::Synth(args) => synth(&args),
        Command::Pki(cmd) => pki(cmd),
        Command::Node(NodeCommand::Run {
            config,
            set,
            print_config,
        }) => {
            let config = ghx_node::NodeConfig::layered(config.as_deref(), &set)?;
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            let telemetry = ghx_telemetry::Telemetry::install(
                ghx_telemetry::Service {
                    name: "ghx-node",
                    instance: &config.id,
                },
                &config.telemetry,
                "info",
            )?;
            let listener = match config.listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            let node = tokio::task::spawn_blocking(move || ghx_node::Node::build(config)).await??;
            let served = node.serve(listener, shutdown_signal()).await;
            telemetry.shutdown()?;
            Ok(served?)
        }
        Command::Node(NodeCommand::Import {
            config,
            paths,
            batch_size,
            workers,
            no_resume,
            rejects,
        }) => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let mut options = ImportOptions {
                batch_size,
                resume: !no_resume,
                rrn: config.rrn_policy.parse().map_err(anyhow::Error::msg)?,
                ..ImportOptions::default()
            };
            if let Some(workers) = workers {
                options.workers = workers;
            }
            node_import(&config, &paths, options, rejects.as_deref()).await
        }
        Command::Node(NodeCommand::Export {
            config,
            out,
            resource_type,
        }) => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let started = Instant::now();
            let counts = tokio::task::spawn_blocking(move || {
                ghx_node::export::export_ndjson(&store, &out, resource_type.as_deref())
                    .map(|c| (c, out))
            })
            .await??;
            let (counts, out) = counts;
            for (ty, n) in &counts {
                println!("{ty:<20} {n:>9}");
            }
            println!(
                "exported {} resources to {} in {:.1} s",
                counts.values().sum::<u64>(),
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Node(NodeCommand::LoadCodeMap { config, csv }) => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let (loaded, reindexed) = tokio::task::spawn_blocking(move || {
                let loaded = ghx_node::import::load_edi_loinc_map(&store, &csv)?;
                let reindexed = ghx_node::import::reindex(&store, 2000)?;
                Ok::<_, ghx_node::import::Error>((loaded, reindexed))
            })
            .await??;
            println!("loaded {loaded} EDI -> LOINC mappings; re-indexed {reindexed} resources");
            Ok(())
        }
        Command::Node(NodeCommand::Reindex { config }) => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let n = tokio::task::spawn_blocking(move || ghx_node::import::reindex(&store, 2000))
                .await??;
            println!("re-indexed {n} resources");
            Ok(())
        }
        Command::Coordinator(CoordinatorCommand::Run {
            config,
            set,
            print_config,
        }) => {
            let config = ghx_coordinator::CoordinatorConfig::layered(config.as_deref(), &set)?;
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            let telemetry = ghx_telemetry::Telemetry::install(
                ghx_telemetry::Service {
                    name: "ghx-coordinator",
                    instance: &config.listen.to_string(),
                },
                &config.telemetry,
                "info",
            )?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let tunnel = match config.tunnel_listen {
                Some(addr) => {
                    Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                        format!("cannot listen for nodes dialling in on {addr}")
                    })?)
                }
                None => None,
            };
            let mut coordinator = ghx_coordinator::Coordinator::build(config)?;
            if let Some(tunnel) = tunnel {
                coordinator = coordinator.with_tunnel(tunnel);
            }
            let served = coordinator.serve(listener, shutdown_signal()).await;
            telemetry.shutdown()?;
            Ok(served?)
        }
        Command::Study(cmd) => study(cmd).await,
        Command::Policy(cmd) => policy(cmd),
        Command::Audit(cmd) => audit(cmd),
        Command::Committee(cmd) => committee(cmd).await,
        Command::Train(cmd) => train(cmd).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn connect(
    client: &ClientArgs,
) -> Result<pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>> {
    let files = TlsFiles {
        ca: client.ca.clone(),
        cert: client.cert.clone(),
        key: client.key.clone(),
    };
    local_federation::connect_coordinator(&client.coordinator, &files)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the coordinator at {}",
                client.coordinator
            )
        })
}

fn print_result(result: &pb::StudyResult, json: bool) {
    if json {
        println!("{}", render::study_json(result));
    } else {
        print!("{}", render::study_table(result));
    }
}

async fn study(cmd: StudyCommand) -> Result<()> {
    match cmd {
        StudyCommand::Submit { client, manifest } => {
            let manifest_json = std::fs::read(&manifest)
                .with_context(|| format!("cannot read manifest {}", manifest.display()))?;
            // Check locally first, for an error that names the file.
            ghx_study::manifest::StudyManifest::parse(&manifest_json)
                .with_context(|| format!("{} is not a valid study manifest", manifest.display()))?;
            let mut c = connect(&client).await?;
            let id = c
                .submit_study(pb::SubmitStudyRequest { manifest_json })
                .await
                .map_err(status_error)?
                .into_inner()
                .study_id;
            if client.json {
                println!("{}", serde_json::json!({ "study_id": id }));
            } else {
                println!("submitted {id}; it runs once the steering committee approves it");
            }
            Ok(())
        }
        StudyCommand::Status { client, study } => {
            let mut c = connect(&client).await?;
            let studies = match study {
                Some(id) => vec![
                    c.get_study(pb::GetStudyRequest { study_id: id })
                        .await
                        .map_err(status_error)?
                        .into_inner(),
                ],
                None => {
                    c.list_studies(pb::ListStudiesRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .studies
                }
            };
            print_studies(&studies, client.json);
            Ok(())
        }
        StudyCommand::Run {
            client,
            study,
            query,
        } => {
            let mut c = connect(&client).await?;
            let result = run_study(&mut c, &study, &query).await?;
            print_result(&result, client.json);
            Ok(())
        }
        StudyCommand::Result {
            client,
            study,
            query,
        } => {
            let mut c = connect(&client).await?;
            let result = c
                .get_study_result(pb::GetStudyResultRequest {
                    study_id: study,
                    query,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .result
                .context("the coordinator returned no result")?;
            print_result(&result, client.json);
            Ok(())
        }
    }
}

async fn manifest_of(
    c: &mut pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>,
    study: &str,
) -> Result<ghx_study::manifest::StudyManifest> {
    let summary = c
        .get_study(pb::GetStudyRequest {
            study_id: study.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(ghx_study::manifest::StudyManifest::parse(
        &summary.manifest_json,
    )?)
}

async fn follow_and_write(
    c: &mut pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>,
    run_id: &str,
    study: &str,
    out: &Path,
) -> Result<()> {
    let record = training_report::follow(c, run_id, |r, total| {
        println!("{}", training_report::progress_line(r, total));
    })
    .await
    .map_err(status_error)?;
    let manifest = manifest_of(c, study).await?;
    let written = training_report::write_outputs(out, &record, &manifest)
        .with_context(|| format!("cannot write into {}", out.display()))?;
    println!("run {} {}", record.run_id, record.status.name());
    match record.evaluation.as_ref().map(|e| &e.pooled) {
        Some(Some(pooled)) => println!(
            "final model on about {} held-out patients (counts noised at each hospital): AUC {}, accuracy {:.4}, Brier {:.4}",
            pooled.rows,
            pooled
                .auc
                .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.4}")),
            pooled.accuracy,
            pooled.brier
        ),
        Some(None) => println!(
            "final model: pooled metrics withheld (held-out positives or negatives below the cell size)"
        ),
        None => {}
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    if record.status != ghx_coordinator::training::RunStatus::Completed {
        bail!("training {}: {}", record.status.name(), record.detail);
    }
    Ok(())
}

async fn train(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Start {
            client,
            study,
            training,
            out,
            no_wait,
        } => {
            let mut c = connect(&client).await?;
            let status = c
                .start_training(pb::StartTrainingRequest {
                    study_id: study.clone(),
                    training,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "started {} of {} ({} rounds)",
                status.run_id, status.training, status.rounds_total
            );
            if no_wait {
                return Ok(());
            }
            follow_and_write(&mut c, &status.run_id, &study, &out).await
        }
        TrainCommand::Status { client, run, out } => {
            let mut c = connect(&client).await?;
            let status = c
                .get_training(pb::GetTrainingRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match out {
                Some(out) => follow_and_write(&mut c, &run, &status.study_id, &out).await,
                None => {
                    if client.json {
                        println!("{}", String::from_utf8_lossy(&status.record_json));
                    } else {
                        println!(
                            "{} ({} of {}): {}, {} of {} rounds {}",
                            status.run_id,
                            status.study_id,
                            status.training,
                            status.status,
                            status.rounds_done,
                            status.rounds_total,
                            status.detail
                        );
                    }
                    Ok(())
                }
            }
        }
        TrainCommand::Validate {
            client,
            study,
            training,
            model,
        } => {
            let model_json = std::fs::read(&model)
                .with_context(|| format!("cannot read model {}", model.display()))?;
            let mut c = connect(&client).await?;
            let report = c
                .validate_model(pb::ValidateModelRequest {
                    study_id: study,
                    training,
                    model_json,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let report: serde_json::Value = serde_json::from_slice(&report.report_json)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

async fn committee(cmd: CommitteeCommand) -> Result<()> {
    let (client, summary) = match cmd {
        CommitteeCommand::List { client } => {
            let mut c = connect(&client).await?;
            let studies = c
                .list_studies(pb::ListStudiesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .studies;
            print_studies(&studies, client.json);
            return Ok(());
        }
        CommitteeCommand::Approve {
            client,
            study,
            note,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .approve_study(pb::ApproveStudyRequest {
                    study_id: study,
                    note,
                })
                .await;
            (client, summary)
        }
        CommitteeCommand::Reject {
            client,
            study,
            reason,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .reject_study(pb::RejectStudyRequest {
                    study_id: study,
                    reason,
                })
                .await;
            (client, summary)
        }
        CommitteeCommand::Revoke {
            client,
            study,
            reason,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .revoke_study(pb::RevokeStudyRequest {
                    study_id: study,
                    reason,
                })
                .await;
            (client, summary)
        }
    };
    let summary = summary.map_err(status_error)?.into_inner();
    print_studies(std::slice::from_ref(&summary), client.json);
    Ok(())
}

fn print_studies(studies: &[pb::StudySummary], json: bool) {
    if json {
        println!("{}", render::studies_json(studies));
    } else {
        print!("{}", render::studies_table(studies));
    }
}

fn synth(args: &SynthArgs) -> Result<()> {
    let hospital = ghx_synth::HospitalProfile::by_id(&args.hospital)?;
    let started = Instant::now();
    let summary = ghx_synth::write_ndjson_dir(
        &ghx_synth::SynthOptions {
            hospital,
            patients: args.patients,
            seed: args.seed,
            as_of: ghx_synth::default_as_of(),
        },
        &args.out,
    )?;
    println!(
        "{}: wrote {} resources for {} patients to {} in {:.1} s",
        hospital.name,
        summary.total(),
        summary.patients,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pki(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir, federation } => {
            PkiDir::new(&dir).init(&federation)?;
            println!(
                "created the {federation} federation CA in {}",
                dir.display()
            );
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            org,
            hosts,
            days,
            valid_for,
        } => {
            let pki = PkiDir::new(&dir);
            let ca = pki.load_ca()?;
            let role: Role = role.parse()?;
            let mut request = CertificateRequest::new(&name, role, &org);
            if !hosts.is_empty() {
                request.hosts = hosts;
            }
            request.valid_for = valid_for.unwrap_or(time::Duration::days(days));
            let files = pki.issue(&ca, &request)?;
            println!(
                "issued {} ({role}) -> {} and {}",
                name,
                files.cert.display(),
                files.key.display()
            );
        }
        PkiCommand::Renew {
            dir,
            name,
            valid_for,
            new_key,
        } => {
            let pki = PkiDir::new(&dir);
            let ca = pki.load_ca()?;
            let files = pki.renew(&ca, &name, valid_for, new_key)?;
            let cert = std::fs::read_to_string(&files.cert)?;
            let expires = ghx_pki::readiness::expires_at(&cert)?;
            println!(
                "renewed {name} until {expires} ({}) -> {}",
                if new_key { "new key" } else { "same key" },
                files.cert.display()
            );
        }
        PkiCommand::Pin { cert } => {
            let pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", ghx_pki::signed::key_pin(&pem)?);
        }
        PkiCommand::SigningKey { dir, name } => {
            std::fs::create_dir_all(&dir)?;
            let private_path = dir.join(format!("{name}.pem"));
            let public_path = dir.join(format!("{name}.pub.pem"));
            if private_path.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a signing key",
                    private_path.display()
                );
            }
            let (private, public) = ghx_study::capability::generate_signing_key()?;
            write_private(&private_path, &private)?;
            std::fs::write(&public_path, public)?;
            println!(
                "wrote {} (keep it on the coordinator) and {} (give it to every node)",
                private_path.display(),
                public_path.display()
            );
        }
    }
    Ok(())
}

/// A validity such as `7d`, `36h` or `90m`.
fn parse_validity(text: &str) -> Result<time::Duration, String> {
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

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

async fn node_import(
    config: &ghx_node::NodeConfig,
    paths: &[PathBuf],
    mut options: ImportOptions,
    rejects: Option<&Path>,
) -> Result<()> {
    let store = ghx_node::Store::open(&config.database_url)?;
    // A live counter on a terminal; nothing when output is redirected.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("valid progress template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let progress_bar = bar.clone();
    options.progress = Some(std::sync::Arc::new(
        move |p: &ghx_node::import::Progress| {
            let secs = p.elapsed.as_secs_f64().max(1e-9);
            progress_bar.set_message(format!(
                "{}: {} resources ({:.0}/s), {} rejected",
                p.file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                p.accepted,
                p.accepted as f64 / secs,
                p.rejected
            ));
        },
    ));
    let mut reject_lines = Vec::new();
    for path in paths {
        let started = Instant::now();
        let store = store.clone();
        let path_owned = path.clone();
        let run_options = options.clone();
        let report =
            tokio::task::spawn_blocking(move || import_path(&store, &path_owned, &run_options))
                .await??;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        let o = report.outcome;
        println!(
            "{}: {} resources in {:.1} s ({:.0} resources/s): {} created, {} updated, {} unchanged, {} deleted; {} rejected",
            path.display(),
            report.accepted + o.deleted,
            secs,
            (report.accepted + o.deleted) as f64 / secs.max(1e-9),
            o.created,
            o.updated,
            o.unchanged,
            o.deleted,
            report.rejected.len()
        );
        if report.resumed_lines > 0 {
            println!(
                "  resumed: skipped {} lines committed by an interrupted import",
                report.resumed_lines
            );
        }
        if !report.rrn_stripped.is_empty() {
            println!(
                "  warning: removed resident registration numbers from {} resources",
                report.rrn_stripped.len()
            );
        }
        for rejection in report.rejected.iter().take(10) {
            println!("  rejected {rejection}");
        }
        if report.rejected.len() > 10 {
            println!("  ... and {} more", report.rejected.len() - 10);
        }
        reject_lines.extend(report.rejected.iter().map(ToString::to_string));
        reject_lines.extend(report.rrn_stripped.iter().map(|w| format!("warning {w}")));
    }
    if let Some(peak) = peak_rss_mib() {
        println!("peak memory (RSS): {peak:.0} MiB");
    }
    if let Some(path) = rejects {
        let mut text = reject_lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// This process's peak resident set size, from /proc (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The demo study: adult women and men with type 2 diabetes by sex and age
/// band. A table lists every category its cohort admits, empty or not, and
/// protects each; the cohort admits only those the study reports.
const DEMO_QUERY: &str = r#"{
  "version": "ghx.query/v1",
  "cohort": {
    "as_of": "2026-01-01",
    "conditions": [
      {"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E11", "match": "prefix"}
    ],
    "sex": ["female", "male"],
    "age": {"min": 18}
  },
  "analysis": {"kind": "count", "group_by": ["sex", "age_band"]}
}"#;

async fn demo(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let temp;
    let dir = match &args.keep {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_owned()
        }
    };
    println!(
        "Starting a coordinator and three hospital nodes on loopback (mTLS), {} synthetic patients each...",
        args.patients
    );
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir,
        patients_per_node: args.patients,
        seed: args.seed,
        min_cell_size: args.min_cell_size,
        committee_quorum: 2,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
    })
    .await?;
    for node in &federation.nodes {
        println!(
            "  {:<10} {:<38} {:>7} resources imported, {} rejected, listening on {}",
            node.profile.id,
            node.profile.name,
            node.import.accepted,
            node.import.rejected.len(),
            node.listen
                .map_or("(dials out)".to_owned(), |a| a.to_string())
        );
    }
    let mut requester = federation.client(REQUESTER).await?;
    let queries = demo_queries();
    let study_id = requester
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: local_federation::manifest_with_budget(
                "Type 2 diabetes (KCD-8 E11) by sex and age band",
                "HRESCH",
                &queries
                    .iter()
                    .map(|(n, q)| (n.as_str(), q.as_str()))
                    .collect::<Vec<_>>(),
                0.5,
            ),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .study_id;
    println!(
        "\n{REQUESTER} submitted {study_id}: type 2 diabetes (KCD-8 E11*) by sex and age band"
    );
    match requester
        .run_study(pb::RunStudyRequest {
            study_id: study_id.clone(),
            query: String::new(),
        })
        .await
    {
        Err(status) => println!(
            "running it before approval is refused: {}",
            status.message()
        ),
        Ok(_) => bail!("the coordinator ran an unapproved study"),
    }
    // Two of the committee must approve (quorum 2).
    for member in [COMMITTEE, COMMITTEE_2] {
        let mut committee = federation.client(member).await?;
        let summary = committee
            .approve_study(pb::ApproveStudyRequest {
                study_id: study_id.clone(),
                note: "approved for the demo".to_owned(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let approvals = summary
            .votes
            .iter()
            .filter(|v| v.decision == "approve")
            .count();
        println!(
            "{member} approved {study_id}: {approvals} of {} approvals, study is {}",
            summary.quorum, summary.status
        );
    }
    println!("the coordinator signs a capability for each query and fans it out");
    let mut failures = 0;
    for (name, _) in &queries {
        println!("\n{REQUESTER} runs {name}\n");
        let result = run_study(&mut requester, &study_id, name).await?;
        print_result(&result, args.json);
        failures += result.failures.len();
    }
    demo_training(&federation).await?;
    // Every member signs its audit log's head as it stops gracefully.
    let keepers = federation.audit_keepers();
    federation.shutdown().await;
    demo_audit(&keepers)?;
    println!("\nDone in {:.1} s.", started.elapsed().as_secs_f64());
    if failures > 0 {
        bail!("{failures} node answer(s) missing");
    }
    Ok(())
}

/// The demo's audit: every keeper's log verified against its certificate
/// (issued by the federation CA), the coordinator's record reconciled with
/// the nodes', and the month's review written.
fn demo_audit(keepers: &local_federation::AuditKeepers) -> Result<()> {
    use ghx::audit_files;
    println!("\nThe steering committee checks the audit logs\n");
    let ca = audit_files::read_pem(&keepers.ca())?;
    let logs = keepers.read()?;
    for log in &logs {
        let witnesses = audit_files::witnesses_among(log, &logs);
        let verdict = audit_files::verify_with_ca(
            log,
            Some(&ca),
            audit_files::Expect {
                witnesses: Some(&witnesses),
                ..Default::default()
            },
        )?;
        println!("{}", audit_files::verification_text(&log.keeper, &verdict));
        if let Some(broken) = verdict.broken {
            bail!("{}'s audit log is broken at {broken}", log.keeper);
        }
    }
    let (coordinator, nodes) = logs.split_first().context("no coordinator log")?;
    let month = time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!("[year]-[month]"))?;
    let period = audit_files::period(Some(&month), None, None)?;
    let reconciled = audit_files::reconcile_logs(coordinator, nodes, period);
    print!(
        "reconcile: {}",
        audit_files::reconciliation_text(&reconciled)
    );
    let review = ghx_audit::report::review(&audit_files::entries_in(coordinator, period));
    let path = keepers.dir().join(format!("audit-review-{month}.md"));
    audit_files::write(
        &path,
        &ghx_audit::report::render("coordinator", &month, &review),
    )?;
    println!("the month's access review: {}", path.display());
    if reconciled.alarms() > 0 {
        bail!("reconciliation raised {} alarm(s)", reconciled.alarms());
    }
    Ok(())
}

/// The demo's federated training: an academic requester's approved study
/// trains a type 2 diabetes risk model with secure aggregation, then the
/// model card and curves are written next to the federation's files.
async fn demo_training(federation: &LocalFederation) -> Result<()> {
    let manifest_json = include_bytes!("../../deploy/examples/study-t2d-model.json").to_vec();
    let mut researcher = federation.client(local_federation::RESEARCHER).await?;
    let study_id = researcher
        .submit_study(pb::SubmitStudyRequest { manifest_json })
        .await
        .map_err(status_error)?
        .into_inner()
        .study_id;
    for member in [COMMITTEE, COMMITTEE_2] {
        federation
            .client(member)
            .await?
            .approve_study(pb::ApproveStudyRequest {
                study_id: study_id.clone(),
                note: "approved for the demo".to_owned(),
            })
            .await
            .map_err(status_error)?;
    }
    let status = researcher
        .start_training(pb::StartTrainingRequest {
            study_id: study_id.clone(),
            training: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "
{} trains {} in {study_id} ({}): {} rounds of FedAvg, each through secure aggregation\n",
        local_federation::RESEARCHER,
        status.training,
        status.run_id,
        status.rounds_total
    );
    let out = federation.dir.join("training");
    follow_and_write(&mut researcher, &status.run_id, &study_id, &out).await
}

/// The demo study's queries: the count by sex and age band, then the
/// statistics of `deploy/examples/study-e11-statistics.json`.
fn demo_queries() -> Vec<(String, String)> {
    let manifest: serde_json::Value = serde_json::from_str(include_str!(
        "../../deploy/examples/study-e11-statistics.json"
    ))
    .expect("the example manifest is JSON");
    let statistics = manifest["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            (
                q["name"].as_str().unwrap_or_default().to_owned(),
                q["query"].to_string(),
            )
        });
    std::iter::once(("e11-by-sex-and-age".to_owned(), DEMO_QUERY.to_owned()))
        .chain(statistics)
        .collect()
}

/// Runs a study query (empty: the manifest's first) and returns its result.
async fn run_study(
    client: &mut pb::coordinator_service_client::CoordinatorServiceClient<
        tonic::transport::Channel,
    >,
    study_id: &str,
    query: &str,
) -> Result<pb::StudyResult> {
    client
        .run_study(pb::RunStudyRequest {
            study_id: study_id.to_owned(),
            query: query.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .result
        .context("the coordinator returned no result")
}

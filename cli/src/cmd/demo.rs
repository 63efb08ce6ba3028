//! `ghx demo`: the whole federation in one process on synthetic data.

use std::time::Instant;

use super::{print_result, run_study, status_error};
use crate::args::DemoArgs;
use anyhow::{Context, Result, bail};
use ghx::local_federation::{
    self, COMMITTEE, COMMITTEE_2, LocalFederation, LocalFederationOptions, REQUESTER,
};
use ghx_proto::v1 as pb;

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

/// The same table pooled: the three hospitals' cells summed under secure
/// aggregation with distributed noise, and suppressed as one table.
fn demo_pooled_query() -> String {
    let mut spec: serde_json::Value =
        serde_json::from_str(DEMO_QUERY).expect("the demo query is JSON");
    spec["release"] = serde_json::json!("pooled");
    spec["noise"] = serde_json::json!({"mechanism": "gaussian", "epsilon": 0.2, "delta": 1e-6});
    spec.to_string()
}

/// Patients with type 2 diabetes by sex across the federation, pooled:
/// summed over the hospitals (a resident treated at two counts twice), or
/// each counted once however many of the hospitals treat them (the union
/// of the hospitals' linkage-token bitmaps under secure aggregation).
fn demo_by_sex_query(each_patient_once: bool) -> String {
    let mut spec: serde_json::Value =
        serde_json::from_str(DEMO_QUERY).expect("the demo query is JSON");
    spec["analysis"]["group_by"] = serde_json::json!(["sex"]);
    spec["release"] = serde_json::json!("pooled");
    if each_patient_once {
        spec["each_patient_once"] = serde_json::json!(true);
    }
    spec["noise"] = serde_json::json!({"mechanism": "gaussian", "epsilon": 0.25, "delta": 1e-6});
    spec.to_string()
}

/// Both committee members approve `study_id` (quorum 2).
async fn approve(federation: &LocalFederation, study_id: &str) -> Result<()> {
    for member in [COMMITTEE, COMMITTEE_2] {
        federation
            .client(member)
            .await?
            .approve_study(pb::ApproveStudyRequest {
                study_id: study_id.to_owned(),
                note: "approved for the demo".to_owned(),
            })
            .await
            .map_err(status_error)?;
    }
    Ok(())
}

/// The demo's second study: the same patients by sex, pooled as a sum over
/// the hospitals and each counted once; shown beside the first study's
/// per-hospital table.
async fn demo_each_patient_once(
    federation: &LocalFederation,
    per_hospital: &pb::StudyResult,
    json: bool,
) -> Result<usize> {
    let queries = [
        ("e11-by-sex-pooled", demo_by_sex_query(false)),
        ("e11-by-sex-each-patient-once", demo_by_sex_query(true)),
    ];
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&local_federation::manifest_with_budget(
            "Type 2 diabetes (KCD-8 E11) by sex, each patient once",
            "HRESCH",
            &queries
                .iter()
                .map(|(n, q)| (*n, q.as_str()))
                .collect::<Vec<_>>(),
            0.5,
        ))?;
    manifest["privacy_delta"] = serde_json::json!(1e-5);
    let mut requester = federation.client(REQUESTER).await?;
    let study_id = requester
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest.to_string().into_bytes(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .study_id;
    approve(federation, &study_id).await?;
    println!(
        "\n{REQUESTER} submitted {study_id}, approved: type 2 diabetes by sex, pooled, and with each patient counted once by linkage tokens"
    );
    let mut results = Vec::new();
    let mut failures = 0;
    for (name, _) in &queries {
        println!("\n{REQUESTER} runs {name}\n");
        let result = run_study(&mut requester, &study_id, name).await?;
        print_result(&result, json);
        failures += result.failures.len();
        results.push(result);
    }
    if !json {
        print!(
            "{}",
            once_comparison(per_hospital, &results[0], &results[1])
        );
    }
    Ok(failures)
}

/// By sex: each hospital's released patients, their naive sum (the pooled
/// table) and the distinct patients (each once), as the demo shows them.
fn once_comparison(
    per_hospital: &pb::StudyResult,
    pooled: &pb::StudyResult,
    once: &pb::StudyResult,
) -> String {
    // Released counts of one sex, and whether any part was withheld.
    let of = |cells: &mut dyn Iterator<Item = (&[String], Option<u64>)>, sex: &str| {
        cells
            .filter(|(key, _)| key.first().map(String::as_str) == Some(sex))
            .fold((0u64, false), |(n, lossy), (_, c)| match c {
                Some(c) => (n + c, lossy),
                None => (n, true),
            })
    };
    let shown = |(n, lossy): (u64, bool)| format!("{n}{}", if lossy { "+" } else { "" });
    let mut out = String::from(
        "\nEach patient once: type 2 diabetes by sex (a resident treated at two hospitals is two patients in a sum)\n",
    );
    let mut header = vec!["sex".to_owned()];
    header.extend(per_hospital.per_node.iter().map(|r| r.node_id.clone()));
    header.extend([
        "naive sum (pooled)".to_owned(),
        "each once (pooled)".to_owned(),
    ]);
    let mut rows = vec![header];
    for sex in ["female", "male"] {
        let mut row = vec![sex.to_owned()];
        for node in &per_hospital.per_node {
            row.push(shown(of(
                &mut node.cells.iter().map(|c| {
                    let n = match &c.value {
                        Some(pb::cell::Value::Count(n)) => Some(*n),
                        _ => None,
                    };
                    (c.key.as_slice(), n)
                }),
                sex,
            )));
        }
        for result in [pooled, once] {
            row.push(shown(of(
                &mut result
                    .total
                    .iter()
                    .map(|t| (t.key.as_slice(), t.withheld.is_empty().then_some(t.count))),
                sex,
            )));
        }
        rows.push(row);
    }
    out.push_str(&ghx::render::aligned(&rows, 1));
    out.push_str("+: a lower bound, some cells withheld\n");
    out
}

pub(super) async fn demo(args: DemoArgs) -> Result<()> {
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
        pooled_without_noise: false,
        // About a fifth of each hospital's patients are treated at two or
        // three of them (same RRN, own ids).
        shared: 0.2,
        exchange_part_bytes: None,
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
    // The pooled query's Gaussian noise spends delta too.
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&local_federation::manifest_with_budget(
            "Type 2 diabetes (KCD-8 E11) by sex and age band",
            "HRESCH",
            &queries
                .iter()
                .map(|(n, q)| (n.as_str(), q.as_str()))
                .collect::<Vec<_>>(),
            0.5,
        ))?;
    manifest["privacy_delta"] = serde_json::json!(1e-5);
    let study_id = requester
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest.to_string().into_bytes(),
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
    let mut per_hospital = None;
    for (name, _) in &queries {
        println!("\n{REQUESTER} runs {name}\n");
        let result = run_study(&mut requester, &study_id, name).await?;
        print_result(&result, args.json);
        failures += result.failures.len();
        if name == "e11-by-sex-and-age" {
            per_hospital = Some(result);
        }
    }
    let per_hospital = per_hospital.context("the demo's first query")?;
    failures += demo_each_patient_once(&federation, &per_hospital, args.json).await?;
    demo_training(&federation).await?;
    demo_exchange(&federation, &federation.dir).await?;
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

/// The exchange: one resident's records, from every hospital that holds
/// them, sealed to the report service and merged there into one record.
async fn demo_exchange(federation: &LocalFederation, dir: &std::path::Path) -> Result<()> {
    use ghx_exchange::request::{Claims, Kind, Resident};
    let (rrn, ids) = federation
        .exchange_resident()
        .context("no resident consents to the exchange in the synthetic data")?;
    println!(
        "
The exchange: a resident treated at {} hospitals asks for their records to go to {}
",
        ids.len(),
        local_federation::RECIPIENT
    );
    // The identity service proofs the resident and names them by their
    // linkage token (the RRN itself is in no request).
    let link_key = ghx_disclosure::linkage::LinkKey::parse(
        &std::fs::read_to_string(federation.dir.join("linkage.key"))
            .context("reading the link key")?,
    )?;
    let digits: String = rrn.chars().filter(char::is_ascii_digit).collect();
    let scope = "_type=Condition,Observation,MedicationRequest,Encounter";
    let recipient = federation.recipient()?;
    let claims = Claims::new(
        "g-health-identity",
        federation
            .nodes
            .iter()
            .map(|n| n.profile.id.to_owned())
            .collect(),
        Resident {
            link_token: Some(link_key.token(&digits)),
            ..Resident::default()
        },
        (local_federation::RECIPIENT, &recipient.public_key()),
        scope,
        Kind::Records,
        300,
    );
    println!(
        "the platform's identity service signs the request: every hospital, purpose {}, {scope}, valid 5 minutes, single use",
        claims.purpose
    );
    let token = federation.authorise(&claims)?;
    let mut client = federation.client(local_federation::RECIPIENT).await?;
    let fetched = ghx::exchange::fetch(&mut client, &recipient, &token).await?;
    for r in &fetched.received {
        println!(
            "  {:<10} {:<8} {} resources, each under the hospital's signed Provenance",
            r.hospital,
            format!("{:?}", r.outcome).to_lowercase(),
            r.resources.len()
        );
    }
    for (hospital, why) in &fetched.failed {
        println!("  {hospital:<10} failed   {why}");
    }
    let path = dir.join("resident-record.json");
    std::fs::write(&path, serde_json::to_string_pretty(&fetched.bundle)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "the coordinator relayed {:.0} KiB of ciphertext in {} ms; {} merged them: {} resources, {} reported by two hospitals kept once -> {}",
        fetched.relayed_bytes as f64 / 1024.0,
        fetched.transfer.as_millis(),
        local_federation::RECIPIENT,
        fetched.report.resources,
        fetched.report.duplicates,
        path.display()
    );
    if !fetched.failed.is_empty() {
        bail!("the exchange did not complete at every hospital");
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
    let manifest_json = include_bytes!("../../../deploy/examples/study-t2d-model.json").to_vec();
    let mut researcher = federation.client(local_federation::RESEARCHER).await?;
    let study_id = researcher
        .submit_study(pb::SubmitStudyRequest { manifest_json })
        .await
        .map_err(status_error)?
        .into_inner()
        .study_id;
    approve(federation, &study_id).await?;
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
    super::train::follow_and_write(&mut researcher, &status.run_id, &study_id, &out).await
}

/// The demo study's queries: the count by sex and age band, per hospital
/// and pooled, then the statistics of
/// `deploy/examples/study-e11-statistics.json`.
fn demo_queries() -> Vec<(String, String)> {
    let manifest: serde_json::Value = serde_json::from_str(include_str!(
        "../../../deploy/examples/study-e11-statistics.json"
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
    [
        ("e11-by-sex-and-age".to_owned(), DEMO_QUERY.to_owned()),
        ("e11-by-sex-and-age-pooled".to_owned(), demo_pooled_query()),
    ]
    .into_iter()
    .chain(statistics)
    .collect()
}

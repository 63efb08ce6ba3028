//! `ghx bench query`: end-to-end latency of federated queries over mTLS on a
//! local three-hospital federation, per hospital and pooled under secure
//! aggregation, against the same SQL run directly on one node's database in
//! the same run, and the node's disclosure control (suppression audited by
//! linear programming) on its own; and the utility of both releases: of the
//! cells whose true federation total reaches the cell size, how many each
//! gives exactly (per hospital) or at all (pooled, noised). Numbers, not a
//! test: nothing here asserts a timing.

use std::time::{Duration, Instant};

use ghx_proto::v1 as pb;

use crate::local_federation::{self, LocalFederation, LocalFederationOptions, RESEARCHER};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Federation(#[from] local_federation::Error),
    #[error("coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("a run did not complete: {0}")]
    Incomplete(String),
    #[error("policy: {0}")]
    Policy(#[from] ghx_node::policy::Error),
    #[error("query: {0}")]
    Query(#[from] ghx_study::query::Error),
    #[error("consent: {0}")]
    Consent(#[from] ghx_node::consent::eligibility::Error),
    #[error("store: {0}")]
    Store(#[from] ghx_node::store::Error),
    #[error("{0}")]
    View(#[from] ghx_node::views::Error),
    #[error("benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub dir: std::path::PathBuf,
    pub patients_per_node: usize,
    pub runs: usize,
    pub seed: u64,
    /// Nodes dial the coordinator (outbound-only mode) instead of listening.
    pub outbound: bool,
}

impl BenchReport {
    /// Federated p50 over the slowest node's local SQL p50 for the query
    /// `name` ("count" or "grouped"), with that node's id: the target's
    /// measure of overhead.
    pub fn overhead(&self, name: &str) -> Option<(f64, String)> {
        self.ratio(name, "local SQL")
    }

    /// Federated p50 over the slowest node's own work p50 (members from
    /// its cohort index, counted, printed) for the query `name`: what the
    /// federation adds to what the nodes do.
    pub fn over_node_work(&self, name: &str) -> Option<(f64, String)> {
        self.ratio(name, "node work")
    }

    /// Pooled p50 over per-hospital p50 of the query `name`.
    pub fn pooled_over_per_hospital(&self, name: &str) -> Option<f64> {
        let p50 = |prefix: String| {
            self.latencies
                .iter()
                .find(|l| l.name.starts_with(&prefix))
                .map(|l| l.p50.as_secs_f64())
        };
        Some(p50(format!("pooled {name} "))? / p50(format!("federated {name} "))?)
    }

    fn ratio(&self, name: &str, local: &str) -> Option<(f64, String)> {
        let federated = self
            .latencies
            .iter()
            .find(|l| l.name.starts_with(&format!("federated {name} ")))?;
        let prefix = format!("{local} {name} (");
        let slowest = self
            .latencies
            .iter()
            .filter(|l| l.name.starts_with(&prefix))
            .max_by_key(|l| l.p50)?;
        let node = slowest.name[prefix.len()..]
            .trim_end_matches(')')
            .to_owned();
        Some((
            federated.p50.as_secs_f64() / slowest.p50.as_secs_f64(),
            node,
        ))
    }
}

/// Latency percentiles of one measured operation.
#[derive(Debug, Clone)]
pub struct Latency {
    pub name: String,
    pub p50: Duration,
    pub p95: Duration,
    pub max: Duration,
}

fn latency(name: &str, mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Latency {
        name: name.to_owned(),
        p50: at(0.5),
        p95: at(0.95),
        max: *samples.last().expect("at least one run"),
    }
}

const COUNT: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count"}}"#;
const GROUPED: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count","group_by":["sex","age_band",{"diagnosis":[
        {"label":"hypertension","system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","codes":["I10"],"match":"prefix"},
        {"label":"dyslipidaemia","system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","codes":["E78"],"match":"prefix"}]}]}}"#;

/// The demo's table: adult women and men with type 2 diabetes by sex and
/// age band (18 cells).
const TABLE: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}],
        "sex":["female","male"],"age":{"min":18}},
    "analysis":{"kind":"count","group_by":["sex","age_band"]}}"#;

/// Noise of the pooled queries whose latency is measured (each run is
/// charged; the budget must last the runs) and of the utility's tables.
const LATENCY_NOISE: &str = r#"{"mechanism":"gaussian","epsilon":0.01,"delta":1e-8}"#;
const UTILITY_NOISE: &str = r#"{"mechanism":"gaussian","epsilon":0.3,"delta":1e-6}"#;
/// Most runs one pooled latency study pays for: 0.5 of epsilon (the
/// strictest shipped policy's budget) at 0.01 a query, the first run too.
const POOLED_RUNS: usize = 40;

/// `json` released pooled, with `noise`.
fn pooled(json: &str, noise: &str) -> String {
    let mut spec: serde_json::Value = serde_json::from_str(json).expect("a benchmark query");
    spec["release"] = serde_json::json!("pooled");
    spec["noise"] = serde_json::from_str(noise).expect("a noise statement");
    spec.to_string()
}

/// A manifest of `queries` whose budget pays for pooled noise.
fn noised_manifest(title: &str, queries: &[(&str, &str)]) -> Vec<u8> {
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &local_federation::manifest_with_budget(title, "HRESCH", queries, 0.5),
    )
    .expect("a manifest");
    manifest["privacy_delta"] = serde_json::json!(1e-4);
    manifest.to_string().into_bytes()
}

/// Of one table's cells whose true federation total (each hospital's
/// consenting patients added) is at least the cell size: how many there
/// are, how many the per-hospital release gives exactly (no hospital
/// withheld its part), and how many the pooled one releases.
#[derive(Debug, Clone)]
pub struct Utility {
    pub table: String,
    pub cells: usize,
    pub worth_releasing: usize,
    pub per_hospital_exact: usize,
    pub pooled_released: usize,
    /// The pooled release's largest error among released cells.
    pub pooled_max_error: u64,
    /// Of the cells worth releasing the pooled table withheld: how many
    /// for a noisy total below the cell size, how many to protect others.
    pub pooled_withheld_small: usize,
    pub pooled_withheld_protecting: usize,
}

/// Everything `run` measured.
#[derive(Debug)]
pub struct BenchReport {
    pub setup: Duration,
    pub resources_per_node: Vec<(String, u64)>,
    pub first_query: Duration,
    pub latencies: Vec<Latency>,
    pub utility: Vec<Utility>,
}

/// Starts the federation, runs each query `runs` times end to end and as
/// local SQL on Chosun's store, and returns the latencies.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, Error> {
    let started = Instant::now();
    let federation = LocalFederation::start(&LocalFederationOptions {
        node_link: if options.outbound {
            crate::local_federation::NodeLink::Outbound { via: None }
        } else {
            crate::local_federation::NodeLink::Listen
        },
        ..LocalFederationOptions::new(&options.dir, options.patients_per_node, options.seed)
    })
    .await?;
    let setup = started.elapsed();
    // An academic requester: Chosun refuses companies three-way tables.
    let study_id = federation
        .approved_study(
            RESEARCHER,
            local_federation::manifest_for(
                "benchmark",
                "HRESCH",
                &[("count", COUNT), ("grouped", GROUPED)],
            ),
        )
        .await?;
    let count_pooled = pooled(COUNT, LATENCY_NOISE);
    let grouped_pooled = pooled(GROUPED, LATENCY_NOISE);
    let mut pooled_studies = Vec::new();
    for (name, json) in [("count", &count_pooled), ("grouped", &grouped_pooled)] {
        let id = federation
            .approved_study(
                RESEARCHER,
                noised_manifest("benchmark, pooled", &[(name, json)]),
            )
            .await?;
        pooled_studies.push((name, id));
    }
    let requester = federation.client(RESEARCHER).await?;
    let run_in = |study_id: String, query: &'static str| {
        let mut requester = requester.clone();
        async move {
            let t = Instant::now();
            let result = requester
                .run_study(pb::RunStudyRequest {
                    study_id,
                    query: query.to_owned(),
                })
                .await?
                .into_inner()
                .result
                .ok_or_else(|| Error::Incomplete("no result".to_owned()))?;
            if !result.failures.is_empty() {
                return Err(Error::Incomplete(format!(
                    "nodes failed: {:?}",
                    result.failures
                )));
            }
            Ok::<_, Error>((t.elapsed(), result))
        }
    };
    let run = |query: &'static str| {
        let run = run_in(study_id.clone(), query);
        async move { Ok::<_, Error>(run.await?.0) }
    };
    // The first query of a consent context evaluates every patient's consent.
    let first_query = run("count").await?;
    run("grouped").await?;
    let mut latencies = Vec::new();
    for (name, query) in [("count", "count"), ("grouped", "grouped")] {
        let mut samples = Vec::with_capacity(options.runs);
        for _ in 0..options.runs {
            samples.push(run(query).await?);
        }
        latencies.push(latency(
            &format!("federated {name} (3 nodes, mTLS)"),
            samples,
        ));
    }
    for (name, study) in &pooled_studies {
        // The first run of a pooled query is as warm as the per-hospital
        // ones measured above: consent is evaluated already.
        run_in(study.clone(), name).await?;
        let mut samples = Vec::new();
        for _ in 0..options.runs.min(POOLED_RUNS - 1) {
            samples.push(run_in(study.clone(), name).await?.0);
        }
        latencies.push(latency(
            &format!("pooled {name} (3 nodes, secure sum)"),
            samples,
        ));
    }
    let utility = utility(&federation, &run_in).await?;
    // The same SQL straight on each node's database, consent context ready
    // (the target compares with the slowest node's).
    for node in &federation.nodes {
        let store = node.store.clone();
        let id = node.profile.id;
        let runs = options.runs;
        // The node's own consent rules, as it applies them.
        let rules =
            ghx_node::policy::PolicyDir::load(&federation.dir.join("policies").join(id))?.consent;
        let local = tokio::task::spawn_blocking(move || -> Result<Vec<Latency>, Error> {
            use ghx_node::consent::eligibility::Eligibility;
            let mut out = Vec::new();
            for (name, json) in [("count", COUNT), ("grouped", GROUPED)] {
                let spec = ghx_study::query::QuerySpec::parse(json.as_bytes())?;
                let eligibility = Eligibility::new(rules.clone());
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let request = ghx_node::gate::consent_request("HRESCH", &spec, now);
                let prepared = eligibility.prepare(&store, &request)?;
                let mut samples = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let t = Instant::now();
                    ghx_node::testing::count(
                        &store,
                        &spec,
                        &prepared.context,
                        &eligibility.rules().sensitive,
                    )?;
                    samples.push(t.elapsed());
                }
                out.push(latency(&format!("local SQL {name} ({id})"), samples));
                // What a node runs per query: its members (from the cohort
                // index, which covers these queries), counted in Rust, plus
                // the cohort print differencing compares.
                let index = ghx_node::testing::CohortIndex::new();
                // Its first use loads the context and the query's code sets.
                let t = Instant::now();
                index.members(
                    &store,
                    &spec,
                    &prepared.context,
                    &eligibility.rules().sensitive,
                )?;
                out.push(latency(
                    &format!("cohort index first load {name} ({id})"),
                    vec![t.elapsed()],
                ));
                let mut samples = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let t = Instant::now();
                    let members = index.members(
                        &store,
                        &spec,
                        &prepared.context,
                        &eligibility.rules().sensitive,
                    )?;
                    ghx_node::testing::analyse(&spec, &members, false);
                    ghx_node::testing::differencing::CohortPrint::of_members(&members);
                    samples.push(t.elapsed());
                }
                out.push(latency(&format!("node work {name} ({id})"), samples));
                // Disclosure control alone: suppression with its audit by
                // linear programming, on this node's table.
                let members = index.members(
                    &store,
                    &spec,
                    &prepared.context,
                    &eligibility.rules().sensitive,
                )?;
                let cells = ghx_node::testing::analyse(&spec, &members, false).cells;
                let mut samples = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let candidates = cells
                        .iter()
                        .map(|c| ghx_node::testing::Candidate::exact(c, 10))
                        .collect();
                    let t = Instant::now();
                    ghx_node::testing::release(id, &spec, cells.clone(), candidates, 10);
                    samples.push(t.elapsed());
                }
                out.push(latency(&format!("release {name} ({id})"), samples));
            }
            Ok(out)
        })
        .await??;
        latencies.extend(local);
    }
    let resources_per_node = federation
        .nodes
        .iter()
        .map(|n| (n.profile.id.to_owned(), n.import.accepted))
        .collect();
    federation.shutdown().await;
    Ok(BenchReport {
        setup,
        resources_per_node,
        first_query,
        latencies,
        utility,
    })
}

/// Each table's true federation totals: every node's raw counts of its
/// consenting patients, added.
fn true_totals(
    federation: &LocalFederation,
    json: &str,
) -> Result<std::collections::BTreeMap<Vec<String>, u64>, Error> {
    use ghx_node::consent::eligibility::Eligibility;
    let spec = ghx_study::query::QuerySpec::parse(json.as_bytes())?;
    let mut totals = std::collections::BTreeMap::new();
    for node in &federation.nodes {
        let rules = ghx_node::policy::PolicyDir::load(
            &federation.dir.join("policies").join(node.profile.id),
        )?
        .consent;
        let eligibility = Eligibility::new(rules);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let request = ghx_node::gate::consent_request("HRESCH", &spec, now);
        let prepared = eligibility.prepare(&node.store, &request)?;
        for cell in ghx_node::testing::count(
            &node.store,
            &spec,
            &prepared.context,
            &eligibility.rules().sensitive,
        )? {
            *totals.entry(cell.key).or_insert(0) += cell.value.patients();
        }
    }
    Ok(totals)
}

/// The demo's table and the grouped query, each released per hospital and
/// pooled (epsilon 0.3), against their true totals.
async fn utility<F, Fut>(federation: &LocalFederation, run_in: &F) -> Result<Vec<Utility>, Error>
where
    F: Fn(String, &'static str) -> Fut,
    Fut: std::future::Future<Output = Result<(Duration, pb::StudyResult), Error>>,
{
    let mut out = Vec::new();
    for (name, json) in [
        ("the demo's E11 table (adults by sex and age band)", TABLE),
        ("grouped", GROUPED),
    ] {
        let pooled_json = pooled(json, UTILITY_NOISE);
        let study = federation
            .approved_study(
                RESEARCHER,
                noised_manifest(
                    "benchmark, utility",
                    &[("per_hospital", json), ("pooled", &pooled_json)],
                ),
            )
            .await?;
        let (_, per) = run_in(study.clone(), "per_hospital").await?;
        let (_, pooled) = run_in(study, "pooled").await?;
        let truth = true_totals(federation, json)?;
        let k = u64::from(federation_cell_size());
        let worth = |key: &[String]| truth.get(key).copied().unwrap_or(0) >= k;
        let mut max_error = 0;
        let pooled_released = pooled
            .total
            .iter()
            .filter(|c| worth(&c.key) && c.withheld.is_empty())
            .inspect(|c| {
                let t = truth.get(&c.key).copied().unwrap_or(0);
                max_error = max_error.max(c.count.abs_diff(t));
            })
            .count();
        let withheld = |why: &str| {
            pooled
                .total
                .iter()
                .filter(|c| worth(&c.key) && c.withheld.starts_with(why))
                .count()
        };
        out.push(Utility {
            pooled_withheld_small: withheld("count below"),
            pooled_withheld_protecting: withheld("withheld"),
            table: name.to_owned(),
            cells: pooled.total.len(),
            worth_releasing: pooled.total.iter().filter(|c| worth(&c.key)).count(),
            per_hospital_exact: per
                .total
                .iter()
                .filter(|c| worth(&c.key) && c.suppressed_at.is_empty())
                .count(),
            pooled_released,
            pooled_max_error: max_error,
        });
    }
    Ok(out)
}

/// The cell size the benchmark's federation holds releases to.
fn federation_cell_size() -> u32 {
    LocalFederationOptions::new(std::path::Path::new("."), 0, 0).min_cell_size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(name: &str, ms: u64) -> Latency {
        let d = Duration::from_millis(ms);
        Latency {
            name: name.to_owned(),
            p50: d,
            p95: d,
            max: d,
        }
    }

    #[test]
    fn overhead_is_taken_against_the_slowest_nodes_local_sql() {
        let report = BenchReport {
            setup: Duration::ZERO,
            resources_per_node: Vec::new(),
            first_query: Duration::ZERO,
            utility: Vec::new(),
            latencies: vec![
                at("federated count (3 nodes, mTLS)", 120),
                at("local SQL count (chonnam)", 40),
                at("node work count (chonnam)", 90),
                at("local SQL count (chosun)", 60),
                at("local SQL grouped (chosun)", 10),
            ],
        };
        let (ratio, node) = report.overhead("count").unwrap();
        assert!((ratio - 2.0).abs() < 1e-12, "{ratio}");
        assert_eq!(node, "chosun");
        // No federated grouped run measured: no ratio.
        assert_eq!(report.overhead("grouped"), None);
        // Against the nodes' own work: only chonnam measured it.
        let (ratio, node) = report.over_node_work("count").unwrap();
        assert!((ratio - 120.0 / 90.0).abs() < 1e-12, "{ratio}");
        assert_eq!(node, "chonnam");
    }
}

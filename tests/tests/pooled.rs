//! Pooled release through the real federation: three nodes' raw cells
//! summed under secure aggregation, disclosure control on the federation's
//! table, and what crosses the wire.

use std::collections::BTreeMap;

use ghx::local_federation::{
    LocalFederation, LocalFederationOptions, REQUESTER, SIGNING_KID, manifest_with_budget,
};
use ghx_disclosure::pooled::{Layout, calibrate, from_ring};
use ghx_federation_tests::reference::Export;
use ghx_node::consent::DefaultConsent;
use ghx_node::policy::PolicyDir;
use ghx_pki::TlsMaterial;
use ghx_proto::v1 as pb;
use ghx_proto::v1::node_service_client::NodeServiceClient;
use ghx_study::capability::{Signer, claims_for};
use ghx_study::manifest::StudyManifest;
use ghx_study::query::QuerySpec;
use tonic::transport::{Channel, Endpoint};

const KCD8: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
const K: u64 = 10;

fn by_sex_and_band(code: &str, extra: &str) -> String {
    format!(
        r#"{{"version":"ghx.query/v1",
        "cohort":{{"as_of":"2026-01-01","conditions":[{{"system":"{KCD8}","code":"{code}","match":"prefix"}}]}},
        "analysis":{{"kind":"count","group_by":["sex","age_band"]}}{extra}}}"#
    )
}

const NOISE: &str = r#","noise":{"mechanism":"gaussian","epsilon":0.2,"delta":1e-6}"#;
/// Less noise budget, for the linked table (the manifest's budget is 0.5).
const LESS_NOISE: &str = r#","noise":{"mechanism":"gaussian","epsilon":0.1,"delta":1e-6}"#;

fn histogram() -> String {
    format!(
        r#"{{"version":"ghx.query/v1",
        "cohort":{{"as_of":"2026-01-01","conditions":[{{"system":"{KCD8}","code":"E11","match":"prefix"}}]}},
        "analysis":{{"kind":"histogram","variable":{{"kind":"age"}},"bins":{{"start":0,"width":10,"count":10}},"quantiles":[0.5]}},
        "release":"pooled"{NOISE}}}"#
    )
}

async fn node_client(federation: &LocalFederation, node: usize) -> NodeServiceClient<Channel> {
    let tls = TlsMaterial::load(&federation.pki.tls_files("coordinator")).unwrap();
    let id = federation.nodes[node].profile.id;
    let channel = Endpoint::from_shared(format!(
        "https://localhost:{}",
        federation.nodes[node].addr().port()
    ))
    .unwrap()
    .tls_config(tls.client_config(id))
    .unwrap()
    .connect()
    .await
    .unwrap();
    // A linked table's masked bitmaps run to megabytes.
    NodeServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Each node's reference counts by (sex, band), from its NDJSON export.
fn references(federation: &LocalFederation, code: &str) -> Vec<BTreeMap<Vec<String>, u64>> {
    federation
        .nodes
        .iter()
        .map(|node| {
            let mut export = Export::read(&node.data_dir);
            let policy =
                PolicyDir::load(&federation.dir.join("policies").join(node.profile.id)).unwrap();
            export.opt_out = policy.consent.default == DefaultConsent::OptOut;
            export
                .count_by_sex_and_band(KCD8, code, ghx_synth::default_as_of())
                .into_iter()
                .map(|((sex, band), n)| (vec![sex, band], n))
                .collect()
        })
        .collect()
}

/// One node's full table of `spec` over its consenting patients, with who
/// is behind each cell, computed outside the federation.
fn consented_table(
    federation: &LocalFederation,
    node: &ghx::local_federation::LocalNode,
    spec: &QuerySpec,
) -> ghx_node::testing::Analysed {
    use ghx_node::consent::eligibility::Eligibility;
    let rules = PolicyDir::load(&federation.dir.join("policies").join(node.profile.id))
        .unwrap()
        .consent;
    let eligibility = Eligibility::new(rules);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let request = ghx_node::gate::consent_request("HRESCH", spec, now);
    let prepared = eligibility.prepare(&node.store, &request).unwrap();
    let members = ghx_node::testing::cohort_for_analysis(
        &node.store,
        spec,
        &prepared.context,
        &eligibility.rules().sensitive,
    )
    .unwrap();
    ghx_node::testing::analyse(spec, &members, true)
}

/// Every node's raw cells of `json` over its consenting patients, merged
/// key by key: the union's table, computed outside the federation.
fn union_cells(
    federation: &LocalFederation,
    json: &str,
) -> BTreeMap<Vec<String>, ghx_node::testing::Raw> {
    use ghx_node::testing::Raw;
    let spec = QuerySpec::parse(json.as_bytes()).unwrap();
    let mut out: BTreeMap<Vec<String>, Raw> = BTreeMap::new();
    for node in &federation.nodes {
        for cell in consented_table(federation, node, &spec).cells {
            match (out.get_mut(&cell.key), cell.value) {
                (Some(Raw::Values(a)), Raw::Values(b)) => a.extend(b),
                (Some(Raw::Count(a)), Raw::Count(b)) => *a += b,
                (
                    Some(Raw::Rate { events, population }),
                    Raw::Rate {
                        events: e,
                        population: p,
                    },
                ) => {
                    *events += e;
                    *population += p;
                }
                (None, value) => {
                    out.insert(cell.key, value);
                }
                (Some(_), other) => panic!("cells of one kind: {other:?}"),
            }
        }
    }
    out
}

/// Each node's RRN of each patient (by the patient's print hash), from its
/// NDJSON export: what the linkage tokens were made of at import.
fn rrns(federation: &LocalFederation, node: usize) -> BTreeMap<i64, String> {
    let text =
        std::fs::read_to_string(federation.nodes[node].data_dir.join("Patient.ndjson")).unwrap();
    text.lines()
        .filter_map(|line| {
            let p: serde_json::Value = serde_json::from_str(line).unwrap();
            let rrn = p["identifier"]
                .as_array()?
                .iter()
                .find(|i| i["system"] == ghx_synth::RRN_SYSTEM)?["value"]
                .as_str()?
                .replace('-', "");
            let id = p["id"].as_str().unwrap();
            Some((
                ghx_node::testing::differencing::patient_hash(id) as i64,
                rrn,
            ))
        })
        .collect()
}

/// The union of the three exports deduplicated by RRN, computed outside
/// the federation: per cell of `json` (counts, or a rate's events and
/// population), the distinct residents any hospital puts there (a patient
/// without an RRN once per hospital); and how many of the cohort's
/// patients have no RRN.
fn distinct_cells(
    federation: &LocalFederation,
    json: &str,
) -> (BTreeMap<Vec<String>, [usize; 2]>, usize) {
    use std::collections::BTreeSet;
    let spec = QuerySpec::parse(json.as_bytes()).unwrap();
    let mut sets: BTreeMap<Vec<String>, [BTreeSet<String>; 2]> = BTreeMap::new();
    let mut unlinked = 0;
    for (i, node) in federation.nodes.iter().enumerate() {
        let rrn = rrns(federation, i);
        let who = |print: &i64| {
            rrn.get(print)
                .cloned()
                .unwrap_or_else(|| format!("{}/{print}", node.profile.id))
        };
        let analysed = consented_table(federation, node, &spec);
        let mut without: std::collections::HashSet<i64> = std::collections::HashSet::new();
        for (cell, members) in analysed.cells.iter().zip(&analysed.members) {
            let entry = sets.entry(cell.key.clone()).or_default();
            entry[0].extend(members.events.iter().map(who));
            entry[1].extend(members.patients.iter().map(who));
            without.extend(
                members
                    .patients
                    .iter()
                    .filter(|p| !rrn.contains_key(p))
                    .copied(),
            );
        }
        unlinked += without.len();
    }
    let counts = sets
        .into_iter()
        .map(|(key, [events, patients])| (key, [events.len(), patients.len()]))
        .collect();
    (counts, unlinked)
}

async fn run(federation: &LocalFederation, study_id: &str, query: &str) -> pb::StudyResult {
    federation
        .client(REQUESTER)
        .await
        .unwrap()
        .run_study(pb::RunStudyRequest {
            study_id: study_id.to_owned(),
            query: query.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
}

/// One pooled session straight to the nodes, as the coordinator would
/// run it: `queries[i]` goes to node i; the masked vectors they answer.
async fn session(
    clients: &mut [NodeServiceClient<Channel>],
    signer: &Signer,
    manifest: (&StudyManifest, &[u8]),
    study_id: &str,
    queries: [Vec<u8>; 3],
    params: pb::RoundParams,
) -> Vec<Vec<u64>> {
    let ids = &params.participants;
    let mut keys = Vec::new();
    // One capability per query, as the coordinator sends.
    let mut tokens: BTreeMap<&[u8], String> = BTreeMap::new();
    for (client, query) in clients.iter_mut().zip(&queries) {
        let token = tokens
            .entry(query.as_slice())
            .or_insert_with(|| {
                signer
                    .sign(&claims_for(
                        manifest.0,
                        study_id,
                        ids.to_vec(),
                        query,
                        time::Duration::minutes(5),
                    ))
                    .unwrap()
            })
            .clone();
        let opened = client
            .pooled_open(pb::PooledOpenRequest {
                capability: token,
                query: Some(pb::QuerySpec {
                    json: query.clone(),
                }),
                manifest_json: manifest.1.to_vec(),
                params: Some(params.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        keys.push(opened.keys.unwrap());
    }
    let mut masked = Vec::new();
    for client in clients.iter_mut() {
        let input = client
            .pooled_input(pb::PooledInputRequest {
                session: params.round.clone(),
                keys: keys.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        masked.push(input.values);
    }
    masked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_table_is_the_union_and_the_coordinator_sees_only_the_sum() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        pooled_without_noise: true,
        // A fifth of each hospital's patients are treated at two or three.
        shared: 0.2,
        ..LocalFederationOptions::new(dir.path(), 1500, 2026)
    })
    .await
    .unwrap();
    let per_hospital = by_sex_and_band("E11", "");
    let pooled = by_sex_and_band("E11", r#","release":"pooled""#);
    let noisy = by_sex_and_band("E11", &format!(r#","release":"pooled"{NOISE}"#));
    let other = by_sex_and_band("I10", r#","release":"pooled""#);
    let histogram = histogram();
    let summary = format!(
        r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","sex":["female","male"],"conditions":[{{"system":"{KCD8}","code":"E11","match":"prefix"}}]}},
        "analysis":{{"kind":"summary","variable":{{"kind":"age"}},"group_by":["sex"],"clip":{{"min":0,"max":120}}}},"release":"pooled"}}"#
    );
    let rate = format!(
        r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","sex":["female","male"],"conditions":[{{"system":"{KCD8}","code":"E11","match":"prefix"}}]}},
        "analysis":{{"kind":"rate","event":{{"conditions":[{{"system":"{KCD8}","code":"I10","match":"prefix"}}]}},"group_by":["sex"]}},"release":"pooled"}}"#
    );
    // Fewer slots than the default keep the test quick; the error bound
    // follows them.
    let once = by_sex_and_band(
        "E11",
        r#","release":"pooled","each_patient_once":true,"linkage_slots":4096"#,
    );
    let once_noisy = by_sex_and_band(
        "E11",
        &format!(
            r#","release":"pooled","each_patient_once":true,"linkage_slots":4096{LESS_NOISE}"#
        ),
    );
    let once_rate = rate.replace(
        r#""release":"pooled""#,
        r#""release":"pooled","each_patient_once":true,"linkage_slots":4096"#,
    );
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest_with_budget(
        "pooled",
        "HRESCH",
        &[
            ("per", per_hospital.as_str()),
            ("pooled", pooled.as_str()),
            ("noisy", noisy.as_str()),
            ("other", other.as_str()),
            ("histogram", histogram.as_str()),
            ("summary", summary.as_str()),
            ("rate", rate.as_str()),
            ("once", once.as_str()),
            ("once-noisy", once_noisy.as_str()),
            ("once-rate", once_rate.as_str()),
        ],
        0.5,
    ))
    .unwrap();
    manifest["privacy_delta"] = serde_json::json!(1e-4);
    let study_id = federation
        .approved_study(REQUESTER, manifest.to_string().into_bytes())
        .await
        .unwrap();
    let refs = references(&federation, "E11");
    let truth =
        |key: &[String]| -> u64 { refs.iter().map(|r| r.get(key).copied().unwrap_or(0)).sum() };

    // Exact pooled: every released cell is the union's count; every small
    // total is withheld; no hospital's cells in the result.
    let result = run(&federation, &study_id, "pooled").await;
    let release = result.pooled.as_ref().expect("a pooled result");
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    assert!(result.per_node.is_empty());
    assert_eq!(release.contributors.len(), 3);
    assert_eq!(result.total.len(), 44);
    let mut pooled_released = 0;
    for cell in &result.total {
        let n = truth(&cell.key);
        if cell.withheld.is_empty() {
            assert_eq!(cell.count, n, "{:?}", cell.key);
            assert!(n >= K, "a small pooled total {:?} released", cell.key);
            pooled_released += 1;
        } else {
            assert!(
                n < K || cell.withheld.starts_with("withheld"),
                "{:?}: {}",
                cell.key,
                cell.withheld
            );
        }
    }
    let worth = result.total.iter().filter(|c| truth(&c.key) >= K).count();

    // A pooled summary and rate equal the union's, cell by cell.
    let union = union_cells(&federation, &summary);
    let result = run(&federation, &study_id, "summary").await;
    let mut compared = 0;
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let Some(ghx_node::testing::Raw::Values(values)) = union.get(&cell.key) else {
            panic!("{:?} is in the union", cell.key)
        };
        let want = ghx_study::result::Moments::of(values);
        let got = cell.summary.as_ref().unwrap();
        assert_eq!(got.n, want.n, "{:?}", cell.key);
        assert!((got.mean - want.mean).abs() < 1e-9, "{:?}", cell.key);
        assert!(
            (got.m2 - want.m2).abs() < 1e-6 * want.m2.max(1.0),
            "{:?}",
            cell.key
        );
        assert_eq!((got.min, got.max), (None, None));
        compared += 1;
    }
    assert!(compared >= 2, "{result:?}");
    let union = union_cells(&federation, &rate);
    let result = run(&federation, &study_id, "rate").await;
    let mut compared = 0;
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let Some(ghx_node::testing::Raw::Rate { events, population }) = union.get(&cell.key) else {
            panic!("{:?} is in the union", cell.key)
        };
        let got = cell.rate.as_ref().unwrap();
        assert_eq!(
            (got.events, got.population),
            (*events, *population),
            "{:?}",
            cell.key
        );
        compared += 1;
    }
    assert!(compared >= 2, "{result:?}");

    // These hospitals pool exactly, so they release no cells of their
    // own: the per-hospital query is refused at each, by name.
    let per = run(&federation, &study_id, "per").await;
    assert_eq!(per.failures.len(), 3, "{:?}", per.failures);
    assert!(
        per.failures
            .iter()
            .all(|f| f.reason.contains("release.per_hospital = false")),
        "{:?}",
        per.failures
    );
    println!(
        "cells with a true total >= {K}: {worth}; released by the exact pooled table {pooled_released}"
    );

    // Noised: within the calibrated spread of the union, noise stated.
    let spec = QuerySpec::parse(noisy.as_bytes()).unwrap();
    let calibration = calibrate(spec.noise.as_ref().unwrap(), &Layout::of(&spec), 3).unwrap();
    let result = run(&federation, &study_id, "noisy").await;
    let release = result.pooled.as_ref().unwrap();
    assert_eq!(
        release.noise.as_ref().unwrap().mechanism,
        "discrete_gaussian"
    );
    let mut off = 0.0f64;
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let error = cell.count as f64 - truth(&cell.key) as f64;
        assert!(
            error.abs() < 6.0 * calibration.total,
            "{:?}: {error}",
            cell.key
        );
        off = off.max(error.abs());
    }
    // Noise there is: with a sum scale of about 20, no released cell
    // being off by more than 2 would happen less than once in 10^6 tables.
    assert!(off > 2.0, "the pooled table looks exact: {result:?}");
    let noisy_released = result
        .total
        .iter()
        .filter(|c| truth(&c.key) >= K && c.withheld.is_empty())
        .count();
    println!(
        "noisy pooled: sigma {:.2}, largest error {off}, cells with a true total >= {K} released {noisy_released} of {worth}",
        calibration.total
    );
    // Pooled quantiles come from the whole noisy histogram: never partial,
    // and within a bin or two of the union's median.
    let result = run(&federation, &study_id, "histogram").await;
    assert_eq!(result.quantiles.len(), 1);
    assert!(!result.quantiles[0].partial);
    let bins = ghx_study::query::Bins {
        start: 0.0,
        width: 10.0,
        count: 10,
    };
    let union = union_cells(&federation, &histogram);
    let counts: Vec<u64> = (0..12)
        .map(|i| match union.get(&vec![bins.label(i)]) {
            Some(ghx_node::testing::Raw::Count(n)) => *n,
            _ => 0,
        })
        .collect();
    let median = ghx_study::result::quantile_of_counts(&counts, &bins, 0.5).unwrap();
    let got = result.quantiles[0].value.unwrap();
    assert!((got - median).abs() < 15.0, "{got} vs {median}");

    // As the coordinator, straight to the nodes.
    let mut requester = federation.client(REQUESTER).await.unwrap();
    let summary = requester
        .get_study(pb::GetStudyRequest {
            study_id: study_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let manifest = StudyManifest::parse(&summary.manifest_json).unwrap();
    let key =
        std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
    let signer = Signer::from_pem(SIGNING_KID, &key).unwrap();
    let ids: Vec<String> = federation
        .nodes
        .iter()
        .map(|n| n.profile.id.to_owned())
        .collect();
    let query_of = |name: &str| manifest.query_named(name).unwrap().query.canonical_json();
    let layout = Layout::of(&QuerySpec::parse(pooled.as_bytes()).unwrap());
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(node_client(&federation, i).await);
    }
    // A pooled query is never released per hospital.
    let token = signer
        .sign(&claims_for(
            &manifest,
            &study_id,
            ids.clone(),
            &query_of("pooled"),
            time::Duration::minutes(5),
        ))
        .unwrap();
    let refused = clients[0]
        .run_aggregate(pb::RunAggregateRequest {
            capability: token,
            query: Some(pb::QuerySpec {
                json: query_of("pooled"),
            }),
            manifest_json: summary.manifest_json.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("pooled release only"),
        "{}",
        refused.message()
    );

    let sum = |vectors: &[Vec<u64>]| -> Vec<i64> {
        let mut out = vec![0u64; vectors[0].len()];
        for v in vectors {
            for (o, x) in out.iter_mut().zip(v) {
                *o = o.wrapping_add(*x);
            }
        }
        from_ring(&out)
    };
    let manifest_pair = (&manifest, summary.manifest_json.as_slice());
    let params = |name: &str| pb::RoundParams {
        round: format!("{study_id}/{name}"),
        participants: ids.clone(),
        threshold: 3,
        dim: layout.dim() as u32,
    };
    let masked = session(
        &mut clients,
        &signer,
        manifest_pair,
        &study_id,
        [query_of("pooled"), query_of("pooled"), query_of("pooled")],
        params("wire"),
    )
    .await;
    // What each node sent is no count: its values are spread over the
    // whole ring, none equals the node's own cell.
    for (node, vector) in masked.iter().enumerate() {
        let own = from_ring(vector);
        let equal = layout
            .keys
            .iter()
            .zip(&own)
            .filter(|(key, v)| refs[node].get(*key).copied().unwrap_or(0) as i64 == **v)
            .count();
        assert_eq!(equal, 0, "node {node} sent cells in the clear");
        assert!(own.iter().filter(|v| v.unsigned_abs() > 1 << 40).count() > own.len() / 2);
    }
    // A session masks once: its second masked input is refused.
    let again = clients[0]
        .pooled_input(pb::PooledInputRequest {
            session: format!("{study_id}/wire"),
            keys: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(
        again.message().contains("not open here"),
        "{}",
        again.message()
    );
    // Their sum is the union, cell by cell.
    let total = sum(&masked);
    for (key, v) in layout.keys.iter().zip(&total) {
        assert_eq!(*v, truth(key) as i64, "{key:?}");
    }
    // A coordinator that sends one node another query (of the same shape)
    // gets nothing readable: the masks are bound to the query.
    let masked = session(
        &mut clients,
        &signer,
        manifest_pair,
        &study_id,
        [query_of("other"), query_of("pooled"), query_of("pooled")],
        params("mixed"),
    )
    .await;
    let garbage = sum(&masked);
    assert!(
        garbage
            .iter()
            .filter(|v| v.unsigned_abs() > 1 << 40)
            .count()
            > garbage.len() / 2
    );
    each_patient_once(&federation, &study_id, (&once, &once_rate), &truth).await;
    let linked = Layout::of(&QuerySpec::parse(once.as_bytes()).unwrap());
    let params = |name: &str| pb::RoundParams {
        round: format!("{study_id}/{name}"),
        participants: ids.clone(),
        threshold: 3,
        dim: linked.dim() as u32,
    };
    // As the coordinator: the same linked query twice, under one session
    // name. Each slot's sum is a random number (no multiplicity shows),
    // and the occupied slots of one run are no more the other's than
    // chance would make them: the slots are keyed by the (single-use)
    // capability too, so every run places every patient anew.
    let mut occupied = Vec::new();
    for name in ["once-a", "once-a"] {
        let masked = session(
            &mut clients,
            &signer,
            manifest_pair,
            &study_id,
            [query_of("once"), query_of("once"), query_of("once")],
            params(name),
        )
        .await;
        let total = sum(&masked);
        // The fullest cell's bitmap.
        let m = linked.dim() / linked.keys.len();
        let bitmap = total
            .chunks(m)
            .take(linked.keys.len())
            .max_by_key(|b| b.iter().filter(|v| **v != 0).count())
            .unwrap()
            .to_vec();
        let set: std::collections::BTreeSet<usize> = bitmap
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(i, _)| i)
            .collect();
        assert!(
            bitmap
                .iter()
                .filter(|v| **v != 0)
                .all(|v| v.unsigned_abs() > 16),
            "a slot's sum shows how many hospitals hold it"
        );
        occupied.push((set, m));
    }
    let ((a, m), (b, _)) = (&occupied[0], &occupied[1]);
    let common = a.intersection(b).count() as f64;
    let chance = a.len() as f64 * b.len() as f64 / *m as f64;
    assert!(a.len() > 100, "{}", a.len());
    assert!(
        common < chance + 6.0 * chance.sqrt() + 3.0,
        "{common} slots in common, {chance:.1} by chance: the sessions' slots are linked"
    );
    federation.shutdown().await;
}

/// Counting each patient once: the pooled table equals the union of the
/// exports deduplicated by RRN within linear counting's stated error
/// (exact mode), says how many patients had no RRN, and is well below the
/// naive sum where residents are shared; noised, within the noise too.
async fn each_patient_once(
    federation: &LocalFederation,
    study_id: &str,
    (once, once_rate): (&str, &str),
    naive: &dyn Fn(&[String]) -> u64,
) {
    use ghx_disclosure::linkage::standard_error;
    let (distinct, unlinked) = distinct_cells(federation, once);
    let result = run(federation, study_id, "once").await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    let release = result.pooled.as_ref().unwrap();
    let linkage = release.linkage.as_ref().expect("the linkage is stated");
    assert!(unlinked > 0, "some patients have no RRN");
    if unlinked < K as usize {
        // Exact and below the cell size: withheld like a cell.
        assert!(linkage.unlinked_withheld && linkage.unlinked == 0);
    } else {
        assert_eq!(linkage.unlinked, unlinked as i64);
    }
    let slots = linkage.slots as usize;
    let (mut released, mut shared) = (0, 0u64);
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let want = distinct.get(&cell.key).map_or(0, |c| c[1]) as f64;
        let bound = 4.0 * standard_error(want, slots) + 1.0;
        assert!(
            (cell.count as f64 - want).abs() <= bound,
            "{:?}: {} vs {want} (bound {bound})",
            cell.key,
            cell.count
        );
        assert!(want >= K as f64 - bound, "{:?}: {want}", cell.key);
        shared += naive(&cell.key) - want as u64;
        released += 1;
    }
    assert!(released >= 4, "{released} cells released");
    // The residents treated at several hospitals are counted once.
    assert!(shared > 20, "only {shared} fewer than the naive sum");
    println!(
        "each patient once: {released} cells released, {shared} fewer patients than the naive sum, {unlinked} without an RRN"
    );
    // A rate's events and population, each once.
    let (distinct, _) = distinct_cells(federation, once_rate);
    let result = run(federation, study_id, "once-rate").await;
    let mut compared = 0;
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let [events, population] = distinct[&cell.key];
        let got = cell.rate.as_ref().unwrap();
        for (got, want) in [(got.events, events), (got.population, population)] {
            let bound = 4.0 * standard_error(want as f64, 4096) + 1.0;
            assert!((got as f64 - want as f64).abs() <= bound, "{:?}", cell.key);
        }
        compared += 1;
    }
    assert!(compared >= 2, "{compared} rate cells released");
    // Noised: within the calibrated spread and linear counting's error.
    let spec = QuerySpec::parse(
        by_sex_and_band(
            "E11",
            &format!(
                r#","release":"pooled","each_patient_once":true,"linkage_slots":4096{LESS_NOISE}"#
            ),
        )
        .as_bytes(),
    )
    .unwrap();
    let calibration = calibrate(spec.noise.as_ref().unwrap(), &Layout::of(&spec), 3).unwrap();
    let (distinct, _) = distinct_cells(federation, once);
    let result = run(federation, study_id, "once-noisy").await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    let mut off = 0.0f64;
    for cell in result.total.iter().filter(|c| c.withheld.is_empty()) {
        let want = distinct.get(&cell.key).map_or(0, |c| c[1]) as f64;
        let error = cell.count as f64 - want;
        let bound = 6.0 * calibration.total + 4.0 * standard_error(want, slots) + 1.0;
        assert!(
            error.abs() < bound,
            "{:?}: {error} (bound {bound})",
            cell.key
        );
        off = off.max(error.abs());
    }
    assert!(
        off > 2.0,
        "the noisy table looks exact: largest error {off}"
    );
}

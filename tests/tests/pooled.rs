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
    NodeServiceClient::new(channel)
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

/// Every node's raw cells of `json` over its consenting patients, merged
/// key by key: the union's table, computed outside the federation.
fn union_cells(
    federation: &LocalFederation,
    json: &str,
) -> BTreeMap<Vec<String>, ghx_node::testing::Raw> {
    use ghx_node::consent::eligibility::Eligibility;
    use ghx_node::testing::Raw;
    let spec = QuerySpec::parse(json.as_bytes()).unwrap();
    let mut out: BTreeMap<Vec<String>, Raw> = BTreeMap::new();
    for node in &federation.nodes {
        let rules = PolicyDir::load(&federation.dir.join("policies").join(node.profile.id))
            .unwrap()
            .consent;
        let eligibility = Eligibility::new(rules);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let request = ghx_node::gate::consent_request("HRESCH", &spec, now);
        let prepared = eligibility.prepare(&node.store, &request).unwrap();
        let members = ghx_node::testing::cohort_for_analysis(
            &node.store,
            &spec,
            &prepared.context,
            &eligibility.rules().sensitive,
        )
        .unwrap();
        for cell in ghx_node::testing::analyse(&spec, &members, true).cells {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_table_is_the_union_and_the_coordinator_sees_only_the_sum() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        pooled_without_noise: true,
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

    // One session: `queries[i]` goes to node i.
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
        for (client, query) in clients.iter_mut().zip(&queries) {
            let token = signer
                .sign(&claims_for(
                    manifest.0,
                    study_id,
                    ids.to_vec(),
                    query,
                    time::Duration::minutes(5),
                ))
                .unwrap();
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
    federation.shutdown().await;
}

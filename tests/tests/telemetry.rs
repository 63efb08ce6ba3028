//! OpenTelemetry export end to end: with an OTLP endpoint configured, a
//! federated query is one trace from the coordinator's RunStudy through a
//! call per node into each node's RunAggregate (the context crosses mTLS gRPC
//! in `traceparent` metadata) with spans for gate, consent, engine (and the
//! store's SQL below it), release and audit; metrics count node decisions, refusals by kind and query
//! latency. Exported attributes carry no patient identifiers.
//!
//! The services of one process share one global telemetry, so this is the
//! only test in its binary.

use std::collections::{BTreeMap, BTreeSet};

use ghx::local_federation::{
    LocalFederation, LocalFederationOptions, REQUESTER, manifest_with_budget,
};
use ghx_federation_tests::collector::{Collector, SeenSpan};
use ghx_federation_tests::reference::Export;
use ghx_proto::v1 as pb;

const NOISY_COUNT: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count","group_by":["sex"]},
    "noise":{"mechanism":"laplace","epsilon":0.2}}"#;

async fn run(
    federation: &LocalFederation,
    study: &str,
) -> Result<pb::StudyResult, ghx::local_federation::Error> {
    federation.run_study(study, "").await
}

fn parent_of<'a>(spans: &'a [SeenSpan], span: &SeenSpan) -> Option<&'a SeenSpan> {
    spans
        .iter()
        .find(|p| p.trace_id == span.trace_id && p.span_id == span.parent_span_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_query_is_one_trace_and_its_decisions_are_counted() {
    let collector = Collector::start().await;
    let telemetry = ghx_telemetry::Telemetry::install(
        ghx_telemetry::Service {
            name: "ghx-federation-test",
            instance: "local",
        },
        &ghx_telemetry::Settings {
            otlp_endpoint: Some(collector.endpoint()),
            sample_ratio: 1.0,
            // Exported once, at shutdown.
            metrics_interval_secs: 3600,
        },
        "info",
    )
    .unwrap();
    assert!(telemetry.exporting());

    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions::new(dir.path(), 300, 5))
        .await
        .unwrap();
    // Budget for one noised query: the second is refused by every node.
    let study = federation
        .approved_study(
            REQUESTER,
            manifest_with_budget("telemetry", "HRESCH", &[("noisy", NOISY_COUNT)], 0.3),
        )
        .await
        .unwrap();
    let answered = run(&federation, &study).await.unwrap();
    assert_eq!(answered.per_node.len(), 3, "{:?}", answered.failures);
    let refused = run(&federation, &study).await.unwrap();
    assert_eq!(
        refused.failures.len(),
        3,
        "every node refuses: budget spent"
    );
    // A study nobody approved is refused by the coordinator itself.
    let unapproved = federation
        .client(REQUESTER)
        .await
        .unwrap()
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest_with_budget("later", "HRESCH", &[("noisy", NOISY_COUNT)], 1.0),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id;
    assert!(run(&federation, &unapproved).await.is_err());
    federation.shutdown().await;
    telemetry.shutdown().unwrap();

    // Traces: each RunStudy is the root of a trace that holds a call per
    // node and, below each, the node's own request span and its stages.
    let spans = collector.spans();
    let roots: Vec<&SeenSpan> = spans
        .iter()
        .filter(|s| s.name == "ghx.v1.CoordinatorService/RunStudy")
        .collect();
    assert_eq!(roots.len(), 3, "three RunStudy requests");
    let first = roots
        .iter()
        .find(|root| {
            spans
                .iter()
                .any(|s| s.trace_id == root.trace_id && s.name == "release")
        })
        .expect("the answered query's trace");
    let trace: Vec<&SeenSpan> = spans
        .iter()
        .filter(|s| s.trace_id == first.trace_id)
        .collect();
    let calls: Vec<&&SeenSpan> = trace.iter().filter(|s| s.name == "node_call").collect();
    let called: BTreeSet<&str> = calls
        .iter()
        .map(|s| s.attributes["node"].as_str())
        .collect();
    assert_eq!(
        called,
        BTreeSet::from(["chonnam", "chosun", "christian"]),
        "one call per node"
    );
    let node_requests: Vec<&&SeenSpan> = trace
        .iter()
        .filter(|s| s.name == "ghx.v1.NodeService/RunAggregate")
        .collect();
    assert_eq!(
        node_requests.len(),
        3,
        "each node's request joined the trace"
    );
    for request in &node_requests {
        let parent = parent_of(&spans, request).expect("a node request has its parent");
        assert_eq!(parent.name, "node_call", "child of the coordinator's call");
        let stages: BTreeSet<&str> = trace
            .iter()
            .filter(|s| s.parent_span_id == request.span_id)
            .map(|s| s.name.as_str())
            .collect();
        for stage in [
            "gate",
            "consent",
            "engine",
            "differencing",
            "release",
            "audit",
        ] {
            assert!(stages.contains(stage), "{stage} missing from {stages:?}");
        }
        // The engine's members come from the cohort index (a coded
        // cohort), which loads from the store in the store's own span on
        // the context's first query (this one).
        let child = |parent: &SeenSpan, name: &str| {
            trace
                .iter()
                .find(|s| s.name == name && s.parent_span_id == parent.span_id)
                .copied()
        };
        let engine = child(request, "engine").unwrap();
        let index = child(engine, "cohort_index").expect("a cohort_index span below the engine");
        assert!(
            child(index, "store").is_some(),
            "a store span below the cohort index"
        );
    }
    for call in &calls {
        let mut up = parent_of(&spans, call).expect("a call has its parent");
        while up.parent_span_id.iter().any(|b| *b != 0) && !up.parent_span_id.is_empty() {
            up = parent_of(&spans, up).expect("an unbroken chain to the root");
        }
        assert_eq!(up.span_id, first.span_id, "calls descend from RunStudy");
    }
    // Nothing patient-level in what was exported.
    let ids: Vec<String> = ["chonnam", "chosun", "christian"]
        .iter()
        .flat_map(|node| {
            Export::read(&dir.path().join("data").join(node))
                .patients
                .into_keys()
        })
        .collect();
    assert_eq!(ids.len(), 900);
    for span in &spans {
        for value in span.attributes.values() {
            assert!(
                !ids.iter().any(|id| value.contains(id.as_str())),
                "span {} carries a patient id",
                span.name
            );
        }
    }

    // Metrics: decisions by kind, refusals by reason, latency.
    let requests: BTreeMap<(String, String), f64> = collector
        .points("ghx.node.requests")
        .into_iter()
        .map(|p| {
            (
                (
                    p.attributes["kind"].clone(),
                    p.attributes["decision"].clone(),
                ),
                p.value,
            )
        })
        .collect();
    assert_eq!(
        requests.get(&("aggregate".to_owned(), "answered".to_owned())),
        Some(&3.0)
    );
    assert_eq!(
        requests.get(&("aggregate".to_owned(), "refused".to_owned())),
        Some(&3.0)
    );
    let refusals: BTreeMap<(String, String), f64> = collector
        .points("ghx.refusals")
        .into_iter()
        .map(|p| {
            (
                (
                    p.attributes["service"].clone(),
                    p.attributes["reason"].clone(),
                ),
                p.value,
            )
        })
        .collect();
    assert_eq!(
        refusals.get(&("node".to_owned(), "budget".to_owned())),
        Some(&3.0),
        "{refusals:?}"
    );
    assert_eq!(
        refusals.get(&("coordinator".to_owned(), "study_state".to_owned())),
        Some(&1.0),
        "{refusals:?}"
    );
    let latency: f64 = collector
        .points("ghx.coordinator.query.duration")
        .iter()
        .map(|p| p.value)
        .sum();
    assert_eq!(latency, 3.0, "every RunStudy timed");
}

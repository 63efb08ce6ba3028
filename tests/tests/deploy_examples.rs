//! The example configurations under deploy/ load with the real loaders, so
//! what hospital IT copies from them is always valid.

use std::path::Path;

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(file)
}

#[test]
fn node_examples_load() {
    for id in ["chonnam", "chosun", "christian"] {
        let config = ghx_node::NodeConfig::load(&deploy(&format!("node-{id}.toml")))
            .unwrap_or_else(|e| panic!("node-{id}.toml: {e}"));
        assert_eq!(config.id, id);
        assert_eq!(config.min_cell_size, 10);
        // Christian caps an organisation lower than the default.
        let cap = if id == "christian" {
            2.0
        } else {
            ghx_node::config::DEFAULT_ORGANISATION_EPSILON
        };
        assert_eq!(config.max_epsilon_per_organisation, Some(cap));
        // Christian's network allows outbound connections only.
        assert_eq!(config.listen.is_none(), id == "christian");
        assert_eq!(config.outbound.is_some(), id == "christian");
        assert!(config.tls.renew_from.is_some());
        // Sums over all three hospitals, and only them.
        assert_eq!(config.secure_aggregation.min_participants, 3);
        assert_eq!(
            config.secure_aggregation.members,
            ["chonnam", "chosun", "christian"]
        );
    }
}

#[test]
fn coordinator_example_loads_with_all_three_hospitals() {
    let config = ghx_coordinator::CoordinatorConfig::load(&deploy("coordinator.toml")).unwrap();
    let ids: Vec<_> = config.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["chonnam", "chosun", "christian"]);
    assert!(config.tunnel_listen.is_some());
    assert_eq!(config.nodes[2].endpoint, ghx_coordinator::fanout::OUTBOUND);
    assert!(config.telemetry.otlp_endpoint.is_some());
    assert_eq!(config.issuer.as_ref().unwrap().node_valid_for_hours, 168);

    // A node that dials in needs a port to dial.
    let text = std::fs::read_to_string(deploy("coordinator.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, text.replace("tunnel_listen", "# tunnel_listen")).unwrap();
    let err = ghx_coordinator::CoordinatorConfig::load(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tunnel_listen` must be set: node `christian` connects outbound"),
        "{err}"
    );
}

#[test]
fn example_query_is_valid() {
    let json = std::fs::read(deploy("e11-by-sex-and-age.json")).unwrap();
    ghx_study::query::QuerySpec::parse(&json).unwrap();
}

#[test]
fn statistics_example_manifest_is_valid_and_declares_what_it_reads() {
    let json = std::fs::read(deploy("study-e11-statistics.json")).unwrap();
    let manifest = ghx_study::manifest::StudyManifest::parse(&json).unwrap();
    let kinds: Vec<&str> = manifest.queries.iter().map(|q| q.query.kind()).collect();
    assert_eq!(kinds, ["summary", "histogram", "count", "rate"]);
    // Dropping a declared code the queries read makes it invalid.
    let text = String::from_utf8(json).unwrap().replace(
        r#"{"system": "http://www.whocc.no/atc", "code": "A10BA02"}"#,
        r#"{"system": "http://www.whocc.no/atc", "code": "A10BB01"}"#,
    );
    let err = ghx_study::manifest::StudyManifest::parse(text.as_bytes()).unwrap_err();
    assert!(
        err.to_string().contains("http://www.whocc.no/atc|A10BA02"),
        "{err}"
    );
}

fn deploy_file(dir: &str, file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir)
        .join(file)
}

#[test]
fn compose_and_kubernetes_configurations_load() {
    for id in ["chonnam", "chosun", "christian"] {
        let config =
            ghx_node::NodeConfig::load(&deploy_file("compose", &format!("node-{id}.toml")))
                .unwrap_or_else(|e| panic!("compose/node-{id}.toml: {e}"));
        assert_eq!(config.id, id);
        assert!(config.database_url.starts_with("postgres://"));
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://otel-collector:4317")
        );
        // Christian runs outbound-only in the compose federation too.
        assert_eq!(config.outbound.is_some(), id == "christian");
        assert_eq!(config.listen.is_none(), id == "christian");
    }
    for dir in ["compose", "k8s"] {
        let config =
            ghx_coordinator::CoordinatorConfig::load(&deploy_file(dir, "coordinator.toml"))
                .unwrap_or_else(|e| panic!("{dir}/coordinator.toml: {e}"));
        let outbound: Vec<_> = config
            .nodes
            .iter()
            .filter(|n| n.endpoint == ghx_coordinator::fanout::OUTBOUND)
            .map(|n| n.id.as_str())
            .collect();
        assert_eq!(outbound, ["christian"], "{dir}");
        assert!(config.tunnel_listen.is_some(), "{dir}");
    }
}

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
        let cap = (id == "christian").then_some(2.0);
        assert_eq!(config.max_epsilon_per_organisation, cap);
    }
}

#[test]
fn coordinator_example_loads_with_all_three_hospitals() {
    let config = ghx_coordinator::CoordinatorConfig::load(&deploy("coordinator.toml")).unwrap();
    let ids: Vec<_> = config.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["chonnam", "chosun", "christian"]);
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

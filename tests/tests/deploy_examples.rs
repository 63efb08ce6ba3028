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

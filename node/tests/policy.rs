//! The shipped access policies as a decision table, and the errors a privacy
//! officer sees for broken policy files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use expect_test::expect;
use ghx_node::policy::{AccessRequest, Action, PolicyDir};

fn shipped(hospital: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(hospital)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A startup counting type 2 diabetes by sex and age band for research.
fn base(node: &str) -> AccessRequest {
    AccessRequest {
        requester: "analyst@startup".to_owned(),
        organisation: "Gwangju Health Startup".to_owned(),
        role: "requester".to_owned(),
        action: Action::Count,
        node: node.to_owned(),
        study: "study-0001".to_owned(),
        purpose: "HRESCH".to_owned(),
        resource_types: set(&["Patient", "Condition"]),
        condition_codes: set(&["E11*"]),
        observation_codes: set(&[]),
        sensitive_categories: set(&[]),
        group_by: set(&["sex", "age_band"]),
        min_cell_size: 10,
        epsilon: "0.0".to_owned(),
    }
}

#[test]
fn shipped_policies_decision_table() {
    type Change = fn(&mut AccessRequest);
    let cases: &[(&str, Change)] = &[
        ("startup counts E11 for research", |_| {}),
        ("purpose: marketing", |r| r.purpose = "HMARKT".into()),
        ("purpose: public health", |r| r.purpose = "PUBHLTH".into()),
        ("organisation not registered", |r| {
            r.organisation = "Unknown Analytics".into()
        }),
        ("startup selects on F32 (mental health)", |r| {
            r.condition_codes = set(&["F32"]);
            r.sensitive_categories = set(&["mental-health"]);
        }),
        ("academic selects on a rare disease", |r| {
            r.organisation = "Chonnam National University Medical School".into();
            r.condition_codes = set(&["E752*"]);
            r.sensitive_categories = set(&["rare-disease"]);
        }),
        ("minimum cell size 5", |r| r.min_cell_size = 5),
        ("epsilon 0.8", |r| r.epsilon = "0.8".into()),
        ("reads Consent resources", |r| {
            r.resource_types = set(&["Patient", "Consent"])
        }),
        ("startup training", |r| r.action = Action::Training),
        ("academic training", |r| {
            r.organisation = "Chonnam National University Medical School".into();
            r.action = Action::Training;
        }),
        ("startup sex x age band x diagnosis", |r| {
            r.group_by = set(&["sex", "age_band", "diagnosis"])
        }),
    ];
    let mut table = String::new();
    for hospital in ["chonnam", "chosun", "christian"] {
        let policy = PolicyDir::load(&shipped(hospital)).unwrap();
        for (name, change) in cases {
            let mut request = base(hospital);
            change(&mut request);
            let decision = policy.authorize(&request).unwrap();
            assert!(decision.errors.is_empty(), "{name}: {:?}", decision.errors);
            let ids: Vec<&str> = decision.reasons.iter().map(|r| r.id.as_str()).collect();
            table.push_str(&format!(
                "{hospital:<10} {name:<42} {} {}\n",
                if decision.allowed { "ALLOW" } else { "DENY " },
                if ids.is_empty() {
                    "(no permit matches)".to_owned()
                } else {
                    ids.join(", ")
                }
            ));
        }
    }
    expect![[r#"
        chonnam    startup counts E11 for research            ALLOW research-aggregates
        chonnam    purpose: marketing                         DENY  no-marketing
        chonnam    purpose: public health                     ALLOW research-aggregates
        chonnam    organisation not registered                DENY  (no permit matches)
        chonnam    startup selects on F32 (mental health)     DENY  no-sensitive-selection-by-industry
        chonnam    academic selects on a rare disease         ALLOW research-aggregates
        chonnam    minimum cell size 5                        DENY  (no permit matches)
        chonnam    epsilon 0.8                                ALLOW research-aggregates
        chonnam    reads Consent resources                    DENY  (no permit matches)
        chonnam    startup training                           DENY  (no permit matches)
        chonnam    academic training                          ALLOW academic-training
        chonnam    startup sex x age band x diagnosis         ALLOW research-aggregates
        chosun     startup counts E11 for research            ALLOW research-aggregates
        chosun     purpose: marketing                         DENY  no-marketing
        chosun     purpose: public health                     ALLOW research-aggregates
        chosun     organisation not registered                DENY  (no permit matches)
        chosun     startup selects on F32 (mental health)     DENY  no-sensitive-selection-by-industry
        chosun     academic selects on a rare disease         ALLOW research-aggregates
        chosun     minimum cell size 5                        DENY  (no permit matches)
        chosun     epsilon 0.8                                ALLOW research-aggregates
        chosun     reads Consent resources                    DENY  (no permit matches)
        chosun     startup training                           DENY  (no permit matches)
        chosun     academic training                          ALLOW academic-training
        chosun     startup sex x age band x diagnosis         DENY  no-three-way-tables-for-industry
        christian  startup counts E11 for research            ALLOW research-aggregates
        christian  purpose: marketing                         DENY  no-marketing
        christian  purpose: public health                     DENY  (no permit matches)
        christian  organisation not registered                DENY  (no permit matches)
        christian  startup selects on F32 (mental health)     DENY  no-sensitive-selection-by-industry
        christian  academic selects on a rare disease         DENY  no-rare-disease-queries
        christian  minimum cell size 5                        DENY  (no permit matches)
        christian  epsilon 0.8                                DENY  (no permit matches)
        christian  reads Consent resources                    DENY  (no permit matches)
        christian  startup training                           DENY  (no permit matches)
        christian  academic training                          ALLOW academic-training
        christian  startup sex x age band x diagnosis         ALLOW research-aggregates
    "#]].assert_eq(&table);
}

fn broken(access: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    for file in ["entities.json", "consent.toml"] {
        std::fs::copy(shipped("chosun").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(dir.path().join("access.cedar"), access).unwrap();
    let err = PolicyDir::load(dir.path()).unwrap_err().to_string();
    err.replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn broken_policies_are_refused_with_the_place_and_the_problem() {
    let syntax =
        broken("@id(\"a\")\npermit (principal, action, resource)\nwhen { context.purpose == };\n");
    assert!(
        syntax.starts_with("DIR/access.cedar: line 3, column "),
        "{syntax}"
    );

    let typo = broken(
        "@id(\"typo\")\npermit (principal, action == Ghx::Action::\"count\", resource)\nwhen { context.purpos == \"HRESCH\" };\n",
    );
    assert!(
        typo.starts_with("DIR/access.cedar: policy `typo` does not match the schema: line 3"),
        "{typo}"
    );
    assert!(typo.contains("purpos"), "{typo}");

    let unnamed = broken("permit (principal, action, resource);\n");
    assert!(unnamed.contains("every rule needs an @id"), "{unnamed}");

    let dir = tempfile::tempdir().unwrap();
    for file in ["entities.json", "access.cedar"] {
        std::fs::copy(shipped("chosun").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("consent.toml"),
        "default = \"opt-in\"\n[sensitive]\nrare_disease_codes = [\"rare!\"]\n",
    )
    .unwrap();
    let err = PolicyDir::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("`rare!` is not a KCD-8 code"), "{err}");
    std::fs::write(dir.path().join("consent.toml"), "default = \"maybe\"\n").unwrap();
    let err = PolicyDir::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("unknown variant `maybe`"), "{err}");
}

//! Running the node's engine the way its API does: consent decisions
//! prepared for a request first, then the count over them (in SQL, and
//! from the cohort index, which must agree).

use ghx_node::Store;
use ghx_node::consent::eligibility::{Eligibility, Summary};
use ghx_node::consent::{ConsentRules, DefaultConsent, SensitiveCodes};
use ghx_node::gate;
use ghx_node::testing::CohortIndex;
use ghx_node::testing::{self as engine, RawCell};
use ghx_study::query::QuerySpec;

/// Opt-in rules with no rare-disease list.
pub fn opt_in() -> ConsentRules {
    ConsentRules {
        default: DefaultConsent::OptIn,
        sensitive: SensitiveCodes::default(),
    }
}

/// Raw counts of `spec` for purpose HRESCH under `rules`, now, with the
/// consent summary.
pub fn count(store: &Store, spec: &QuerySpec, rules: ConsentRules) -> (Vec<RawCell>, Summary) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let eligibility = Eligibility::new(rules);
    let request = gate::consent_request("HRESCH", spec, now);
    let prepared = eligibility
        .prepare(store, &request)
        .expect("consent decisions");
    let cells = engine::count(
        store,
        spec,
        &prepared.context,
        &eligibility.rules().sensitive,
    )
    .expect("count");
    // The node answers from its cohort index where that covers the query:
    // its members must count to the same cells.
    let members = CohortIndex::new()
        .members(
            store,
            spec,
            &prepared.context,
            &eligibility.rules().sensitive,
        )
        .expect("members from the cohort index");
    let mut indexed = engine::analyse(spec, &members, false).cells;
    let mut sql = cells.clone();
    indexed.sort_by(|a, b| a.key.cmp(&b.key));
    sql.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(indexed, sql, "the cohort index and the SQL disagree");
    (cells, prepared.summary)
}

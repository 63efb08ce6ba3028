//! The gate: decides whether a request may reach the engine at all, and
//! under which consent context.
//!
//! A request passes only when the caller's certificate says it is the
//! coordinator, the capability verifies against the coordinator's pinned key
//! for this node and exactly these query bytes, the query is valid, and the
//! hospital's access policies permit the requester's organisation this kind
//! of work, for this purpose, on these data. Everything the policy sees comes
//! from the signed capability and the query, never from unsigned input.

use std::collections::BTreeSet;

use ghx_pki::{PeerIdentity, Role};
use ghx_study::query::{CodeMatch, QuerySpec};
use ghx_study::{capability, query};

use crate::consent::{ConsentRequest, SensitiveCodes};
use crate::policy::{self, AccessDecision, AccessRequest, Action, PolicyDir};
use crate::terminology;

/// Why the gate refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("caller `{name}` has role {role}; only the coordinator may run queries")]
    NotCoordinator { name: String, role: Role },
    #[error(transparent)]
    Capability(#[from] capability::Error),
    #[error(transparent)]
    Query(#[from] query::Error),
    #[error("the access policy of {node} refuses this request: {}", decision.summary())]
    Forbidden {
        node: String,
        decision: AccessDecision,
    },
    #[error("access policy: {0}")]
    Policy(#[from] policy::Error),
}

/// What the gate let through.
#[derive(Debug)]
pub struct Admitted {
    pub claims: capability::Claims,
    pub spec: QuerySpec,
    pub access: AccessDecision,
    /// What consent must decide for this request.
    pub consent: ConsentRequest,
}

/// The node facts a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct NodeFacts<'a> {
    pub node_id: &'a str,
    pub min_cell_size: u32,
    /// Unix seconds the request is evaluated at.
    pub now: i64,
}

/// Checks caller, capability, query and access policy, in that order.
pub fn admit(
    verifier: &capability::Verifier,
    policy: &PolicyDir,
    node: NodeFacts<'_>,
    caller: &PeerIdentity,
    token: &str,
    query_json: &[u8],
) -> Result<Admitted, Error> {
    if caller.role != Role::Coordinator {
        return Err(Error::NotCoordinator {
            name: caller.name.clone(),
            role: caller.role,
        });
    }
    let claims = verifier.verify(token, query_json)?;
    let spec = QuerySpec::parse(query_json)?;
    let request = access_request(&claims, &spec, node, &policy.consent.sensitive);
    let access = policy.authorize(&request)?;
    if !access.allowed {
        return Err(Error::Forbidden {
            node: node.node_id.to_owned(),
            decision: access,
        });
    }
    let consent = consent_request(&claims.purpose, &spec, node.now);
    Ok(Admitted {
        claims,
        spec,
        access,
        consent,
    })
}

/// Resource types a query reads.
fn resource_types(spec: &QuerySpec) -> BTreeSet<String> {
    let mut types = BTreeSet::from(["Patient".to_owned()]);
    if !spec.cohort.conditions.is_empty() {
        types.insert("Condition".to_owned());
    }
    if !spec.cohort.observations.is_empty() {
        types.insert("Observation".to_owned());
    }
    types
}

/// The access request for a count query under a capability: what the
/// hospital's Cedar policies are asked.
pub fn access_request(
    claims: &capability::Claims,
    spec: &QuerySpec,
    node: NodeFacts<'_>,
    sensitive: &SensitiveCodes,
) -> AccessRequest {
    let mut condition_codes = BTreeSet::new();
    let mut sensitive_categories = BTreeSet::new();
    for c in &spec.cohort.conditions {
        let system = terminology::canonical_system(&c.system);
        let code = terminology::normalize_code(system, &c.code).into_owned();
        let prefix = c.matching == CodeMatch::Prefix;
        for category in sensitive.categories_touched(system, &code, prefix) {
            sensitive_categories.insert(category.code().to_owned());
        }
        // A prefix is shown with a trailing '*' so a rule can tell E11 from E11*.
        condition_codes.insert(if prefix { format!("{code}*") } else { code });
    }
    let observation_codes = spec
        .cohort
        .observations
        .iter()
        .map(|o| {
            let system = terminology::canonical_system(&o.system);
            terminology::normalize_code(system, &o.code).into_owned()
        })
        .collect();
    AccessRequest {
        requester: claims.requester.clone(),
        organisation: claims.org.clone(),
        role: "requester".to_owned(),
        action: Action::Count,
        node: node.node_id.to_owned(),
        study: claims.sub.clone(),
        purpose: claims.purpose.clone(),
        resource_types: resource_types(spec),
        condition_codes,
        observation_codes,
        sensitive_categories,
        group_by: spec
            .dimensions()
            .iter()
            .map(|d| d.name().to_owned())
            .collect(),
        min_cell_size: node.min_cell_size,
        // Counts are released exactly (with suppression), not noised.
        epsilon: "0.0".to_owned(),
    }
}

/// What consent is asked for a query. Time is taken to the hour so that
/// requests within the same hour share their consent decisions.
pub fn consent_request(purpose: &str, spec: &QuerySpec, now: i64) -> ConsentRequest {
    let mut codes: Vec<(String, String, bool)> = spec
        .cohort
        .conditions
        .iter()
        .map(|c| {
            let system = terminology::canonical_system(&c.system);
            (
                system.to_owned(),
                terminology::normalize_code(system, &c.code).into_owned(),
                c.matching == CodeMatch::Prefix,
            )
        })
        .chain(spec.cohort.observations.iter().map(|o| {
            let system = terminology::canonical_system(&o.system);
            (
                system.to_owned(),
                terminology::normalize_code(system, &o.code).into_owned(),
                false,
            )
        }))
        .collect();
    codes.sort();
    codes.dedup();
    ConsentRequest {
        purpose: purpose.to_owned(),
        classes: resource_types(spec).into_iter().collect(),
        codes,
        at: now - now.rem_euclid(3600),
    }
}

//! The gate: decides whether a request may reach the engine at all, and
//! under which consent context.
//!
//! A request passes only when the caller's certificate says it is the
//! coordinator; the capability verifies against the coordinator's pinned key
//! for this node and exactly these query bytes, has not been used before and
//! belongs to a study that was not revoked; the manifest it was issued for is
//! the one sent (by digest), is valid today, holds this exact query and
//! declares everything the query reads; and the hospital's access policies
//! permit the requester's organisation this kind of work, for this purpose,
//! on these data, with the manifest's cell size and budget. Everything the
//! policy sees comes from the signed capability, the manifest it binds and
//! the query, never from unsigned input. The gate reaches the store only
//! through [`CapabilityLedger`], for replays and revocations.

use crate::classify::{Classify, Code};
use std::collections::BTreeSet;

use ghx_pki::{PeerIdentity, Role};
use ghx_study::manifest::{self, StudyManifest};
use ghx_study::query::{Analysis, CodeMatch, QuerySpec};
use ghx_study::training::TrainingSpec;
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
    #[error("capability {jti} was already used; capabilities are single-use (replay refused)")]
    Replayed { jti: String },
    #[error("study {study} was revoked by the steering committee")]
    Revoked { study: String },
    #[error("the manifest sent is not the one the capability was issued for (digest mismatch)")]
    ManifestMismatch,
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error("the capability's {field} does not match the manifest's")]
    ClaimsDisagree { field: &'static str },
    #[error("capability ledger: {0}")]
    Ledger(String),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Query(_) => Code::InvalidArgument,
            Error::Policy(_) | Error::Ledger(_) => Code::Internal,
            Error::NotCoordinator { .. }
            | Error::Capability(_)
            | Error::Forbidden { .. }
            | Error::Replayed { .. }
            | Error::Revoked { .. }
            | Error::ManifestMismatch
            | Error::Manifest(_)
            | Error::ClaimsDisagree { .. } => Code::PermissionDenied,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::NotCoordinator { .. } => "not_coordinator",
            Error::Capability(_) => "capability",
            Error::Forbidden { .. } => "policy",
            Error::Query(_) => "query",
            Error::Replayed { .. } => "replayed",
            Error::Revoked { .. } => "revoked",
            Error::ManifestMismatch | Error::Manifest(_) | Error::ClaimsDisagree { .. } => {
                "manifest"
            }
            Error::Policy(_) | Error::Ledger(_) => "internal",
        }
    }
}

/// What the gate must remember across requests: capabilities already used
/// and studies revoked.
pub trait CapabilityLedger {
    /// Records a capability's use; false if it was used before.
    fn first_use(&self, jti: &str, study: &str, expires_at: i64) -> Result<bool, String>;
    fn is_revoked(&self, study: &str) -> Result<bool, String>;
}

impl CapabilityLedger for crate::store::Store {
    fn first_use(&self, jti: &str, study: &str, expires_at: i64) -> Result<bool, String> {
        self.record_capability_use(jti, study, expires_at)
            .map_err(|e| e.to_string())
    }

    fn is_revoked(&self, study: &str) -> Result<bool, String> {
        crate::store::Store::is_revoked(self, study).map_err(|e| e.to_string())
    }
}

/// One request as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub caller: &'a PeerIdentity,
    pub token: &'a str,
    pub query_json: &'a [u8],
    pub manifest_json: &'a [u8],
}

/// What the gate let through.
#[derive(Debug)]
pub struct Admitted {
    pub claims: capability::Claims,
    pub manifest: StudyManifest,
    /// The manifest's name of the query.
    pub query_name: String,
    pub spec: QuerySpec,
    /// The larger of the node's and the manifest's minimum cell size.
    pub min_cell_size: u32,
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

impl NodeFacts<'_> {
    fn today(&self) -> time::Date {
        time::OffsetDateTime::from_unix_timestamp(self.now)
            .map(|t| t.date())
            .unwrap_or(time::Date::MIN)
    }
}

/// Checks caller, capability, manifest, query and access policy, in that
/// order; the first failure refuses the request.
pub fn admit(
    verifier: &capability::Verifier,
    ledger: &dyn CapabilityLedger,
    policy: &PolicyDir,
    node: NodeFacts<'_>,
    request: Request<'_>,
) -> Result<Admitted, Error> {
    let (claims, manifest, facts) = verified(verifier, ledger, node, request)?;
    let min_cell_size = facts.min_cell_size;
    let named = manifest.query_for(request.query_json)?;
    let query_name = named.name.clone();
    let spec = QuerySpec::parse(request.query_json)?;
    let access = access_request(
        &claims,
        &spec,
        manifest.privacy_budget,
        facts,
        &policy.consent.sensitive,
    );
    let decision = policy.authorize(&access)?;
    if !decision.allowed {
        return Err(Error::Forbidden {
            node: node.node_id.to_owned(),
            decision,
        });
    }
    let consent = consent_request(&claims.purpose, &spec, node.now);
    Ok(Admitted {
        claims,
        manifest,
        query_name,
        spec,
        min_cell_size,
        access: decision,
        consent,
    })
}

/// What the gate let through for a training or evaluation round.
#[derive(Debug)]
pub struct AdmittedTraining {
    pub claims: capability::Claims,
    pub manifest: StudyManifest,
    pub training: TrainingSpec,
    /// The larger of the node's and the manifest's minimum cell size.
    pub min_cell_size: u32,
    pub access: AccessDecision,
    pub consent: ConsentRequest,
}

/// Admits a round of an approved training: the same checks as [`admit`],
/// with the capability bound to the canonical training JSON (sent as
/// `request.query_json`) and the access policy asked for `action`
/// (training or evaluation) over everything the training reads.
pub fn admit_training(
    verifier: &capability::Verifier,
    ledger: &dyn CapabilityLedger,
    policy: &PolicyDir,
    node: NodeFacts<'_>,
    request: Request<'_>,
    action: Action,
) -> Result<AdmittedTraining, Error> {
    let (claims, manifest, facts) = verified(verifier, ledger, node, request)?;
    let min_cell_size = facts.min_cell_size;
    let training = manifest.training_for(request.query_json)?.clone();
    let access = training_access(
        &claims,
        &training,
        &manifest,
        facts,
        &policy.consent.sensitive,
        action,
    );
    let decision = policy.authorize(&access)?;
    if !decision.allowed {
        return Err(Error::Forbidden {
            node: node.node_id.to_owned(),
            decision,
        });
    }
    let consent = training_consent(&claims.purpose, &training, node.now);
    Ok(AdmittedTraining {
        claims,
        manifest,
        training,
        min_cell_size,
        access: decision,
        consent,
    })
}

/// The access request for a round of `training` (`action`: training or
/// evaluation): one request over everything its queries read.
fn training_access(
    claims: &capability::Claims,
    training: &TrainingSpec,
    manifest: &StudyManifest,
    facts: NodeFacts<'_>,
    sensitive: &SensitiveCodes,
    action: Action,
) -> AccessRequest {
    let mut access: Option<AccessRequest> = None;
    for q in &training.queries() {
        let one = access_request(claims, q, manifest.privacy_budget, facts, sensitive);
        match &mut access {
            None => access = Some(one),
            Some(all) => {
                all.resource_types.extend(one.resource_types);
                all.condition_codes.extend(one.condition_codes);
                all.observation_codes.extend(one.observation_codes);
                all.sensitive_categories.extend(one.sensitive_categories);
            }
        }
    }
    let mut access = access.expect("a training reads at least its label");
    access.action = action;
    access.group_by.clear();
    access
}

/// One query or training of a manifest as a node's policies decide it.
#[derive(Debug)]
pub struct Checked {
    /// The query's or training's name in the manifest.
    pub name: String,
    pub request: AccessRequest,
    pub decision: AccessDecision,
}

/// What `policy` decides at `node` for every query and training of
/// `manifest`, asked exactly as [`admit`] and [`admit_training`] ask (the
/// claims the coordinator would sign, the larger of the node's and the
/// manifest's cell size): `ghx policy check`. `action`, if given, replaces
/// each query's own (count or statistics); trainings are asked as
/// training.
pub fn check_manifest(
    policy: &PolicyDir,
    manifest: &StudyManifest,
    node: NodeFacts<'_>,
    action: Option<Action>,
) -> Result<Vec<Checked>, Error> {
    let facts = with_manifest_cell_size(node, manifest);
    let claims_for = |json: &[u8]| {
        capability::claims_for(
            manifest,
            "policy-check",
            vec![node.node_id.to_owned()],
            json,
            time::Duration::minutes(5),
        )
    };
    let mut checked = Vec::new();
    for named in &manifest.queries {
        let claims = claims_for(&named.query.canonical_json());
        let mut request = access_request(
            &claims,
            &named.query,
            manifest.privacy_budget,
            facts,
            &policy.consent.sensitive,
        );
        if let Some(action) = action {
            request.action = action;
        }
        let decision = policy.authorize(&request)?;
        checked.push(Checked {
            name: named.name.clone(),
            request,
            decision,
        });
    }
    for training in &manifest.trainings {
        let claims = claims_for(&training.canonical_json());
        let request = training_access(
            &claims,
            training,
            manifest,
            facts,
            &policy.consent.sensitive,
            Action::Training,
        );
        let decision = policy.authorize(&request)?;
        checked.push(Checked {
            name: training.name.clone(),
            request,
            decision,
        });
    }
    Ok(checked)
}

/// The node facts a manifest is decided under: the larger of the node's
/// and the manifest's cell size holds.
fn with_manifest_cell_size<'a>(node: NodeFacts<'a>, manifest: &StudyManifest) -> NodeFacts<'a> {
    NodeFacts {
        min_cell_size: node
            .min_cell_size
            .max(manifest.min_cell_size.for_node(node.node_id)),
        ..node
    }
}

/// The checks every admission shares: the caller is the coordinator; the
/// capability verifies for these bytes, is unrevoked and used for the first
/// time; and the manifest is the one it binds, valid today, with the same
/// purpose and organisation. Returns the node facts with the cell size
/// that applies (the larger of the node's and the manifest's).
fn verified<'a>(
    verifier: &capability::Verifier,
    ledger: &dyn CapabilityLedger,
    node: NodeFacts<'a>,
    request: Request<'_>,
) -> Result<(capability::Claims, StudyManifest, NodeFacts<'a>), Error> {
    let caller = request.caller;
    if caller.role != Role::Coordinator {
        return Err(Error::NotCoordinator {
            name: caller.name.clone(),
            role: caller.role,
        });
    }
    let claims = verifier.verify(request.token, request.query_json)?;
    if ledger.is_revoked(&claims.sub).map_err(Error::Ledger)? {
        return Err(Error::Revoked {
            study: claims.sub.clone(),
        });
    }
    // Single use, recorded before anything else can refuse it: a refused
    // capability cannot be retried either.
    if !ledger
        .first_use(&claims.jti, &claims.sub, claims.exp)
        .map_err(Error::Ledger)?
    {
        return Err(Error::Replayed {
            jti: claims.jti.clone(),
        });
    }
    if query::digest(request.manifest_json) != claims.manifest_sha256 {
        return Err(Error::ManifestMismatch);
    }
    let manifest = StudyManifest::parse(request.manifest_json)?;
    manifest.check_valid_on(node.today())?;
    manifest.check_validity_span()?;
    if claims.purpose != manifest.purpose {
        return Err(Error::ClaimsDisagree { field: "purpose" });
    }
    if claims.org != manifest.requester.organisation {
        return Err(Error::ClaimsDisagree {
            field: "organisation",
        });
    }
    let facts = with_manifest_cell_size(node, &manifest);
    Ok((claims, manifest, facts))
}

/// The access request for an aggregate query under a capability: what the
/// hospital's Cedar policies are asked. The action is `count` for counts and
/// `statistics` for summaries, histograms and rates; `privacy_budget` is the
/// study's epsilon (from its manifest).
pub fn access_request(
    claims: &capability::Claims,
    spec: &QuerySpec,
    privacy_budget: f64,
    node: NodeFacts<'_>,
    sensitive: &SensitiveCodes,
) -> AccessRequest {
    let mut condition_codes = BTreeSet::new();
    let mut sensitive_categories = BTreeSet::new();
    let read = spec.codes_read();
    for c in read.iter().filter(|r| r.resource_type == "Condition") {
        let system = terminology::canonical_system(c.system);
        let code = terminology::normalize_code(system, c.code).into_owned();
        let prefix = c.matching == CodeMatch::Prefix;
        for category in sensitive.categories_touched(system, &code, prefix) {
            sensitive_categories.insert(category.code().to_owned());
        }
        // A prefix is shown with a trailing '*' so a rule can tell E11 from E11*.
        condition_codes.insert(if prefix { format!("{code}*") } else { code });
    }
    // Prescriptions classify too: an antiretroviral says HIV.
    for m in read
        .iter()
        .filter(|r| r.resource_type == "MedicationRequest")
    {
        let system = terminology::canonical_system(m.system);
        let prefix = m.matching == CodeMatch::Prefix;
        for category in sensitive.medication_categories_touched(system, m.code, prefix) {
            sensitive_categories.insert(category.code().to_owned());
        }
    }
    // So do laboratory tests that say a category by being done.
    let mut observation_codes = BTreeSet::new();
    for o in read.iter().filter(|r| r.resource_type == "Observation") {
        let system = terminology::canonical_system(o.system);
        let code = terminology::normalize_code(system, o.code).into_owned();
        for category in sensitive.observation_categories_touched(system, &code) {
            sensitive_categories.insert(category.code().to_owned());
        }
        observation_codes.insert(code);
    }
    AccessRequest {
        requester: claims.requester.clone(),
        organisation: claims.org.clone(),
        role: "requester".to_owned(),
        action: match spec.analysis {
            Analysis::Count { .. } => Action::Count,
            _ => Action::Statistics,
        },
        node: node.node_id.to_owned(),
        study: claims.sub.clone(),
        purpose: claims.purpose.clone(),
        resource_types: spec.resource_types(),
        condition_codes,
        observation_codes,
        sensitive_categories,
        group_by: spec
            .dimensions()
            .iter()
            .map(|d| d.name().to_owned())
            .collect(),
        min_cell_size: node.min_cell_size,
        epsilon: format!("{privacy_budget:.4}"),
    }
}

/// What consent is asked for a training: everything its feature and
/// label queries read.
pub fn training_consent(purpose: &str, training: &TrainingSpec, now: i64) -> ConsentRequest {
    let mut consent: Option<ConsentRequest> = None;
    for q in &training.queries() {
        let one = consent_request(purpose, q, now);
        match &mut consent {
            None => consent = Some(one),
            Some(all) => {
                all.classes.extend(one.classes);
                all.codes.extend(one.codes);
            }
        }
    }
    let mut consent = consent.expect("a training reads at least its label");
    consent.classes.sort();
    consent.classes.dedup();
    consent.codes.sort();
    consent.codes.dedup();
    consent
}

/// What consent is asked for a query. It is decided for the whole hour
/// `now` falls in, so that requests within the same hour share their consent
/// decisions: a permit must hold for all of it, a deny for any second of it
/// ([`crate::consent`]).
pub fn consent_request(purpose: &str, spec: &QuerySpec, now: i64) -> ConsentRequest {
    let mut codes: Vec<(String, String, bool)> = spec
        .codes_read()
        .into_iter()
        .map(|c| {
            let system = terminology::canonical_system(c.system);
            (
                system.to_owned(),
                terminology::normalize_code(system, c.code).into_owned(),
                c.matching == CodeMatch::Prefix,
            )
        })
        .collect();
    codes.sort();
    codes.dedup();
    ConsentRequest {
        recipient: None,
        purpose: purpose.to_owned(),
        classes: spec.resource_types().into_iter().collect(),
        codes,
        at: now - now.rem_euclid(3600),
        last: now - now.rem_euclid(3600) + 3599,
    }
}

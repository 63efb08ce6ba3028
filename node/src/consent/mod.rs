//! Patient consent: what each patient's FHIR Consent resources allow, and
//! which patients a request may therefore count.
//!
//! Import turns every Consent into a [`ConsentRecord`] (its status, scope,
//! date and provision tree, normalised) kept beside the resource; queries
//! never read the resource itself. [`evaluate`] decides, for one patient and
//! one request (purpose, resource types, codes, time), whether the patient
//! takes part and which sensitive categories of their data may be used.
//! [`eligibility`] materialises that decision for every patient in a table
//! the engine's SQL joins, rebuilt whenever consents or patients change.
//!
//! Semantics (FHIR R4 Consent, conservative where FHIR leaves room):
//! - Only scopes `research` and `patient-privacy` count. Per scope, the most
//!   recent Consent that is active, inactive or rejected is the patient's
//!   current word; an inactive one is a withdrawal, a rejected one a refusal.
//!   A Consent's time is its dateTime, else its meta.lastUpdated, else when
//!   it was imported if it restricts (a withdrawal, refusal or deny) and
//!   the beginning of time if it permits. Consents of equal time are each
//!   decided and the most restrictive outcome stands, whatever order the
//!   records were loaded in.
//! - The root provision's type is the base rule; nested provisions are
//!   exceptions to their parent and apply only where the parent applies. An
//!   applicable nested deny beats an applicable nested permit.
//! - A provision applies when its period contains the request time and its
//!   purposes, classes (resource types) and codes, when present, cover the
//!   request. A request is decided for a window of time at once (the hour
//!   its decisions are shared over): a permit applies only if its period
//!   holds the whole window, a deny if its period touches any of it. A
//!   permit naming codes covers a request only if every code the request
//!   reads in those systems lies within one of them (a permit for E11 does
//!   not cover a request for every E1*); a deny naming codes applies to a
//!   request that touches any of them. A permit restricted by something ghx does not evaluate (actor,
//!   action, data, dataPeriod) never applies; a deny so restricted always
//!   does. So an unsupported clause can only narrow what is counted.
//! - A research Consent that does not cover the request excludes the
//!   patient; a patient-privacy Consent that does not cover it has no say.
//!   With no Consent in either scope the hospital's default (opt-in: not
//!   counted; opt-out: counted) applies.
//! - Sensitive categories are permitted only by a provision that names them.

pub mod eligibility;
pub mod sensitive;

use std::collections::BTreeMap;

use fhir_model::DateTime;
use fhir_model::r4b::resources::{Consent, ConsentProvision};
use fhir_model::r4b::types::Period;
use serde::{Deserialize, Serialize};

use crate::terminology;
pub use sensitive::{Category, CategorySet, SensitiveCodes};

/// What the hospital does for a patient with no research or privacy Consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultConsent {
    /// Not counted until the patient consents.
    OptIn,
    /// Counted unless the patient objects.
    OptOut,
}

impl std::fmt::Display for DefaultConsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefaultConsent::OptIn => "opt-in",
            DefaultConsent::OptOut => "opt-out",
        })
    }
}

/// The hospital's consent rules, from its policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRules {
    pub default: DefaultConsent,
    pub sensitive: SensitiveCodes,
}

/// Permit or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Permit,
    Deny,
}

/// One provision, normalised; children are exceptions to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provision {
    /// `None` on a nested provision means "same as the parent".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    /// Unix seconds; the provision applies from `from` until `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// HL7 v3 ActReason codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
    /// Resource type names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// (canonical system, normalised code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<(String, String)>,
    /// Sensitive categories named by security label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<Category>,
    /// Registered recipients (`ghx_exchange::RECIPIENT_SYSTEM` identifiers
    /// of its actors) the provision is about: it applies to disclosure to
    /// them through the exchange, and to nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    /// Restricted by a clause ghx does not evaluate (an actor that is not
    /// a registered recipient, action, data, dataPeriod).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsupported: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provisions: Vec<Provision>,
}

/// What one Consent says, as import keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRecord {
    pub scope: String,
    pub status: String,
    /// Unix seconds of Consent.dateTime, else of meta.lastUpdated, else of
    /// the import that stored it for a Consent that restricts (withdrawal,
    /// refusal, deny) and 0 for a permit.
    pub recorded_at: i64,
    /// `None` when the Consent has no provision: nothing was permitted.
    pub provision: Option<Provision>,
}

/// Normalises a validated Consent's scope, status, date and provisions;
/// `imported_at` (Unix seconds) dates a Consent that carries neither
/// dateTime nor meta.lastUpdated.
pub fn record_of(
    consent: &Consent,
    date_time_unix: impl Fn(&DateTime) -> i64,
    imported_at: i64,
) -> ConsentRecord {
    // A withdrawal, refusal or deny with no time of its own is taken as
    // recent as its import, so that it is not lost to an older permit; a
    // permit with no time is taken as the oldest, so that it never
    // outranks a dated withdrawal.
    let restricts = consent.status.as_ref() != "active"
        || consent
            .provision
            .as_ref()
            .and_then(|p| p.r#type.as_ref())
            .is_none_or(|t| t.as_ref() != "permit");
    let scope = consent
        .scope
        .coding
        .iter()
        .flatten()
        .find_map(|c| c.code.clone())
        .unwrap_or_default();
    ConsentRecord {
        scope,
        status: consent.status.as_ref().to_owned(),
        recorded_at: consent
            .date_time
            .as_ref()
            .map(&date_time_unix)
            .or_else(|| {
                consent
                    .meta
                    .as_ref()
                    .and_then(|m| m.last_updated.as_ref())
                    .map(|instant| instant.0.unix_timestamp())
            })
            .unwrap_or(if restricts { imported_at } else { 0 }),
        provision: consent
            .provision
            .as_ref()
            .map(|p| provision_of(p, &date_time_unix)),
    }
}

fn provision_of(p: &ConsentProvision, date_time_unix: &impl Fn(&DateTime) -> i64) -> Provision {
    let (from, until) = period(p.period.as_ref(), date_time_unix);
    let mut codes = Vec::new();
    let mut labels = Vec::new();
    for concept in p.code.iter().flatten() {
        for coding in concept.coding.iter().flatten() {
            if let (Some(system), Some(code)) = (&coding.system, &coding.code) {
                let system = terminology::canonical_system(system);
                match Category::from_label(system, code) {
                    Some(category) => labels.push(category),
                    None => codes.push((
                        system.to_owned(),
                        terminology::normalize_code(system, code).into_owned(),
                    )),
                }
            }
        }
    }
    for coding in p.security_label.iter().flatten() {
        if let (Some(system), Some(code)) = (&coding.system, &coding.code)
            && let Some(category) = Category::from_label(system, code)
        {
            labels.push(category);
        }
    }
    labels.sort();
    labels.dedup();
    let plain = |codings: &[Option<fhir_model::r4b::types::Coding>]| -> Vec<String> {
        codings
            .iter()
            .flatten()
            .filter_map(|c| c.code.clone())
            .collect()
    };
    // Actors that are registered recipients are evaluated for the
    // exchange; any other actor is a clause ghx does not evaluate.
    let mut actors = Vec::new();
    let mut other_actor = false;
    for actor in p.actor.iter().flatten() {
        match actor
            .reference
            .identifier
            .as_ref()
            .filter(|i| i.system.as_deref() == Some(ghx_exchange::RECIPIENT_SYSTEM))
            .and_then(|i| i.value.clone())
        {
            Some(recipient) => actors.push(recipient),
            None => other_actor = true,
        }
    }
    // Actions ghx performs are all "use"/"access"/"disclose" of aggregates.

    let actions_ok = p.action.iter().flatten().all(|concept| {
        concept
            .coding
            .iter()
            .flatten()
            .any(|c| matches!(c.code.as_deref(), Some("use" | "access" | "disclose")))
    });
    Provision {
        rule: p.r#type.as_ref().map(|t| match t.as_ref() {
            "permit" => Rule::Permit,
            _ => Rule::Deny,
        }),
        from,
        until,
        purposes: plain(&p.purpose),
        classes: plain(&p.class),
        codes,
        labels,
        actors,
        unsupported: other_actor || !actions_ok || !p.data.is_empty() || p.data_period.is_some(),
        provisions: p
            .provision
            .iter()
            .flatten()
            .map(|child| provision_of(child, date_time_unix))
            .collect(),
    }
}

fn period(
    p: Option<&Period>,
    date_time_unix: &impl Fn(&DateTime) -> i64,
) -> (Option<i64>, Option<i64>) {
    match p {
        Some(p) => (
            p.start.as_ref().map(date_time_unix),
            p.end.as_ref().map(date_time_unix),
        ),
        None => (None, None),
    }
}

/// What is being asked, as consent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConsentRequest {
    /// HL7 v3 ActReason code of the approved purpose.
    pub purpose: String,
    /// Resource types the computation reads (always includes Patient).
    pub classes: Vec<String>,
    /// Codes the computation selects on, (canonical system, normalised code,
    /// is a prefix).
    pub codes: Vec<(String, String, bool)>,
    /// The registered recipient of a disclosure through the exchange;
    /// `None` for aggregates and training.
    pub recipient: Option<String>,
    /// Unix seconds the request is evaluated from...
    pub at: i64,
    /// ...to (inclusive): the decision holds for every second between.
    pub last: i64,
}

/// Why a patient does not take part. Ordered for stable reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exclusion {
    /// No Consent and the hospital is opt-in.
    NoConsent,
    /// The latest Consent is inactive: consent was withdrawn.
    Withdrawn,
    /// The latest Consent was rejected.
    Rejected,
    /// A provision that applies denies the request.
    Denied,
    /// The consent's period does not include the request time.
    Expired,
    /// The consent was given for other purposes.
    PurposeNotCovered,
    /// The consent covers other resource types or codes.
    DataNotCovered,
    /// No consent names the recipient of a disclosure.
    RecipientNotNamed,
}

impl Exclusion {
    pub fn describe(self) -> &'static str {
        match self {
            Exclusion::NoConsent => "no research consent (opt-in hospital)",
            Exclusion::Withdrawn => "consent withdrawn",
            Exclusion::Rejected => "consent rejected",
            Exclusion::Denied => "consent denies this use",
            Exclusion::Expired => "consent period not current",
            Exclusion::PurposeNotCovered => "consent given for other purposes",
            Exclusion::DataNotCovered => "consent covers other data",
            Exclusion::RecipientNotNamed => "no consent names this recipient",
        }
    }
}

/// One patient's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Included {
        /// Sensitive categories of the patient's data that may be used.
        sensitive: CategorySet,
    },
    Excluded(Exclusion),
}

/// Decides one patient's participation from all their Consent records.
/// Per scope, the decisive Consents of the latest time are the patient's
/// current word; when several share that time, each is decided and the
/// most restrictive outcome stands, whatever order they were loaded in.
pub fn evaluate(
    rules: &ConsentRules,
    consents: &[ConsentRecord],
    request: &ConsentRequest,
) -> Outcome {
    let mut tied: BTreeMap<&str, (i64, Vec<&ConsentRecord>)> = BTreeMap::new();
    for c in consents {
        let counted_scope = matches!(c.scope.as_str(), "research" | "patient-privacy");
        let decisive = matches!(c.status.as_str(), "active" | "inactive" | "rejected");
        // A Consent about disclosure to named recipients (its withdrawal
        // too) speaks to the exchange only.
        if !(counted_scope && decisive) || is_exchange(c) {
            continue;
        }
        let slot = tied
            .entry(c.scope.as_str())
            .or_insert((c.recorded_at, Vec::new()));
        match c.recorded_at.cmp(&slot.0) {
            std::cmp::Ordering::Greater => *slot = (c.recorded_at, vec![c]),
            std::cmp::Ordering::Equal => slot.1.push(c),
            std::cmp::Ordering::Less => {}
        }
    }
    // Every way of taking one Consent per scope from the tied ones.
    let mut choices: Vec<BTreeMap<&str, &ConsentRecord>> = vec![BTreeMap::new()];
    for (scope, (_, records)) in &tied {
        choices = choices
            .into_iter()
            .flat_map(|choice| {
                records.iter().map(move |record| {
                    let mut choice = choice.clone();
                    choice.insert(*scope, *record);
                    choice
                })
            })
            .collect();
    }
    choices
        .iter()
        .map(|latest| evaluate_latest(rules, latest, request))
        .reduce(most_restrictive)
        .expect("at least one choice")
}

/// The more restrictive of two outcomes: any exclusion, else the
/// sensitive categories both permit.
fn most_restrictive(a: Outcome, b: Outcome) -> Outcome {
    match (a, b) {
        (Outcome::Excluded(x), Outcome::Excluded(y)) => Outcome::Excluded(x.min(y)),
        (Outcome::Excluded(x), _) | (_, Outcome::Excluded(x)) => Outcome::Excluded(x),
        (Outcome::Included { sensitive: s }, Outcome::Included { sensitive: t }) => {
            Outcome::Included {
                sensitive: CategorySet(s.0 & t.0),
            }
        }
    }
}

/// The decision from one Consent per scope (the patient's current word).
fn evaluate_latest(
    rules: &ConsentRules,
    latest: &BTreeMap<&str, &ConsentRecord>,
    request: &ConsentRequest,
) -> Outcome {
    if latest.is_empty() {
        return match rules.default {
            DefaultConsent::OptIn => Outcome::Excluded(Exclusion::NoConsent),
            DefaultConsent::OptOut => Outcome::Included {
                sensitive: CategorySet::default(),
            },
        };
    }
    let mut permitted = false;
    let mut sensitive = CategorySet::default();
    let mut research_gap = None;
    // Research first, so its reasons win over the privacy scope's silence.
    for scope in ["research", "patient-privacy"] {
        let Some(consent) = latest.get(scope) else {
            continue;
        };
        match consent.status.as_str() {
            "inactive" => return Outcome::Excluded(Exclusion::Withdrawn),
            "rejected" => return Outcome::Excluded(Exclusion::Rejected),
            _ => {}
        }
        let Some(root) = &consent.provision else {
            return Outcome::Excluded(Exclusion::Denied);
        };
        match decide_all_classes(root, Rule::Deny, request) {
            Decision::Rule(Rule::Deny) => return Outcome::Excluded(Exclusion::Denied),
            Decision::Rule(Rule::Permit) => {
                permitted = true;
                sensitive = sensitive.union(permitted_categories(
                    root,
                    Rule::Deny,
                    request,
                    &rules.sensitive,
                ));
            }
            Decision::NotApplicable(why) if scope == "research" => research_gap = Some(why),
            Decision::NotApplicable(_) => {}
        }
    }
    if permitted {
        return Outcome::Included { sensitive };
    }
    match research_gap {
        Some(why) => Outcome::Excluded(why),
        None => match rules.default {
            DefaultConsent::OptIn => Outcome::Excluded(Exclusion::NoConsent),
            DefaultConsent::OptOut => Outcome::Included {
                sensitive: CategorySet::default(),
            },
        },
    }
}

/// What a patient's consent permits disclosing to a recipient through the
/// exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosure {
    /// Of the request's resource types, those permitted.
    pub classes: Vec<String>,
    /// Sensitive categories that may be disclosed.
    pub sensitive: CategorySet,
}

/// Decides a disclosure to `request.recipient` (set) from the patient's
/// consents. Only `patient-privacy` Consents about named recipients
/// ([`is_exchange`]) speak to it, the latest (and of equal time, the most
/// restrictive) as for aggregates, unless a later privacy Consent naming
/// no recipient objects; the hospital's default never permits it; a
/// request is permitted when the provisions permit it and a permit that
/// applies names the recipient among its actors. The exchange asks once
/// per resource, with the resource's type and codes.
pub fn evaluate_disclosure(
    rules: &ConsentRules,
    consents: &[ConsentRecord],
    request: &ConsentRequest,
) -> Result<Disclosure, Exclusion> {
    let Some(recipient) = request.recipient.as_deref() else {
        return Err(Exclusion::RecipientNotNamed);
    };
    let decisive = |c: &&ConsentRecord| {
        c.scope == "patient-privacy"
            && matches!(c.status.as_str(), "active" | "inactive" | "rejected")
    };
    let exchange = consents.iter().filter(decisive).filter(|c| is_exchange(c));
    let latest = exchange.clone().map(|c| c.recorded_at).max();
    let tied: Vec<&ConsentRecord> = exchange.filter(|c| Some(c.recorded_at) == latest).collect();
    let Some(latest) = latest else {
        return Err(Exclusion::NoConsent);
    };
    // A later privacy objection that names no recipient still stops it.
    let objected = consents.iter().filter(decisive).any(|c| {
        !is_exchange(c)
            && c.recorded_at > latest
            && (c.status != "active"
                || c.provision
                    .as_ref()
                    .is_none_or(|p| p.rule != Some(Rule::Permit)))
    });
    if objected {
        return Err(Exclusion::Denied);
    }
    let mut decided: Option<Disclosure> = None;
    for consent in tied {
        match consent.status.as_str() {
            "inactive" => return Err(Exclusion::Withdrawn),
            "rejected" => return Err(Exclusion::Rejected),
            _ => {}
        }
        let Some(root) = &consent.provision else {
            return Err(Exclusion::Denied);
        };
        if !names_recipient(root, Rule::Deny, request, recipient) {
            return Err(Exclusion::RecipientNotNamed);
        }
        let classes: Vec<String> = request
            .classes
            .iter()
            .filter(|class| {
                matches!(
                    decide(root, Rule::Deny, request, class),
                    Decision::Rule(Rule::Permit)
                )
            })
            .cloned()
            .collect();
        let sensitive = permitted_categories(root, Rule::Deny, request, &rules.sensitive);
        decided = Some(match decided {
            None => Disclosure { classes, sensitive },
            Some(d) => Disclosure {
                classes: d
                    .classes
                    .into_iter()
                    .filter(|c| classes.contains(c))
                    .collect(),
                sensitive: CategorySet(d.sensitive.0 & sensitive.0),
            },
        });
    }
    match decided {
        Some(d) if !d.classes.is_empty() => Ok(d),
        _ => Err(Exclusion::DataNotCovered),
    }
}

/// Whether a Consent is about disclosure to named recipients (its root
/// provision names them): such a Consent, and its withdrawal, speak to the
/// exchange only.
pub fn is_exchange(c: &ConsentRecord) -> bool {
    c.provision.as_ref().is_some_and(|p| !p.actors.is_empty())
}

/// Whether a permit that applies (with every ancestor) names `recipient`.
fn names_recipient(p: &Provision, parent: Rule, request: &ConsentRequest, recipient: &str) -> bool {
    let rule = p.rule.unwrap_or(parent);
    if not_applicable(p, rule, request, None).is_some() {
        return false;
    }
    (rule == Rule::Permit && p.actors.iter().any(|a| a == recipient))
        || p.provisions
            .iter()
            .any(|child| names_recipient(child, rule, request, recipient))
}

enum Decision {
    Rule(Rule),
    NotApplicable(Exclusion),
}

/// The decision for a request reading several resource types: every type
/// must be permitted; one deny excludes.
fn decide_all_classes(root: &Provision, parent: Rule, request: &ConsentRequest) -> Decision {
    let mut result = Decision::Rule(Rule::Permit);
    for class in &request.classes {
        match decide(root, parent, request, class) {
            Decision::Rule(Rule::Deny) => return Decision::Rule(Rule::Deny),
            Decision::Rule(Rule::Permit) => {}
            gap @ Decision::NotApplicable(_) => {
                if matches!(result, Decision::Rule(_)) {
                    result = gap;
                }
            }
        }
    }
    result
}

fn decide(p: &Provision, parent: Rule, request: &ConsentRequest, class: &str) -> Decision {
    let rule = p.rule.unwrap_or(parent);
    if let Some(why) = not_applicable(p, rule, request, Some(class)) {
        return Decision::NotApplicable(why);
    }
    let mut result = rule;
    for child in &p.provisions {
        match decide(child, rule, request, class) {
            Decision::Rule(Rule::Deny) => return Decision::Rule(Rule::Deny),
            Decision::Rule(Rule::Permit) => result = Rule::Permit,
            Decision::NotApplicable(_) => {}
        }
    }
    Decision::Rule(result)
}

/// Why `p` does not apply to the request, or `None` when it does. Code
/// restrictions are checked only when `class` is given (sensitive labels
/// are evaluated separately).
fn not_applicable(
    p: &Provision,
    rule: Rule,
    request: &ConsentRequest,
    class: Option<&str>,
) -> Option<Exclusion> {
    if p.unsupported {
        return match rule {
            Rule::Permit => Some(Exclusion::DataNotCovered),
            Rule::Deny => None,
        };
    }
    // A provision about recipients: for aggregates (no recipient) it is a
    // clause about someone else, a permit that never applies and a deny
    // that always does, as before; for a disclosure, it applies when it
    // names the recipient.
    if !p.actors.is_empty() {
        match &request.recipient {
            None if rule == Rule::Permit => return Some(Exclusion::DataNotCovered),
            None => return None,
            Some(r) if !p.actors.contains(r) => return Some(Exclusion::RecipientNotNamed),
            Some(_) => {}
        }
    }
    // A permit must hold for the whole window, a deny for any of it.
    let (start_by, end_after) = match rule {
        Rule::Permit => (request.at, request.last),
        Rule::Deny => (request.last, request.at),
    };
    let started = p.from.is_none_or(|from| from <= start_by);
    let not_ended = p.until.is_none_or(|until| end_after <= until);
    if !(started && not_ended) {
        return Some(Exclusion::Expired);
    }
    if !p.purposes.is_empty() && !p.purposes.contains(&request.purpose) {
        return Some(Exclusion::PurposeNotCovered);
    }
    if let Some(class) = class {
        if !p.classes.is_empty() && !p.classes.iter().any(|x| x == class) {
            return Some(Exclusion::DataNotCovered);
        }
        // A provision about specific codes: a deny concerns any request
        // touching one of them, a permit only a request all of whose codes
        // in its systems lie within them. A labels-only provision concerns
        // sensitive data, decided in `permitted_categories`.
        let codes_cover = match rule {
            Rule::Deny => p.codes.iter().any(|(system, code)| {
                request.codes.iter().any(|(rs, rc, prefix)| {
                    same_system(rs, system)
                        && (rc == code
                            || (*prefix && code.starts_with(rc.as_str()))
                            || rc.starts_with(code.as_str()))
                })
            }),
            Rule::Permit => {
                let mut read = request
                    .codes
                    .iter()
                    .filter(|(rs, ..)| p.codes.iter().any(|(system, _)| same_system(system, rs)))
                    .peekable();
                read.peek().is_some()
                    && read.all(|(rs, rc, _)| {
                        p.codes.iter().any(|(system, code)| {
                            same_system(system, rs) && rc.starts_with(code.as_str())
                        })
                    })
            }
        };
        if (!p.codes.is_empty() && !codes_cover) || (p.codes.is_empty() && !p.labels.is_empty()) {
            return Some(Exclusion::DataNotCovered);
        }
    }
    None
}

/// Whether codes of two (canonical) systems compare: the same system, or
/// two of the ICD-10 family (KCD-8, WHO ICD-10, ICD-10-CM), whose codes
/// share their categories.
fn same_system(a: &str, b: &str) -> bool {
    a == b || (terminology::icd10_family(a) && terminology::icd10_family(b))
}

/// Whether every code `request` reads that could select `category` lies
/// within a code that provision `p` names (vacuously, when it reads none).
fn within_named(
    p: &Provision,
    request: &ConsentRequest,
    codes: &SensitiveCodes,
    category: Category,
) -> bool {
    request
        .codes
        .iter()
        .filter(|(rs, rc, prefix)| codes.any_touched(rs, rc, *prefix).contains(&category))
        .all(|(rs, rc, _)| {
            p.codes
                .iter()
                .any(|(system, code)| same_system(system, rs) && rc.starts_with(code.as_str()))
        })
}

/// Sensitive categories named by applicable permits and not by applicable
/// denies, walking only where every ancestor applies.
fn permitted_categories(
    root: &Provision,
    parent: Rule,
    request: &ConsentRequest,
    codes: &SensitiveCodes,
) -> CategorySet {
    let mut permitted = CategorySet::default();
    let mut denied = CategorySet::default();
    walk_labels(root, parent, request, codes, &mut permitted, &mut denied);
    permitted.minus(denied)
}

fn walk_labels(
    p: &Provision,
    parent: Rule,
    request: &ConsentRequest,
    codes: &SensitiveCodes,
    permitted: &mut CategorySet,
    denied: &mut CategorySet,
) {
    let rule = p.rule.unwrap_or(parent);
    if not_applicable(p, rule, request, None).is_some() {
        return;
    }
    let classes_ok = p.classes.is_empty() || p.classes.iter().any(|c| c == "Condition");
    if classes_ok {
        let mut named = CategorySet::default();
        for label in &p.labels {
            named.insert(*label);
        }
        for (system, code) in &p.codes {
            if let Some(category) = codes.category(system, code) {
                // A deny naming one code of a category denies the category;
                // a permit opens it only for a request whose every code
                // touching it lies within the codes the permit names
                // (naming F32 does not open F33, nor a prefix F3).
                if rule == Rule::Deny || within_named(p, request, codes, category) {
                    named.insert(category);
                }
            }
        }
        match rule {
            Rule::Permit => *permitted = permitted.union(named),
            Rule::Deny => *denied = denied.union(named),
        }
    }
    for child in &p.provisions {
        walk_labels(child, rule, request, codes, permitted, denied);
    }
}

#[cfg(test)]
mod tests;

//! The hospital's policy directory: access rules evaluated by the Cedar
//! policy engine, and consent rules.
//!
//! A policy directory holds three files a privacy officer reads and owns:
//! `access.cedar` (who may run which work for which purposes, on which data,
//! with which minimum cell size and privacy budget), `entities.json` (the
//! requesting organisations and the groups they belong to) and
//! `consent.toml` (the default for patients without a Consent, and the
//! rare-disease codes treated as sensitive). The Cedar schema is part of
//! ghx itself (`policies/ghx.cedarschema`), because the node builds the
//! requests it describes; every policy is validated against it at load, so a
//! typo in an attribute name is an error at start-up, not a silent deny.
//!
//! Key decision: Cedar rather than hand-written checks, so that a decision is
//! a pure function of readable files and a request, its reasons are the ids
//! of the rules that decided it, and `ghx policy check` runs exactly what the
//! node runs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::{Deserialize, Serialize};

use crate::consent::{ConsentRules, DefaultConsent, SensitiveCodes};
use crate::terminology;

/// The schema every access policy is validated against.
pub const SCHEMA: &str = include_str!("../../policies/ghx.cedarschema");

/// The shipped default policy directories, by hospital id, as
/// (file name, contents): what `ghx policy init` writes.
pub const DEFAULTS: &[(&str, [(&str, &str); 3])] = &[
    (
        "chonnam",
        [
            (
                "access.cedar",
                include_str!("../../policies/chonnam/access.cedar"),
            ),
            (
                "entities.json",
                include_str!("../../policies/chonnam/entities.json"),
            ),
            (
                "consent.toml",
                include_str!("../../policies/chonnam/consent.toml"),
            ),
        ],
    ),
    (
        "chosun",
        [
            (
                "access.cedar",
                include_str!("../../policies/chosun/access.cedar"),
            ),
            (
                "entities.json",
                include_str!("../../policies/chosun/entities.json"),
            ),
            (
                "consent.toml",
                include_str!("../../policies/chosun/consent.toml"),
            ),
        ],
    ),
    (
        "christian",
        [
            (
                "access.cedar",
                include_str!("../../policies/christian/access.cedar"),
            ),
            (
                "entities.json",
                include_str!("../../policies/christian/entities.json"),
            ),
            (
                "consent.toml",
                include_str!("../../policies/christian/consent.toml"),
            ),
        ],
    ),
];

/// Writes the shipped default policy files of `hospital` into `dir`.
/// Existing files are left alone unless `overwrite` says otherwise.
pub fn write_defaults(hospital: &str, dir: &Path, overwrite: Overwrite) -> Result<(), Error> {
    let files = DEFAULTS
        .iter()
        .find(|(id, _)| *id == hospital)
        .map(|(_, files)| files)
        .ok_or_else(|| Error::Invalid {
            path: dir.to_owned(),
            message: format!(
                "no default policies for `{hospital}`; known: {}",
                DEFAULTS
                    .iter()
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Read { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, contents) in files {
        let path = dir.join(name);
        if path.exists() && overwrite == Overwrite::Keep {
            continue;
        }
        std::fs::write(&path, contents).map_err(io(&path))?;
    }
    Ok(())
}

/// What [`write_defaults`] does with files that already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    Keep,
    Replace,
}

/// Most rare-disease codes one consent file may list; each becomes a bound
/// parameter in diagnosis queries.
const MAX_RARE_DISEASE_CODES: usize = 200;

/// A policy directory that cannot be used; messages name the file and,
/// where the engine reports one, the line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the built-in policy schema is invalid: {0}")]
    Schema(String),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: policy `{id}` does not match the schema: {message}")]
    Validation {
        path: PathBuf,
        id: String,
        message: String,
    },
    #[error("request cannot be evaluated: {0}")]
    Request(String),
}

/// The kinds of work a policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Count,
    Statistics,
    Training,
    Evaluation,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Count => "count",
            Action::Statistics => "statistics",
            Action::Training => "training",
            Action::Evaluation => "evaluation",
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Action::Count,
            Action::Statistics,
            Action::Training,
            Action::Evaluation,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            format!("unknown action `{s}`; expected count, statistics, training or evaluation")
        })
    }
}

/// Everything an access decision looks at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub requester: String,
    pub organisation: String,
    pub role: String,
    pub action: Action,
    pub node: String,
    pub study: String,
    pub purpose: String,
    pub resource_types: BTreeSet<String>,
    pub condition_codes: BTreeSet<String>,
    pub observation_codes: BTreeSet<String>,
    pub sensitive_categories: BTreeSet<String>,
    pub group_by: BTreeSet<String>,
    pub min_cell_size: u32,
    /// Differential-privacy budget spent, as a decimal string ("0.0").
    pub epsilon: String,
}

/// One rule that decided a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReason {
    pub id: String,
    pub reason: String,
}

/// The engine's answer and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDecision {
    pub allowed: bool,
    /// The permits that allowed it, or the forbids that refused it; empty
    /// when it was refused because no permit matched.
    pub reasons: Vec<PolicyReason>,
    /// Rules that failed to evaluate (they are skipped, which can only deny).
    pub errors: Vec<String>,
}

impl AccessDecision {
    /// One line for audit logs and refusals.
    pub fn summary(&self) -> String {
        let ids = || {
            self.reasons
                .iter()
                .map(|r| format!("`{}` ({})", r.id, r.reason))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (self.allowed, self.reasons.is_empty()) {
            (true, _) => format!("permitted by {}", ids()),
            (false, true) => "no policy permits this request".to_owned(),
            (false, false) => format!("forbidden by {}", ids()),
        }
    }
}

/// A loaded, validated policy directory.
#[derive(Debug)]
pub struct PolicyDir {
    pub dir: PathBuf,
    schema: Schema,
    policies: PolicySet,
    reasons: HashMap<String, String>,
    entities: Entities,
    pub consent: ConsentRules,
    /// Number of access rules, for reports.
    pub rule_count: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentFile {
    default: DefaultConsent,
    #[serde(default)]
    sensitive: SensitiveFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SensitiveFile {
    #[serde(default)]
    rare_disease_codes: Vec<String>,
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// "line L, column C" of a byte offset.
fn position(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

/// A Cedar diagnostic with the position of its first label, if any.
fn located(text: &str, error: &dyn miette::Diagnostic) -> String {
    let mut message = error.to_string();
    if let Some(help) = error.help() {
        message.push_str(&format!(" ({help})"));
    }
    match error.labels().and_then(|mut labels| labels.next()) {
        Some(label) => format!("{}: {message}", position(text, label.offset())),
        None => message,
    }
}

impl PolicyDir {
    /// Loads and validates `access.cedar`, `entities.json` and
    /// `consent.toml` from `dir`.
    pub fn load(dir: &Path) -> Result<PolicyDir, Error> {
        let schema = Schema::from_cedarschema_str(SCHEMA)
            .map(|(schema, _warnings)| schema)
            .map_err(|e| Error::Schema(located(SCHEMA, &e)))?;

        let access_path = dir.join("access.cedar");
        let text = read(&access_path)?;
        let parsed = PolicySet::from_str(&text).map_err(|e| Error::Invalid {
            path: access_path.clone(),
            message: located(&text, &e),
        })?;
        // Rules are known by their @id, so reasons and errors name them.
        let mut policies = PolicySet::new();
        let mut reasons = HashMap::new();
        for policy in parsed.policies() {
            let Some(id) = policy.annotation("id") else {
                return Err(Error::Invalid {
                    path: access_path.clone(),
                    message: format!(
                        "every rule needs an @id(\"...\") annotation; this one has none: {}",
                        policy.to_string().lines().next().unwrap_or_default()
                    ),
                });
            };
            let reason = policy.annotation("reason").unwrap_or_default().to_owned();
            reasons.insert(id.to_owned(), reason);
            let named = policy.new_id(PolicyId::new(id));
            policies.add(named).map_err(|e| Error::Invalid {
                path: access_path.clone(),
                message: format!("rule `{id}`: {e}"),
            })?;
        }
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if let Some(error) = validation.validation_errors().next() {
            return Err(Error::Validation {
                path: access_path,
                id: error.policy_id().to_string(),
                message: located(&text, error),
            });
        }

        let entities_path = dir.join("entities.json");
        let entities_text = read(&entities_path)?;
        let entities =
            Entities::from_json_str(&entities_text, Some(&schema)).map_err(|e| Error::Invalid {
                path: entities_path.clone(),
                message: located(&entities_text, &e),
            })?;

        let consent_path = dir.join("consent.toml");
        let consent_text = read(&consent_path)?;
        let file: ConsentFile = toml::from_str(&consent_text).map_err(|e| Error::Invalid {
            path: consent_path.clone(),
            message: e.to_string(),
        })?;
        if file.sensitive.rare_disease_codes.len() > MAX_RARE_DISEASE_CODES {
            return Err(Error::Invalid {
                path: consent_path,
                message: format!(
                    "`sensitive.rare_disease_codes` lists {} codes; at most {MAX_RARE_DISEASE_CODES} are supported",
                    file.sensitive.rare_disease_codes.len()
                ),
            });
        }
        let mut rare = Vec::new();
        for code in &file.sensitive.rare_disease_codes {
            let normalized = terminology::normalize_code(terminology::KCD8, code).into_owned();
            let well_formed = normalized.len() >= 3
                && normalized
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_uppercase())
                && normalized.chars().all(|c| c.is_ascii_alphanumeric());
            if !well_formed {
                return Err(Error::Invalid {
                    path: consent_path,
                    message: format!(
                        "`sensitive.rare_disease_codes`: `{code}` is not a KCD-8 code (e.g. \"E75.2\")"
                    ),
                });
            }
            rare.push(normalized);
        }
        let rule_count = reasons.len();
        Ok(PolicyDir {
            dir: dir.to_owned(),
            schema,
            policies,
            reasons,
            entities,
            consent: ConsentRules {
                default: file.default,
                sensitive: SensitiveCodes {
                    rare_disease_prefixes: rare,
                },
            },
            rule_count,
        })
    }

    /// Runs `request` against the access policies.
    pub fn authorize(&self, request: &AccessRequest) -> Result<AccessDecision, Error> {
        let bad = |e: &dyn std::fmt::Display| Error::Request(e.to_string());
        let uid = |ty: &str, id: &str| -> Result<EntityUid, Error> {
            let literal = format!("{ty}::{}", serde_json::Value::String(id.to_owned()));
            EntityUid::from_str(&literal).map_err(|e| bad(&e))
        };
        let organisation = uid("Ghx::Organisation", &request.organisation)?;
        let principal = uid("Ghx::Requester", &request.requester)?;
        let node = uid("Ghx::Node", &request.node)?;
        let action = uid("Ghx::Action", request.action.name())?;
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let requester = Entity::new(
            principal.clone(),
            HashMap::from([("role".to_owned(), string(&request.role))]),
            HashSet::from([organisation]),
        )
        .map_err(|e| bad(&e))?;
        let node_entity = Entity::new(
            node.clone(),
            HashMap::from([("hospital".to_owned(), string(&request.node))]),
            HashSet::new(),
        )
        .map_err(|e| bad(&e))?;
        let entities = self
            .entities
            .clone()
            .add_entities([requester, node_entity], Some(&self.schema))
            .map_err(|e| bad(&e))?;
        let set =
            |s: &BTreeSet<String>| serde_json::Value::from(s.iter().cloned().collect::<Vec<_>>());
        let context = serde_json::json!({
            "study": request.study,
            "purpose": request.purpose,
            "resource_types": set(&request.resource_types),
            "condition_codes": set(&request.condition_codes),
            "observation_codes": set(&request.observation_codes),
            "sensitive_categories": set(&request.sensitive_categories),
            "group_by": set(&request.group_by),
            "min_cell_size": request.min_cell_size,
            "epsilon": {"__extn": {"fn": "decimal", "arg": request.epsilon}},
        });
        let context = Context::from_json_value(context, Some((&self.schema, &action)))
            .map_err(|e| bad(&e))?;
        let cedar_request =
            cedar_policy::Request::new(principal, action, node, context, Some(&self.schema))
                .map_err(|e| bad(&e))?;
        let response = Authorizer::new().is_authorized(&cedar_request, &self.policies, &entities);
        let mut reasons: Vec<PolicyReason> = response
            .diagnostics()
            .reason()
            .map(|id| PolicyReason {
                id: id.to_string(),
                reason: self
                    .reasons
                    .get(AsRef::<str>::as_ref(id))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        reasons.sort_by(|a, b| a.id.cmp(&b.id));
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        errors.sort();
        Ok(AccessDecision {
            allowed: response.decision() == Decision::Allow,
            reasons,
            errors,
        })
    }
}

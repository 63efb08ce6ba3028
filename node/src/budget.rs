//! Paying for noise: a noised query or training round is charged to its
//! organisation's privacy budget for the study (from the manifest) and at
//! this node overall, before anything noised is released; a charge either
//! would exceed is refused.

use ghx_study::capability::Claims;
use ghx_study::manifest::StudyManifest;

use crate::classify::{Classify, Code};
use crate::store::{self, BudgetScope, ChargeOutcome, PrivacyCharge, Store};

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(
        "privacy budget {scope}: {spent:.4} of {limit:.4} {quantity} already spent, this request asks {asked:.4}"
    )]
    Spent {
        scope: String,
        quantity: &'static str,
        spent: f64,
        limit: f64,
        asked: f64,
    },
    #[error("storage: {0}")]
    Store(#[from] store::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Spent { .. } => Code::ResourceExhausted,
            Error::Store(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::Spent { .. } => "budget",
            Error::Store(_) => "internal",
        }
    }
}

/// Where charges are kept and the cap one organisation may spend here over
/// all studies.
#[derive(Clone, Copy)]
pub(crate) struct Budget<'a> {
    pub(crate) store: &'a Store,
    pub(crate) organisation_epsilon: Option<f64>,
}

impl Budget<'_> {
    /// Charges `(epsilon, delta)` under `claims`' study and organisation;
    /// returns the budget note for the result. `charge_id` names the charge
    /// in the ledger, once: the capability's id, or for a session's round
    /// the capability's id and the round.
    pub(crate) fn charge(
        &self,
        charge_id: &str,
        claims: &Claims,
        manifest: &StudyManifest,
        request_sha256: &str,
        (epsilon, delta): (f64, f64),
    ) -> Result<String, Error> {
        let charge = PrivacyCharge {
            organisation: &claims.org,
            study_id: &claims.sub,
            capability_id: charge_id,
            request_sha256,
            epsilon,
            delta,
            study_epsilon: manifest.privacy_budget,
            study_delta: manifest.privacy_delta,
            organisation_epsilon: self.organisation_epsilon,
        };
        match self.store.charge_privacy(&charge)? {
            ChargeOutcome::Charged { study } => Ok(format!(
                "privacy budget: this study has now spent epsilon {:.4} of {:.4}{} over {} noised queries and training rounds at this node",
                study.epsilon,
                manifest.privacy_budget,
                if manifest.privacy_delta > 0.0 {
                    format!(
                        " and delta {:e} of {:e}",
                        study.delta, manifest.privacy_delta
                    )
                } else {
                    String::new()
                },
                study.queries
            )),
            ChargeOutcome::Refused {
                scope: which,
                spent,
            } => {
                let (scope, limit) = match which {
                    BudgetScope::Study => (
                        format!("of study {} for {}", claims.sub, claims.org),
                        manifest.privacy_budget,
                    ),
                    BudgetScope::Organisation => (
                        format!("of {} at this node over all studies", claims.org),
                        self.organisation_epsilon.unwrap_or(0.0),
                    ),
                };
                // Only a study's budget has a delta limit.
                let delta_spent =
                    which == BudgetScope::Study && spent.delta + delta > manifest.privacy_delta;
                Err(if delta_spent {
                    Error::Spent {
                        scope,
                        quantity: "delta",
                        spent: spent.delta,
                        limit: manifest.privacy_delta,
                        asked: delta,
                    }
                } else {
                    Error::Spent {
                        scope,
                        quantity: "epsilon",
                        spent: spent.epsilon,
                        limit,
                        asked: epsilon,
                    }
                })
            }
        }
    }
}

//! The node's ledgers: capability uses (single use), revoked studies,
//! privacy-budget charges and the participant sets bound to sums.

use diesel::prelude::*;
use ghx_db::{WriteTransaction, with_conn};

use super::schema::{
    capability_uses, privacy_budget, privacy_charges, revoked_studies, sum_participants,
};
use super::{Result, Store, now_rfc3339};

impl Store {
    /// Records that capability `jti` is being used. Returns false when it
    /// was used before (a replay). Expired entries are pruned on the way.
    pub fn record_capability_use(
        &self,
        jti: &str,
        study_id: &str,
        expires_at: i64,
    ) -> Result<bool> {
        let now = now_rfc3339();
        let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
        Ok(with_conn!(self.backend, |conn| conn.write_transaction(
            |conn| {
                // A day's grace beyond expiry covers clock skew and leeway.
                diesel::delete(
                    capability_uses::table
                        .filter(capability_uses::expires_at.lt(now_unix - 86_400)),
                )
                .execute(conn)?;
                let inserted = diesel::insert_into(capability_uses::table)
                    .values((
                        capability_uses::jti.eq(jti),
                        capability_uses::study_id.eq(study_id),
                        capability_uses::expires_at.eq(expires_at),
                        capability_uses::used_at.eq(&now),
                    ))
                    .on_conflict_do_nothing()
                    .execute(conn)?;
                diesel::QueryResult::Ok(inserted == 1)
            }
        )?))
    }

    /// How many charges `organisation` paid for `request_sha256` (a
    /// query's or training's digest) in `study_id`.
    pub fn privacy_charges_for(
        &self,
        organisation: &str,
        study_id: &str,
        request_sha256: &str,
    ) -> Result<u64> {
        let n: i64 = with_conn!(self.backend, |conn| privacy_charges::table
            .filter(privacy_charges::organisation.eq(organisation))
            .filter(privacy_charges::study_id.eq(study_id))
            .filter(privacy_charges::request_sha256.eq(request_sha256))
            .count()
            .get_result(conn)?);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Charges a query's privacy cost to its organisation's ledger for the
    /// study and in total, unless either would then exceed its limit. Both
    /// rows are changed by conditional updates in one transaction, so two
    /// concurrent queries can never both spend the last of a budget.
    pub fn charge_privacy(&self, charge: &PrivacyCharge<'_>) -> Result<ChargeOutcome> {
        // Sums of decimal epsilons (0.1 + 0.2) must not fail on rounding.
        const SLACK: f64 = 1e-9;
        let now = now_rfc3339();
        let rows = [
            (charge.study_id, charge.study_epsilon, charge.study_delta),
            (
                "",
                charge.organisation_epsilon.unwrap_or(f64::MAX / 4.0),
                1.0,
            ),
        ];
        let outcome: std::result::Result<(), ChargeError> = with_conn!(self.backend, |conn| conn
            .write_transaction(|conn| {
                for (i, (study, eps_limit, delta_limit)) in rows.iter().enumerate() {
                    diesel::insert_into(privacy_budget::table)
                        .values((
                            privacy_budget::organisation.eq(charge.organisation),
                            privacy_budget::study_id.eq(study),
                            privacy_budget::epsilon_spent.eq(0.0),
                            privacy_budget::delta_spent.eq(0.0),
                            privacy_budget::queries.eq(0i64),
                        ))
                        .on_conflict_do_nothing()
                        .execute(conn)?;
                    let updated = diesel::update(
                        privacy_budget::table
                            .filter(privacy_budget::organisation.eq(charge.organisation))
                            .filter(privacy_budget::study_id.eq(study))
                            .filter(
                                (privacy_budget::epsilon_spent + charge.epsilon)
                                    .le(eps_limit + SLACK),
                            )
                            .filter(
                                (privacy_budget::delta_spent + charge.delta)
                                    .le(delta_limit + SLACK * 1e-3),
                            ),
                    )
                    .set((
                        privacy_budget::epsilon_spent
                            .eq(privacy_budget::epsilon_spent + charge.epsilon),
                        privacy_budget::delta_spent.eq(privacy_budget::delta_spent + charge.delta),
                        privacy_budget::queries.eq(privacy_budget::queries + 1),
                    ))
                    .execute(conn)?;
                    if updated == 0 {
                        // Undo the other row's charge, if any.
                        return Err(ChargeError::Refused(i));
                    }
                }
                diesel::insert_into(privacy_charges::table)
                    .values((
                        privacy_charges::capability_id.eq(charge.capability_id),
                        privacy_charges::organisation.eq(charge.organisation),
                        privacy_charges::study_id.eq(charge.study_id),
                        privacy_charges::epsilon.eq(charge.epsilon),
                        privacy_charges::delta.eq(charge.delta),
                        privacy_charges::charged_at.eq(&now),
                        privacy_charges::request_sha256.eq(charge.request_sha256),
                    ))
                    .execute(conn)?;
                Ok(())
            }));
        let refused_at = match outcome {
            Ok(()) => None,
            Err(ChargeError::Refused(i)) => Some(i),
            Err(ChargeError::Db(e)) => return Err(e.into()),
        };
        let study = self.privacy_spent(charge.organisation, charge.study_id)?;
        Ok(match refused_at {
            None => ChargeOutcome::Charged { study },
            Some(0) => ChargeOutcome::Refused {
                scope: BudgetScope::Study,
                spent: study,
            },
            Some(_) => ChargeOutcome::Refused {
                scope: BudgetScope::Organisation,
                spent: self.privacy_spent(charge.organisation, "")?,
            },
        })
    }

    /// What an organisation has spent on a study (`""`: on all studies).
    pub fn privacy_spent(&self, organisation: &str, study_id: &str) -> Result<Spent> {
        let row: Option<(f64, f64, i64)> = with_conn!(self.backend, |conn| privacy_budget::table
            .filter(privacy_budget::organisation.eq(organisation))
            .filter(privacy_budget::study_id.eq(study_id))
            .select((
                privacy_budget::epsilon_spent,
                privacy_budget::delta_spent,
                privacy_budget::queries,
            ))
            .first(conn)
            .optional()?);
        let (epsilon, delta, queries) = row.unwrap_or((0.0, 0.0, 0));
        Ok(Spent {
            epsilon,
            delta,
            queries,
        })
    }

    /// Marks a study revoked; idempotent.
    pub fn revoke_study(&self, study_id: &str, reason: &str) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| diesel::insert_into(
            revoked_studies::table
        )
        .values((
            revoked_studies::study_id.eq(study_id),
            revoked_studies::revoked_at.eq(&now),
            revoked_studies::reason.eq(reason),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?);
        Ok(())
    }

    /// Whether the coordinator has revoked a study.
    pub fn is_revoked(&self, study_id: &str) -> Result<bool> {
        let n: i64 = with_conn!(self.backend, |conn| revoked_studies::table
            .filter(revoked_studies::study_id.eq(study_id))
            .count()
            .get_result(conn)?);
        Ok(n > 0)
    }

    /// Binds `study`'s secure-aggregation sums at this node to
    /// `participants` (sorted node ids, comma-separated) unless it is
    /// bound already; returns the set it is bound to.
    pub fn bind_sum_participants(&self, study_id: &str, participants: &str) -> Result<String> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| {
            diesel::insert_into(sum_participants::table)
                .values((
                    sum_participants::study_id.eq(study_id),
                    sum_participants::participants.eq(participants),
                    sum_participants::bound_at.eq(&now),
                ))
                .on_conflict_do_nothing()
                .execute(conn)?;
            Ok(sum_participants::table
                .filter(sum_participants::study_id.eq(study_id))
                .select(sum_participants::participants)
                .first::<String>(conn)?)
        })
    }

    /// The set `study`'s sums are bound to at this node, if any.
    pub fn sum_participants(&self, study_id: &str) -> Result<Option<String>> {
        Ok(with_conn!(self.backend, |conn| sum_participants::table
            .filter(sum_participants::study_id.eq(study_id))
            .select(sum_participants::participants)
            .first::<String>(conn)
            .optional()?))
    }
}

/// A query's privacy cost and the limits it must fit in.
#[derive(Debug, Clone, Copy)]
pub struct PrivacyCharge<'a> {
    pub organisation: &'a str,
    pub study_id: &'a str,
    /// The charge's key in the ledger, charged once: the capability's id,
    /// or for a training session's round the capability's id and round.
    pub capability_id: &'a str,
    /// Digest of the query or training spec charged for.
    pub request_sha256: &'a str,
    pub epsilon: f64,
    pub delta: f64,
    /// The study's budget (from its manifest).
    pub study_epsilon: f64,
    pub study_delta: f64,
    /// The node's limit per organisation over all studies, if any.
    pub organisation_epsilon: Option<f64>,
}

/// Why a charge transaction rolled back.
enum ChargeError {
    /// The row at this index had too little budget left.
    Refused(usize),
    Db(diesel::result::Error),
}

/// Privacy spent so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
    pub queries: i64,
}

/// Which budget a refused charge would have exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Study,
    Organisation,
}

/// What came of a charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ChargeOutcome {
    /// Charged; what the study has spent now.
    Charged { study: Spent },
    /// Not charged: it would exceed the budget of `scope`, of which `spent`
    /// is used.
    Refused { scope: BudgetScope, spent: Spent },
}

impl From<diesel::result::Error> for ChargeError {
    fn from(e: diesel::result::Error) -> Self {
        ChargeError::Db(e)
    }
}

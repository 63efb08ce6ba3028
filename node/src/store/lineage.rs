//! Where each training run stands at this node (`learn/LINEAGE.md` 2.5):
//! the last round whose sum was applied, the chain's head and the model
//! that follows, with the step before. Written compare-and-set on the
//! round, so two requests for one run never both advance it.

use diesel::prelude::*;

use super::schema::training_lineage;
use super::{Result, Store, now_rfc3339};
use ghx_db::with_conn;

/// Which run: study, training digest, run id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunKey<'a> {
    pub study_id: &'a str,
    pub training_sha256: &'a str,
    pub run_id: &'a str,
}

/// One step of a run's lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineageStep {
    /// The last round applied: -1 at genesis, 0 the moments, then r.
    pub round: i32,
    /// Hex SHA-256.
    pub head: String,
    /// The model after `round` (`ghx.model/v1`); empty at genesis.
    pub model_json: String,
}

/// A run's lineage: where it stands, and the step before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub current: LineageStep,
    pub previous: Option<LineageStep>,
    pub updated_at: String,
}

type Row = (
    i32,
    String,
    String,
    Option<i32>,
    Option<String>,
    Option<String>,
    String,
);

impl Store {
    /// The run's lineage, if it started here.
    pub fn lineage(&self, run: RunKey<'_>) -> Result<Option<Lineage>> {
        let row: Option<Row> = with_conn!(self.backend, |conn| run_row(run)
            .select((
                training_lineage::round,
                training_lineage::head,
                training_lineage::model_json,
                training_lineage::previous_round,
                training_lineage::previous_head,
                training_lineage::previous_model_json,
                training_lineage::updated_at,
            ))
            .first::<Row>(conn)
            .optional()?);
        Ok(row.map(
            |(round, head, model_json, p_round, p_head, p_model, updated_at)| Lineage {
                current: LineageStep {
                    round,
                    head,
                    model_json,
                },
                previous: match (p_round, p_head, p_model) {
                    (Some(round), Some(head), Some(model_json)) => Some(LineageStep {
                        round,
                        head,
                        model_json,
                    }),
                    _ => None,
                },
                updated_at,
            },
        ))
    }

    /// Starts the run's lineage at `genesis` unless it has one; whether it
    /// was started now.
    pub fn start_lineage(&self, run: RunKey<'_>, genesis: &LineageStep) -> Result<bool> {
        let now = now_rfc3339();
        let inserted = with_conn!(self.backend, |conn| {
            diesel::insert_into(training_lineage::table)
                .values((
                    training_lineage::study_id.eq(run.study_id),
                    training_lineage::training_sha256.eq(run.training_sha256),
                    training_lineage::run_id.eq(run.run_id),
                    training_lineage::round.eq(genesis.round),
                    training_lineage::head.eq(&genesis.head),
                    training_lineage::model_json.eq(&genesis.model_json),
                    training_lineage::updated_at.eq(&now),
                ))
                .on_conflict_do_nothing()
                .execute(conn)?
        });
        Ok(inserted == 1)
    }

    /// Moves the run's lineage from `from` to `to`, with `previous` as
    /// the step before (`from` itself when advancing; the step before
    /// `from` when a round is redone after a coordinator lost the one
    /// applied), if it still stands at `from`; whether it moved. A request
    /// that lost a race to another finds it moved.
    pub fn move_lineage(
        &self,
        run: RunKey<'_>,
        from: &LineageStep,
        to: &LineageStep,
        previous: Option<&LineageStep>,
    ) -> Result<bool> {
        let now = now_rfc3339();
        let moved = with_conn!(self.backend, |conn| {
            diesel::update(
                run_row(run)
                    .filter(training_lineage::round.eq(from.round))
                    .filter(training_lineage::head.eq(&from.head)),
            )
            .set((
                training_lineage::round.eq(to.round),
                training_lineage::head.eq(&to.head),
                training_lineage::model_json.eq(&to.model_json),
                training_lineage::previous_round.eq(previous.map(|p| p.round)),
                training_lineage::previous_head.eq(previous.map(|p| &p.head)),
                training_lineage::previous_model_json.eq(previous.map(|p| &p.model_json)),
                training_lineage::updated_at.eq(&now),
            ))
            .execute(conn)?
        });
        Ok(moved == 1)
    }

    /// Binds the run, once, to `rows_sha256` (the digest of the rows it
    /// computes on) and a secret (`fresh`, unless it has one), and returns
    /// what it is bound to: (secret, rows digest). None when the run has
    /// no lineage here.
    pub fn seal_run(
        &self,
        run: RunKey<'_>,
        fresh: &str,
        rows_sha256: &str,
    ) -> Result<Option<(String, String)>> {
        with_conn!(self.backend, |conn| {
            diesel::update(run_row(run).filter(training_lineage::seed_secret.is_null()))
                .set((
                    training_lineage::seed_secret.eq(fresh),
                    training_lineage::rows_sha256.eq(rows_sha256),
                ))
                .execute(conn)?;
        });
        self.run_seal(run)
    }

    /// What the run is sealed to, (secret, rows digest), if it is.
    pub fn run_seal(&self, run: RunKey<'_>) -> Result<Option<(String, String)>> {
        let sealed: Option<(Option<String>, Option<String>)> = with_conn!(self.backend, |conn| {
            run_row(run)
                .select((training_lineage::seed_secret, training_lineage::rows_sha256))
                .first(conn)
                .optional()?
        });
        Ok(sealed.and_then(|(secret, rows)| secret.zip(rows)))
    }

    /// How many runs of a training started here (a cap on restarts,
    /// `learn/LINEAGE.md` B8).
    pub fn count_lineages(&self, study_id: &str, training_sha256: &str) -> Result<i64> {
        Ok(with_conn!(self.backend, |conn| training_lineage::table
            .filter(training_lineage::study_id.eq(study_id))
            .filter(training_lineage::training_sha256.eq(training_sha256))
            .count()
            .get_result(conn)?))
    }
}

/// The query for one run's lineage row.
type RunRow<'a> = diesel::dsl::Filter<
    diesel::dsl::Filter<
        diesel::dsl::Filter<
            training_lineage::table,
            diesel::dsl::Eq<training_lineage::study_id, &'a str>,
        >,
        diesel::dsl::Eq<training_lineage::training_sha256, &'a str>,
    >,
    diesel::dsl::Eq<training_lineage::run_id, &'a str>,
>;

/// The lineage row of `run`.
fn run_row(run: RunKey<'_>) -> RunRow<'_> {
    training_lineage::table
        .filter(training_lineage::study_id.eq(run.study_id))
        .filter(training_lineage::training_sha256.eq(run.training_sha256))
        .filter(training_lineage::run_id.eq(run.run_id))
}

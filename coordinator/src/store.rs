//! The coordinator's database: studies with their manifests, committee
//! votes, the latest result of each study query, training runs, and the
//! audit log (shared with the nodes: `ghx_db::audit`).
//!
//! SQLite by default, PostgreSQL by URL, through `ghx-db`; each operation is
//! written once for both, and one test suite runs on both.

use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use ghx_db::{Backend, WriteTransaction, with_conn};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

mod schema {
    diesel::table! {
        studies (id) {
            id -> Text,
            number -> BigInt,
            manifest_json -> Text,
            status -> Text,
            submitted_at -> Text,
            last_run -> Nullable<Text>,
        }
    }

    diesel::table! {
        votes (study_id, position) {
            study_id -> Text,
            position -> BigInt,
            member -> Text,
            decision -> Text,
            note -> Text,
            at -> Text,
        }
    }

    diesel::table! {
        results (study_id, query) {
            study_id -> Text,
            query -> Text,
            run_at -> Text,
            result_json -> Text,
        }
    }

    diesel::table! {
        training_runs (id) {
            id -> Text,
            study_id -> Text,
            training -> Text,
            status -> Text,
            record_json -> Text,
            updated_at -> Text,
        }
    }

    diesel::table! {
        training_rounds (run_id, round) {
            run_id -> Text,
            round -> BigInt,
            record_json -> Text,
        }
    }
}

use schema::{results, studies, training_rounds, training_runs, votes};

pub use ghx_db::{Error, Result};

/// One committee member's decision, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteRecord {
    pub member: String,
    /// approve, reject or revoke.
    pub decision: String,
    pub note: String,
    pub at: String,
}

/// A study row with its votes in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRecord {
    pub id: String,
    pub manifest_json: String,
    pub status: String,
    pub submitted_at: String,
    pub last_run: Option<String>,
    pub votes: Vec<VoteRecord>,
}

/// A training run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingRunRow {
    pub id: String,
    pub study_id: String,
    pub training: String,
    pub status: String,
    pub record_json: String,
    pub updated_at: String,
}

/// The coordinator's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CoordinatorStore {
    backend: Backend,
    audit: ghx_db::audit::AuditLog,
}

impl CoordinatorStore {
    /// Opens the database at `url` (a SQLite path or a postgres:// URL) and
    /// applies pending migrations.
    pub fn open(url: &str) -> Result<Self> {
        let backend = ghx_db::open(
            url,
            ghx_db::Migrations {
                sqlite: SQLITE_MIGRATIONS,
                postgres: POSTGRES_MIGRATIONS,
            },
        )?;
        let audit = ghx_db::audit::AuditLog::open(backend.clone())?;
        Ok(CoordinatorStore { backend, audit })
    }

    /// Whether the database answers (readiness).
    pub fn ping(&self) -> Result<()> {
        ghx_db::ping(&self.backend)
    }

    /// The coordinator's audit log (unsigned; the api signs checkpoints).
    pub fn audit_log(&self) -> &ghx_db::audit::AuditLog {
        &self.audit
    }

    /// Stores a new submitted study and returns its id (`study-0001`, ...).
    pub fn insert_study(&self, manifest_json: &str, submitted_at: &str) -> Result<String> {
        Ok(with_conn!(self.backend, |conn| conn.write_transaction(
            |conn| {
                let last: Option<i64> = studies::table
                    .select(diesel::dsl::max(studies::number))
                    .first(conn)?;
                let number = last.unwrap_or(0) + 1;
                let id = format!("study-{number:04}");
                diesel::insert_into(studies::table)
                    .values((
                        studies::id.eq(&id),
                        studies::number.eq(number),
                        studies::manifest_json.eq(manifest_json),
                        studies::status.eq("submitted"),
                        studies::submitted_at.eq(submitted_at),
                    ))
                    .execute(conn)?;
                diesel::QueryResult::Ok(id)
            }
        )?))
    }

    /// One study's status alone (a study's manifest never changes; its
    /// status does).
    pub fn study_status(&self, id: &str) -> Result<Option<String>> {
        Ok(with_conn!(self.backend, |conn| studies::table
            .filter(studies::id.eq(id))
            .select(studies::status)
            .first::<String>(conn)
            .optional()?))
    }

    /// One study with its votes.
    pub fn study(&self, id: &str) -> Result<Option<StudyRecord>> {
        Ok(self.load(Some(id))?.pop())
    }

    /// Every study, oldest first.
    pub fn studies(&self) -> Result<Vec<StudyRecord>> {
        self.load(None)
    }

    fn load(&self, id: Option<&str>) -> Result<Vec<StudyRecord>> {
        type Row = (String, String, String, String, Option<String>);
        type VoteRow = (String, String, String, String, String);
        let (rows, vote_rows): (Vec<Row>, Vec<VoteRow>) = with_conn!(self.backend, |conn| conn
            .write_transaction(|conn| {
                let mut query = studies::table
                    .select((
                        studies::id,
                        studies::manifest_json,
                        studies::status,
                        studies::submitted_at,
                        studies::last_run,
                    ))
                    .order(studies::number)
                    .into_boxed();
                let mut vote_query = votes::table
                    .select((
                        votes::study_id,
                        votes::member,
                        votes::decision,
                        votes::note,
                        votes::at,
                    ))
                    .order((votes::study_id, votes::position))
                    .into_boxed();
                if let Some(id) = id {
                    query = query.filter(studies::id.eq(id));
                    vote_query = vote_query.filter(votes::study_id.eq(id));
                }
                diesel::QueryResult::Ok((query.load(conn)?, vote_query.load(conn)?))
            })?);
        let mut records: Vec<StudyRecord> = rows
            .into_iter()
            .map(
                |(id, manifest_json, status, submitted_at, last_run)| StudyRecord {
                    id,
                    manifest_json,
                    status,
                    submitted_at,
                    last_run,
                    votes: Vec::new(),
                },
            )
            .collect();
        for (study_id, member, decision, note, at) in vote_rows {
            if let Some(record) = records.iter_mut().find(|r| r.id == study_id) {
                record.votes.push(VoteRecord {
                    member,
                    decision,
                    note,
                    at,
                });
            }
        }
        Ok(records)
    }

    /// Appends a vote and sets the study's status, if the status is still
    /// `expected`. Returns false (and changes nothing) if it was not.
    pub fn add_vote(
        &self,
        id: &str,
        vote: &VoteRecord,
        expected: &str,
        status: &str,
    ) -> Result<bool> {
        Ok(with_conn!(self.backend, |conn| conn.write_transaction(
            |conn| {
                let changed = diesel::update(
                    studies::table
                        .filter(studies::id.eq(id))
                        .filter(studies::status.eq(expected)),
                )
                .set(studies::status.eq(status))
                .execute(conn)?;
                if changed == 0 {
                    return diesel::QueryResult::Ok(false);
                }
                let position: i64 = votes::table
                    .filter(votes::study_id.eq(id))
                    .count()
                    .get_result(conn)?;
                diesel::insert_into(votes::table)
                    .values((
                        votes::study_id.eq(id),
                        votes::position.eq(position),
                        votes::member.eq(&vote.member),
                        votes::decision.eq(&vote.decision),
                        votes::note.eq(&vote.note),
                        votes::at.eq(&vote.at),
                    ))
                    .execute(conn)?;
                diesel::QueryResult::Ok(true)
            }
        )?))
    }

    /// Stores the latest result of one study query.
    pub fn save_result(&self, id: &str, query: &str, run_at: &str, json: &str) -> Result<()> {
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            diesel::insert_into(results::table)
                .values((
                    results::study_id.eq(id),
                    results::query.eq(query),
                    results::run_at.eq(run_at),
                    results::result_json.eq(json),
                ))
                .on_conflict((results::study_id, results::query))
                .do_update()
                .set((
                    results::run_at.eq(excluded(results::run_at)),
                    results::result_json.eq(excluded(results::result_json)),
                ))
                .execute(conn)?;
            diesel::update(studies::table.filter(studies::id.eq(id)))
                .set(studies::last_run.eq(query))
                .execute(conn)?;
            diesel::QueryResult::Ok(())
        })?);
        Ok(())
    }

    /// The latest result JSON of one study query.
    pub fn result(&self, id: &str, query: &str) -> Result<Option<String>> {
        Ok(with_conn!(self.backend, |conn| results::table
            .filter(results::study_id.eq(id))
            .filter(results::query.eq(query))
            .select(results::result_json)
            .first::<String>(conn)
            .optional()?))
    }

    /// Stores a training run's state, new or updated, and its `rounds`
    /// (round number, record) not stored yet, in one transaction: a round
    /// and the state it led to are stored together or not at all.
    pub fn save_training_run(&self, run: &TrainingRunRow, rounds: &[(u32, String)]) -> Result<()> {
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            diesel::insert_into(training_runs::table)
                .values((
                    training_runs::id.eq(&run.id),
                    training_runs::study_id.eq(&run.study_id),
                    training_runs::training.eq(&run.training),
                    training_runs::status.eq(&run.status),
                    training_runs::record_json.eq(&run.record_json),
                    training_runs::updated_at.eq(&run.updated_at),
                ))
                .on_conflict(training_runs::id)
                .do_update()
                .set((
                    training_runs::status.eq(excluded(training_runs::status)),
                    training_runs::record_json.eq(excluded(training_runs::record_json)),
                    training_runs::updated_at.eq(excluded(training_runs::updated_at)),
                ))
                .execute(conn)?;
            for (round, json) in rounds {
                diesel::insert_into(training_rounds::table)
                    .values((
                        training_rounds::run_id.eq(&run.id),
                        training_rounds::round.eq(i64::from(*round)),
                        training_rounds::record_json.eq(json),
                    ))
                    .on_conflict((training_rounds::run_id, training_rounds::round))
                    .do_nothing()
                    .execute(conn)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?);
        Ok(())
    }

    /// A training run's stored rounds (their records), in order.
    pub fn training_rounds(&self, run_id: &str) -> Result<Vec<String>> {
        Ok(with_conn!(self.backend, |conn| training_rounds::table
            .filter(training_rounds::run_id.eq(run_id))
            .order(training_rounds::round)
            .select(training_rounds::record_json)
            .load::<String>(conn)?))
    }

    /// One training run.
    pub fn training_run(&self, id: &str) -> Result<Option<TrainingRunRow>> {
        Ok(self.training_runs_where(Some(id), None)?.into_iter().next())
    }

    /// How many training runs there are.
    pub fn training_run_count(&self) -> Result<u64> {
        let n: i64 = with_conn!(self.backend, |conn| training_runs::table
            .count()
            .get_result(conn)?);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Training runs, all or only those with `status`, oldest first.
    pub fn training_runs(&self, status: Option<&str>) -> Result<Vec<TrainingRunRow>> {
        self.training_runs_where(None, status)
    }

    fn training_runs_where(
        &self,
        id: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<TrainingRunRow>> {
        type Row = (String, String, String, String, String, String);
        let rows: Vec<Row> = with_conn!(self.backend, |conn| {
            let mut q = training_runs::table
                .select((
                    training_runs::id,
                    training_runs::study_id,
                    training_runs::training,
                    training_runs::status,
                    training_runs::record_json,
                    training_runs::updated_at,
                ))
                .order(training_runs::id)
                .into_boxed();
            if let Some(status) = status {
                q = q.filter(training_runs::status.eq(status.to_owned()));
            }
            if let Some(id) = id {
                q = q.filter(training_runs::id.eq(id.to_owned()));
            }
            q.load(conn)?
        });
        Ok(rows
            .into_iter()
            .map(|r| TrainingRunRow {
                id: r.0,
                study_id: r.1,
                training: r.2,
                status: r.3,
                record_json: r.4,
                updated_at: r.5,
            })
            .collect())
    }
}

//! The node's database: FHIR resources kept verbatim plus the index tables
//! that aggregate queries run on, and the audit log.
//!
//! Key decision: one `Store` type over two diesel backends. SQLite (a file) is
//! the embedded default; a `postgres://` URL selects PostgreSQL. Each operation
//! is written once and expanded for both backends by [`with_conn!`], so the two
//! cannot drift apart, and the same test suite runs on both. Migrations are
//! embedded in the binary and applied when the store opens.

pub(crate) mod schema;

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel::upsert::excluded;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use schema::{audit_log, condition_codes, consents, observation_values, patients, resources};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Rows per multi-row INSERT: well under SQLite's bound-parameter limit.
const INSERT_CHUNK: usize = 500;

/// A storage failure. Messages may name tables and SQL errors, so the API
/// layer never forwards them to a remote caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open database {url}: {message}")]
    Open { url: String, message: String },
    #[error("cannot apply migrations: {0}")]
    Migrate(String),
    #[error("no database connection available: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Placeholder syntax of the backend, for the few hand-written SQL queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The `n`th (1-based) bind placeholder.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => "?".to_owned(),
            Dialect::Postgres => format!("${n}"),
        }
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
    Postgres(Pool<ConnectionManager<PgConnection>>),
}

/// The node's database. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect())
            .finish()
    }
}

/// Runs `$body` with `$conn` bound to a pooled connection of whichever
/// backend the store uses. The body is compiled once per backend.
macro_rules! with_conn {
    ($store:expr, |$conn:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let mut pooled = pool.get()?;
                let $conn: &mut SqliteConnection = &mut pooled;
                $body
            }
            Backend::Postgres(pool) => {
                let mut pooled = pool.get()?;
                let $conn: &mut PgConnection = &mut pooled;
                $body
            }
        }
    };
}

#[derive(Debug)]
struct SqlitePragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // WAL lets queries read while an import writes; case-sensitive LIKE
        // matches PostgreSQL's semantics for code prefixes.
        conn.batch_execute(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA busy_timeout = 10000; PRAGMA case_sensitive_like = ON; \
             PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// A URL with any password replaced, safe to print.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies pending
    /// migrations. `postgres://` and `postgresql://` URLs select PostgreSQL;
    /// anything else is a SQLite file path (optionally `sqlite://path`).
    pub fn open(url: &str) -> Result<Store> {
        let open_err = |message: String| Error::Open {
            url: redact_url(url),
            message,
        };
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = Pool::builder()
                .max_size(8)
                .connection_timeout(Duration::from_secs(10))
                .build(ConnectionManager::<PgConnection>::new(url))
                .map_err(|e| open_err(e.to_string()))?;
            let mut conn = pool.get().map_err(|e| open_err(e.to_string()))?;
            conn.run_pending_migrations(POSTGRES_MIGRATIONS)
                .map_err(|e| Error::Migrate(e.to_string()))?;
            Backend::Postgres(pool)
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
            }
            let pool = Pool::builder()
                .max_size(4)
                .connection_timeout(Duration::from_secs(10))
                .connection_customizer(Box::new(SqlitePragmas))
                .build(ConnectionManager::<SqliteConnection>::new(path))
                .map_err(|e| open_err(e.to_string()))?;
            let mut conn = pool.get().map_err(|e| open_err(e.to_string()))?;
            conn.run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| Error::Migrate(e.to_string()))?;
            Backend::Sqlite(pool)
        };
        Ok(Store { backend })
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Writes one batch atomically: either every resource and index row in
    /// it is stored, or none is.
    pub fn write_batch(&self, batch: &Batch) -> Result<()> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 formatting of now");
        with_conn!(self, |conn| conn.transaction(|conn| {
            for chunk in batch.resources.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|r| {
                        (
                            resources::resource_type.eq(&r.resource_type),
                            resources::id.eq(&r.id),
                            resources::version_id.eq(1i64),
                            resources::last_updated.eq(&now),
                            resources::patient_id.eq(r.patient_id.as_deref()),
                            resources::content.eq(&r.content),
                        )
                    })
                    .collect();
                diesel::insert_into(resources::table)
                    .values(rows)
                    .on_conflict((resources::resource_type, resources::id))
                    .do_update()
                    .set((
                        resources::version_id.eq(resources::version_id + 1),
                        resources::last_updated.eq(excluded(resources::last_updated)),
                        resources::patient_id.eq(excluded(resources::patient_id)),
                        resources::content.eq(excluded(resources::content)),
                    ))
                    .execute(conn)?;
            }
            // Index rows of every resource in the batch are replaced whole.
            let ids_of = |ty: &str| -> Vec<&str> {
                batch
                    .resources
                    .iter()
                    .filter(|r| r.resource_type == ty)
                    .map(|r| r.id.as_str())
                    .collect()
            };
            for ids in ids_of("Condition").chunks(INSERT_CHUNK) {
                diesel::delete(
                    condition_codes::table.filter(condition_codes::condition_id.eq_any(ids)),
                )
                .execute(conn)?;
            }
            for ids in ids_of("Observation").chunks(INSERT_CHUNK) {
                diesel::delete(
                    observation_values::table
                        .filter(observation_values::observation_id.eq_any(ids)),
                )
                .execute(conn)?;
            }
            for ids in ids_of("Consent").chunks(INSERT_CHUNK) {
                diesel::delete(consents::table.filter(consents::consent_id.eq_any(ids)))
                    .execute(conn)?;
            }
            for chunk in batch.patients.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|p| {
                        (
                            patients::id.eq(&p.id),
                            patients::gender.eq(&p.gender),
                            patients::birth_ymd.eq(p.birth_ymd),
                        )
                    })
                    .collect();
                diesel::insert_into(patients::table)
                    .values(rows)
                    .on_conflict(patients::id)
                    .do_update()
                    .set((
                        patients::gender.eq(excluded(patients::gender)),
                        patients::birth_ymd.eq(excluded(patients::birth_ymd)),
                    ))
                    .execute(conn)?;
            }
            for chunk in batch.conditions.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|c| {
                        (
                            condition_codes::condition_id.eq(&c.condition_id),
                            condition_codes::patient_id.eq(&c.patient_id),
                            condition_codes::system.eq(&c.system),
                            condition_codes::code.eq(&c.code),
                        )
                    })
                    .collect();
                diesel::insert_into(condition_codes::table)
                    .values(rows)
                    .execute(conn)?;
            }
            for chunk in batch.observations.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|o| {
                        (
                            observation_values::observation_id.eq(&o.observation_id),
                            observation_values::patient_id.eq(&o.patient_id),
                            observation_values::system.eq(&o.system),
                            observation_values::code.eq(&o.code),
                            observation_values::value.eq(o.value),
                            observation_values::unit.eq(o.unit.as_deref()),
                            observation_values::effective_at.eq(o.effective_at),
                        )
                    })
                    .collect();
                diesel::insert_into(observation_values::table)
                    .values(rows)
                    .execute(conn)?;
            }
            for chunk in batch.consents.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|c| {
                        (
                            consents::consent_id.eq(&c.consent_id),
                            consents::patient_id.eq(&c.patient_id),
                            consents::status.eq(&c.status),
                            consents::scope.eq(&c.scope),
                            consents::decision.eq(&c.decision),
                            consents::recorded_at.eq(c.recorded_at),
                        )
                    })
                    .collect();
                diesel::insert_into(consents::table)
                    .values(rows)
                    .execute(conn)?;
            }
            diesel::QueryResult::Ok(())
        }))?;
        Ok(())
    }

    /// Number of stored resources per resource type.
    pub fn resource_counts(&self) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = with_conn!(self, |conn| resources::table
            .group_by(resources::resource_type)
            .select((resources::resource_type, diesel::dsl::count_star()))
            .load(conn)?);
        Ok(rows
            .into_iter()
            .map(|(ty, n)| (ty, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// The stored JSON of one resource, if present.
    pub fn resource(&self, resource_type: &str, id: &str) -> Result<Option<String>> {
        Ok(with_conn!(self, |conn| resources::table
            .filter(resources::resource_type.eq(resource_type))
            .filter(resources::id.eq(id))
            .select(resources::content)
            .first::<String>(conn)
            .optional()?))
    }

    /// Runs a grouped count compiled by the engine.
    pub fn grouped_count(&self, sql: &str, binds: &[Bind]) -> Result<Vec<GroupCount>> {
        macro_rules! run {
            ($conn:ident, $db:ty) => {{
                let mut query = diesel::sql_query(sql).into_boxed::<$db>();
                for bind in binds {
                    query = match bind {
                        Bind::Text(s) => query.bind::<Text, _>(s.clone()),
                        Bind::Int(i) => query.bind::<BigInt, _>(*i),
                    };
                }
                query.load::<GroupCount>($conn)?
            }};
        }
        Ok(match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn: PooledConnection<_> = pool.get()?;
                let conn: &mut SqliteConnection = &mut conn;
                run!(conn, diesel::sqlite::Sqlite)
            }
            Backend::Postgres(pool) => {
                let mut conn: PooledConnection<_> = pool.get()?;
                let conn: &mut PgConnection = &mut conn;
                run!(conn, diesel::pg::Pg)
            }
        })
    }

    /// Appends one audit entry and returns its sequence number.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<i64> {
        Ok(with_conn!(self, |conn| diesel::insert_into(
            audit_log::table
        )
        .values((
            audit_log::at.eq(&entry.at),
            audit_log::caller.eq(&entry.caller),
            audit_log::caller_role.eq(&entry.caller_role),
            audit_log::caller_org.eq(&entry.caller_org),
            audit_log::study_id.eq(&entry.study_id),
            audit_log::capability_id.eq(&entry.capability_id),
            audit_log::action.eq(&entry.action),
            audit_log::decision.eq(&entry.decision),
            audit_log::reason.eq(&entry.reason),
            audit_log::query_sha256.eq(&entry.query_sha256),
            audit_log::result_cells.eq(entry.result_cells),
        ))
        .returning(audit_log::seq)
        .get_result::<i64>(conn)?))
    }

    /// The whole audit log in order.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            i64,
        );
        let rows: Vec<Row> = with_conn!(self, |conn| audit_log::table
            .order(audit_log::seq)
            .select((
                audit_log::at,
                audit_log::caller,
                audit_log::caller_role,
                audit_log::caller_org,
                audit_log::study_id,
                audit_log::capability_id,
                audit_log::action,
                audit_log::decision,
                audit_log::reason,
                audit_log::query_sha256,
                audit_log::result_cells,
            ))
            .load(conn)?);
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                at: r.0,
                caller: r.1,
                caller_role: r.2,
                caller_org: r.3,
                study_id: r.4,
                capability_id: r.5,
                action: r.6,
                decision: r.7,
                reason: r.8,
                query_sha256: r.9,
                result_cells: r.10,
            })
            .collect())
    }
}

/// A value bound to a placeholder of a hand-written query.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Int(i64),
}

/// One row of a grouped count: the group's key columns and its size.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct GroupCount {
    #[diesel(sql_type = Text)]
    pub k_sex: String,
    #[diesel(sql_type = BigInt)]
    pub k_band: i64,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// Resources and their index rows, written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub resources: Vec<StoredResource>,
    pub patients: Vec<PatientRow>,
    pub conditions: Vec<ConditionCode>,
    pub observations: Vec<ObservationValue>,
    pub consents: Vec<ConsentRow>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub patient_id: Option<String>,
    /// The resource's JSON as received.
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct PatientRow {
    pub id: String,
    pub gender: String,
    pub birth_ymd: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ConditionCode {
    pub condition_id: String,
    pub patient_id: String,
    pub system: String,
    pub code: String,
}

#[derive(Debug, Clone)]
pub struct ObservationValue {
    pub observation_id: String,
    pub patient_id: String,
    pub system: String,
    pub code: String,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub effective_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub consent_id: String,
    pub patient_id: String,
    pub status: String,
    pub scope: String,
    pub decision: String,
    pub recorded_at: i64,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: String,
    pub caller: String,
    pub caller_role: String,
    pub caller_org: String,
    pub study_id: String,
    pub capability_id: String,
    pub action: String,
    pub decision: String,
    pub reason: String,
    pub query_sha256: String,
    pub result_cells: i64,
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_appear_in_printed_urls() {
        assert_eq!(
            redact_url("postgres://ghx:s3cret@db:5432/node"),
            "postgres://ghx:***@db:5432/node"
        );
        assert_eq!(
            redact_url("postgres://ghx@db/node"),
            "postgres://ghx@db/node"
        );
        assert_eq!(redact_url("/var/lib/ghx/node.db"), "/var/lib/ghx/node.db");
    }
}

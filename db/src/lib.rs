//! One diesel database over two backends, for the node's and the
//! coordinator's stores.
//!
//! Key decision: SQLite (a file) is the embedded default and a `postgres://`
//! URL selects PostgreSQL; each store operation is written once and
//! expanded for both backends by [`with_conn!`], so the backends cannot
//! drift apart and one test suite runs on both. Migrations are embedded in
//! each store's crate and applied when the database opens.

#![forbid(unsafe_code)]

pub mod audit;
pub mod witnesses;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};

/// A storage failure. Messages may name tables and SQL errors, so services
/// never forward them to a remote caller.
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

/// Placeholder syntax of the backend, for hand-written SQL.
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

/// A connection pool of one backend.
#[derive(Clone)]
pub enum Backend {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
    Postgres(Pool<ConnectionManager<PgConnection>>),
}

impl Backend {
    pub fn dialect(&self) -> Dialect {
        match self {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dialect())
    }
}

/// The migrations of one store, per backend.
pub struct Migrations {
    pub sqlite: EmbeddedMigrations,
    pub postgres: EmbeddedMigrations,
}

/// A transaction that writes: on SQLite it takes the write lock when it
/// begins (`BEGIN IMMEDIATE`), so it waits its turn behind other writers
/// (the busy timeout). A deferred one that read first and then wrote while
/// another connection had written failed at once with "database is
/// locked" (WAL cannot upgrade a stale read snapshot), which a node
/// answering a query while its audit log or witnesses were written hit.
/// On PostgreSQL, an ordinary transaction.
pub trait WriteTransaction: diesel::Connection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>;
}

impl WriteTransaction for SqliteConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>,
    {
        self.immediate_transaction(f)
    }
}

impl WriteTransaction for diesel::pg::PgConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>,
    {
        diesel::Connection::transaction(self, f)
    }
}

/// Runs `$body` with `$conn` bound to a pooled connection of whichever
/// backend `$backend` (a [`Backend`]) uses. The body is compiled once per
/// backend; pool errors convert into the caller's error type with `?`.
#[macro_export]
macro_rules! with_conn {
    ($backend:expr, |$conn:ident| $body:expr) => {
        match &$backend {
            $crate::Backend::Sqlite(pool) => {
                let mut pooled = pool.get()?;
                let $conn: &mut ::diesel::sqlite::SqliteConnection = &mut pooled;
                $body
            }
            $crate::Backend::Postgres(pool) => {
                let mut pooled = pool.get()?;
                let $conn: &mut ::diesel::pg::PgConnection = &mut pooled;
                $body
            }
        }
    };
}

#[derive(Debug)]
struct SqlitePragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // WAL lets readers proceed while a writer writes; case-sensitive LIKE
        // matches PostgreSQL's semantics for code prefixes.
        conn.batch_execute(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA busy_timeout = 10000; PRAGMA case_sensitive_like = ON; \
             PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Whether the database answers a trivial query (readiness checks).
pub fn ping(backend: &Backend) -> Result<()> {
    use diesel::RunQueryDsl;
    with_conn!(backend, |conn| diesel::sql_query("SELECT 1")
        .execute(conn)?);
    Ok(())
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

/// Opens (creating if needed) the database at `url` and applies pending
/// migrations. `postgres://` and `postgresql://` URLs select PostgreSQL;
/// anything else is a SQLite file path (optionally `sqlite://path`).
pub fn open(url: &str, migrations: Migrations) -> Result<Backend, Error> {
    let backend = connect(url, true)?;
    match &backend {
        Backend::Postgres(pool) => pool
            .get()?
            .run_pending_migrations(migrations.postgres)
            .map(|_| ())
            .map_err(|e| Error::Migrate(e.to_string()))?,
        Backend::Sqlite(pool) => pool
            .get()?
            .run_pending_migrations(migrations.sqlite)
            .map(|_| ())
            .map_err(|e| Error::Migrate(e.to_string()))?,
    }
    Ok(backend)
}

/// Opens an existing database as it is: no migrations, no new file. For
/// tools that read a node's or the coordinator's database, such as
/// `ghx audit verify`, which must not change what it checks.
pub fn open_existing(url: &str) -> Result<Backend, Error> {
    connect(url, false)
}

fn connect(url: &str, create: bool) -> Result<Backend, Error> {
    let open_err = |message: String| Error::Open {
        url: redact_url(url),
        message,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = Pool::builder()
            .max_size(8)
            .connection_timeout(Duration::from_secs(10))
            .build(ConnectionManager::<PgConnection>::new(url))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Backend::Postgres(pool))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if create {
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
            }
        } else if !std::path::Path::new(path).is_file() {
            return Err(open_err("no such database file".to_owned()));
        }
        // An SQLite connection is a file handle that cannot go stale the
        // way a server's socket can: no `SELECT 1` before every use.
        let pool = Pool::builder()
            .max_size(4)
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(10))
            .connection_customizer(Box::new(SqlitePragmas))
            .build(ConnectionManager::<SqliteConnection>::new(path))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Backend::Sqlite(pool))
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, connect, redact_url};

    #[test]
    fn sqlite_connections_are_not_pinged_on_every_checkout() {
        let dir = std::env::temp_dir().join(format!("ghx-db-pool-{}", std::process::id()));
        let path = dir.join("pool.db");
        let backend = connect(path.to_str().expect("a UTF-8 path"), true).unwrap();
        match &backend {
            Backend::Sqlite(pool) => assert!(!pool.test_on_check_out()),
            Backend::Postgres(_) => panic!("a file path opens SQLite"),
        }
        drop(backend);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_write_transaction_waits_for_a_writer_that_came_between_its_read_and_write() {
        use super::WriteTransaction;
        use diesel::connection::SimpleConnection;
        use diesel::prelude::*;
        let dir = std::env::temp_dir().join(format!("ghx-db-tx-{}", std::process::id()));
        let path = dir.join("tx.db");
        let backend = connect(path.to_str().expect("a UTF-8 path"), true).unwrap();
        let Backend::Sqlite(pool) = &backend else {
            panic!("a file path opens SQLite")
        };
        pool.get()
            .unwrap()
            .batch_execute("CREATE TABLE t (n INTEGER NOT NULL)")
            .unwrap();
        // Read, let another connection try to write, then write. Deferred,
        // the other write landed in between and this one failed at once
        // with "database is locked"; begun IMMEDIATE, the other waits.
        let mut conn = pool.get().unwrap();
        let other = pool.clone();
        let outcome = conn.write_transaction(|conn| {
            diesel::sql_query("SELECT n FROM t").execute(conn)?;
            let writer = std::thread::spawn(move || {
                other
                    .get()
                    .unwrap()
                    .batch_execute("INSERT INTO t (n) VALUES (1)")
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            diesel::sql_query("INSERT INTO t (n) VALUES (2)").execute(conn)?;
            diesel::QueryResult::Ok(writer)
        });
        let writer = outcome.expect("the transaction's own write");
        writer.join().unwrap().expect("the other write, after it");
        drop(conn);
        drop(backend);
        let _ = std::fs::remove_dir_all(dir);
    }

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

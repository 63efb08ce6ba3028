//! One test written once, run on both backends: a fresh empty database on
//! SQLite or on the real PostgreSQL ([`Backend`]), and the [`suite!`]
//! macro that instantiates each test function for both.
//!
//! [`suite!`]: crate::suite

use crate::postgres::TestDatabase;

/// A fresh empty database on one backend, and what keeps it alive: a
/// temporary directory (also the test's scratch space) and, on PostgreSQL,
/// the throwaway database, dropped with this value.
pub struct Backend {
    /// What `Store::open` and `CoordinatorStore::open` take: a SQLite path
    /// or a postgres:// URL.
    pub url: String,
    pub dir: tempfile::TempDir,
    pub pg: Option<TestDatabase>,
}

impl Backend {
    /// A SQLite database file named `file` in a new temporary directory.
    pub fn sqlite(file: &str) -> Backend {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Backend {
            url: dir.path().join(file).display().to_string(),
            dir,
            pg: None,
        }
    }

    /// A new database on the test PostgreSQL server
    /// ([`crate::postgres::admin_url`]).
    pub fn postgres() -> Backend {
        let db = TestDatabase::create();
        Backend {
            url: db.url.clone(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            pg: Some(db),
        }
    }
}

/// Instantiates each named test function (taking a fixture) twice, as
/// `sqlite::name` and `postgres::name`, with the fixture the calling module's
/// `sqlite()` and `postgres()` functions build.
#[macro_export]
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::postgres()) } )*
        }
    };
}

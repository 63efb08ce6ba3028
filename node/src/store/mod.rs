//! The node's database: FHIR resources kept verbatim plus the index tables
//! that aggregate queries run on, and the audit log.
//!
//! Key decision: one `Store` type over two diesel backends (see `ghx-db`).
//! SQLite (a file) is the embedded default; a `postgres://` URL selects
//! PostgreSQL. Each operation is written once and expanded for both backends
//! by `ghx_db::with_conn!`, so the two cannot drift apart, and the same test
//! suite runs on both. Bulk rows are the one place the backends differ in
//! kind: `insert_rows!` copies them in with `COPY FROM` on PostgreSQL. Migrations are embedded in the binary and applied when
//! the store opens.
//!
//! One `impl Store` per table family, each in its own file: `resources`
//! (FHIR resources, index tables, import checkpoints, the code map),
//! `consent` (inputs and decided contexts), `views` (materialised view
//! values), `ledger` (capability uses, revocations, privacy budget,
//! participant sets), `cohorts` (running compiled queries; released
//! cohorts), `released` (released cells and fixed bounds), `lineage`
//! (training runs' seals and steps) and `exchange` (a resident's records
//! and the disclosures made of them). This file opens the store and holds
//! the audit log.

/// Inserts a `Vec` of rows: on PostgreSQL with one binary `COPY FROM`
/// (no statement to parse and plan per chunk: what bulk import is bound by,
/// issue 40), on SQLite in multi-row INSERTs of [`INSERT_CHUNK`] rows. The
/// connection's type decides; both arms are compiled for each backend.
macro_rules! insert_rows {
    ($conn:expr, $table:expr, $rows:expr) => {
        match (&mut *$conn as &mut dyn ::std::any::Any).downcast_mut::<::diesel::pg::PgConnection>()
        {
            Some(pg) => {
                if !$rows.is_empty() {
                    ::diesel::copy_from($table)
                        .from_insertable($rows)
                        .execute(pg)?;
                }
            }
            None => {
                for chunk in $rows.chunks(INSERT_CHUNK) {
                    diesel::insert_into($table)
                        .values(chunk.to_vec())
                        .execute($conn)?;
                }
            }
        }
    };
}

mod cohorts;
mod consent;
mod exchange;
mod ledger;
mod lineage;
mod released;
mod resources;
pub(crate) mod schema;
mod views;

pub use cohorts::{Bind, CodeRow, GroupCount, Member};
pub use consent::{ConsentInputs, Decision, StoredDecision};
pub use exchange::{Disclosure, PatientResource};
pub use ledger::{BudgetScope, ChargeOutcome, PrivacyCharge, Spent};
pub use lineage::{Lineage, LineageStep, RunKey};
pub use released::NewReleasedCell;
pub use resources::{
    Batch, BatchOutcome, Checkpoint, CodeMapping, ConditionCode, ConsentRow, EncounterRow,
    IndexedResource, MedicationCode, ObservationValue, PatientRow, ResourceKey, StoredResource,
    StoredVersion,
};
pub use views::ViewRow;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use ghx_audit::now_rfc3339;

/// The `node_state` key of the consent generation.
const CONSENT_GENERATION: &str = "consent_generation";
/// The `node_state` key bumped by every import batch that writes anything.
const DATA_GENERATION: &str = "data_generation";

/// Consent contexts kept at once; older ones are pruned when a new one is built.
const KEEP_CONSENT_CONTEXTS: i64 = 32;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Rows per multi-row INSERT: well under SQLite's bound-parameter limit.
const INSERT_CHUNK: usize = 500;

pub use ghx_db::{Error, Result};

use ghx_db::Backend;
pub use ghx_db::{Dialect, redact_url};

/// The node's database. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    audit: ghx_db::audit::AuditLog,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect())
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies pending
    /// migrations. `postgres://` and `postgresql://` URLs select PostgreSQL;
    /// anything else is a SQLite file path (optionally `sqlite://path`).
    pub fn open(url: &str) -> Result<Store> {
        let backend = ghx_db::open(
            url,
            ghx_db::Migrations {
                sqlite: SQLITE_MIGRATIONS,
                postgres: POSTGRES_MIGRATIONS,
            },
        )?;
        let audit = ghx_db::audit::AuditLog::open(backend.clone())?;
        Ok(Store { backend, audit })
    }

    /// Whether the database answers (readiness).
    pub fn ping(&self) -> Result<()> {
        ghx_db::ping(&self.backend)
    }

    /// The node's audit log (unsigned; the api signs its checkpoints).
    pub fn audit_log(&self) -> &ghx_db::audit::AuditLog {
        &self.audit
    }

    pub fn dialect(&self) -> Dialect {
        self.backend.dialect()
    }

    /// Appends one audit entry, unsigned (tests and tools; the api appends
    /// through its signing [`ghx_db::audit::AuditLog`]). Returns its number.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<i64, ghx_db::audit::Error> {
        Ok(self.audit.append(entry)?.seq)
    }

    /// The whole audit log in order.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>> {
        self.audit.entries()
    }
}

/// One line of the audit log.
pub use ghx_audit::Entry as AuditEntry;

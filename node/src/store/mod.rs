//! The node's database: FHIR resources kept verbatim plus the index tables
//! that aggregate queries run on, and the audit log.
//!
//! Key decision: one `Store` type over two diesel backends (see `ghx-db`).
//! SQLite (a file) is the embedded default; a `postgres://` URL selects
//! PostgreSQL. Each operation is written once and expanded for both backends
//! by `ghx_db::with_conn!`, so the two cannot drift apart, and the same test
//! suite runs on both. Migrations are embedded in the binary and applied when
//! the store opens.

mod lineage;
mod released;
pub(crate) mod schema;

pub use lineage::{Lineage, LineageStep, RunKey};
pub use released::NewReleasedCell;

use std::collections::{BTreeMap, HashMap};

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::PooledConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel::upsert::excluded;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};

use schema::{
    capability_uses, code_map, condition_codes, consent_contexts, consent_eligibility, consents,
    encounters, import_checkpoints, medication_codes, node_state, observation_values, patients,
    privacy_budget, privacy_charges, released_cohorts, resource_history, resources,
    revoked_studies, sum_participants, view_materialisations, view_values,
};

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

use ghx_db::{Backend, WriteTransaction, with_conn};
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

macro_rules! insert_rows {
    ($conn:expr, $table:expr, $rows:expr) => {
        for chunk in $rows.chunks(INSERT_CHUNK) {
            diesel::insert_into($table)
                .values(chunk.to_vec())
                .execute($conn)?;
        }
    };
}

/// Inserts the index rows of `$items` (whose old rows are already gone).
/// A macro, like [`with_conn!`], so it expands for each concrete backend.
macro_rules! insert_index_rows {
    ($conn:expr, $items:expr) => {{
        let patients_rows: Vec<_> = $items
            .iter()
            .filter_map(|i| i.patient.as_ref())
            .map(|p| {
                (
                    patients::id.eq(&p.id),
                    patients::gender.eq(&p.gender),
                    patients::birth_ymd.eq(p.birth_ymd),
                )
            })
            .collect();
        insert_rows!($conn, patients::table, patients_rows);
        let conditions: Vec<_> = $items
            .iter()
            .flat_map(|i| &i.conditions)
            .map(|c| {
                (
                    condition_codes::condition_id.eq(&c.condition_id),
                    condition_codes::patient_id.eq(&c.patient_id),
                    condition_codes::system.eq(&c.system),
                    condition_codes::code.eq(&c.code),
                    condition_codes::onset_at.eq(c.onset_at),
                    condition_codes::recorded_at.eq(c.recorded_at),
                )
            })
            .collect();
        insert_rows!($conn, condition_codes::table, conditions);
        let observations: Vec<_> = $items
            .iter()
            .flat_map(|i| &i.observations)
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
        insert_rows!($conn, observation_values::table, observations);
        let encounter_rows: Vec<_> = $items
            .iter()
            .filter_map(|i| i.encounter.as_ref())
            .map(|e| {
                (
                    encounters::encounter_id.eq(&e.encounter_id),
                    encounters::patient_id.eq(&e.patient_id),
                    encounters::class_code.eq(&e.class_code),
                    encounters::start_at.eq(e.start_at),
                    encounters::end_at.eq(e.end_at),
                )
            })
            .collect();
        insert_rows!($conn, encounters::table, encounter_rows);
        let medications: Vec<_> = $items
            .iter()
            .flat_map(|i| &i.medications)
            .map(|m| {
                (
                    medication_codes::medication_request_id.eq(&m.medication_request_id),
                    medication_codes::patient_id.eq(&m.patient_id),
                    medication_codes::system.eq(&m.system),
                    medication_codes::code.eq(&m.code),
                    medication_codes::authored_at.eq(m.authored_at),
                )
            })
            .collect();
        insert_rows!($conn, medication_codes::table, medications);
        let consent_rows: Vec<_> = $items
            .iter()
            .filter_map(|i| i.consent.as_ref())
            .map(|c| {
                (
                    consents::consent_id.eq(&c.consent_id),
                    consents::patient_id.eq(&c.patient_id),
                    consents::status.eq(&c.status),
                    consents::scope.eq(&c.scope),
                    consents::decision.eq(&c.decision),
                    consents::recorded_at.eq(c.recorded_at),
                    consents::provision.eq(&c.provision),
                )
            })
            .collect();
        insert_rows!($conn, consents::table, consent_rows);
    }};
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

    /// Writes one batch atomically: every resource, deletion, index row and
    /// the checkpoint in it are stored, or none is. Resources whose content
    /// is unchanged are left alone (no new version); changed ones keep their
    /// previous version in `resource_history`.
    pub fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            let mut outcome = BatchOutcome::default();
            // What is stored now, for every resource the batch touches.
            let mut existing: HashMap<(String, String), (i64, String)> = HashMap::new();
            let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for item in &batch.items {
                by_type
                    .entry(&item.resource.resource_type)
                    .or_default()
                    .push(&item.resource.id);
            }
            for key in &batch.deletes {
                by_type.entry(&key.resource_type).or_default().push(&key.id);
            }
            for (ty, ids) in &by_type {
                for chunk in ids.chunks(INSERT_CHUNK) {
                    let rows: Vec<(String, i64, String)> = resources::table
                        .filter(resources::resource_type.eq(ty))
                        .filter(resources::id.eq_any(chunk))
                        .select((
                            resources::id,
                            resources::version_id,
                            resources::content_sha256,
                        ))
                        .load(conn)?;
                    for (id, version, sha) in rows {
                        existing.insert(((*ty).to_owned(), id), (version, sha));
                    }
                }
            }
            // Resources that are new here may have been deleted before; their
            // next version follows the tombstone.
            let mut last_deleted: HashMap<(String, String), i64> = HashMap::new();
            for (ty, ids) in &by_type {
                let fresh: Vec<&str> = ids
                    .iter()
                    .copied()
                    .filter(|id| !existing.contains_key(&((*ty).to_owned(), (*id).to_owned())))
                    .collect();
                for chunk in fresh.chunks(INSERT_CHUNK) {
                    let rows: Vec<(String, Option<i64>)> = resource_history::table
                        .filter(resource_history::resource_type.eq(ty))
                        .filter(resource_history::id.eq_any(chunk))
                        .group_by(resource_history::id)
                        .select((
                            resource_history::id,
                            diesel::dsl::max(resource_history::version_id),
                        ))
                        .load(conn)?;
                    for (id, version) in rows {
                        last_deleted.insert(((*ty).to_owned(), id), version.unwrap_or(0));
                    }
                }
            }

            let mut writes: Vec<(&IndexedResource, i64)> = Vec::new();
            let mut superseded: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for item in &batch.items {
                let r = &item.resource;
                let key = (r.resource_type.clone(), r.id.clone());
                match existing.get(&key) {
                    Some((_, sha)) if *sha == r.content_sha256 && !batch.reindex => {
                        outcome.unchanged += 1
                    }
                    Some((version, _)) => {
                        if batch.reindex {
                            writes.push((item, *version));
                        } else {
                            superseded.entry(&r.resource_type).or_default().push(&r.id);
                            writes.push((item, version + 1));
                            outcome.updated += 1;
                        }
                    }
                    None => {
                        writes.push((item, last_deleted.get(&key).copied().unwrap_or(0) + 1));
                        outcome.created += 1;
                    }
                }
            }
            let mut deleted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            let mut tombstones = Vec::new();
            for key in &batch.deletes {
                if let Some((version, _)) =
                    existing.get(&(key.resource_type.clone(), key.id.clone()))
                {
                    deleted.entry(&key.resource_type).or_default().push(&key.id);
                    superseded
                        .entry(&key.resource_type)
                        .or_default()
                        .push(&key.id);
                    tombstones.push((key, version + 1));
                    outcome.deleted += 1;
                } else {
                    outcome.not_found += 1;
                }
            }

            // Keep superseded versions, then write the new ones.
            for (ty, ids) in &superseded {
                for chunk in ids.chunks(INSERT_CHUNK) {
                    diesel::insert_into(resource_history::table)
                        .values(
                            resources::table
                                .filter(resources::resource_type.eq(ty))
                                .filter(resources::id.eq_any(chunk))
                                .select((
                                    resources::resource_type,
                                    resources::id,
                                    resources::version_id,
                                    resources::last_updated,
                                    resources::content.nullable(),
                                )),
                        )
                        .into_columns((
                            resource_history::resource_type,
                            resource_history::id,
                            resource_history::version_id,
                            resource_history::last_updated,
                            resource_history::content,
                        ))
                        .execute(conn)?;
                }
            }
            for chunk in tombstones.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|(key, version)| {
                        (
                            resource_history::resource_type.eq(&key.resource_type),
                            resource_history::id.eq(&key.id),
                            resource_history::version_id.eq(*version),
                            resource_history::last_updated.eq(&now),
                            resource_history::content.eq(None::<String>),
                        )
                    })
                    .collect();
                diesel::insert_into(resource_history::table)
                    .values(rows)
                    .execute(conn)?;
            }
            for (ty, ids) in &deleted {
                for chunk in ids.chunks(INSERT_CHUNK) {
                    diesel::delete(
                        resources::table
                            .filter(resources::resource_type.eq(ty))
                            .filter(resources::id.eq_any(chunk)),
                    )
                    .execute(conn)?;
                }
            }
            if !batch.reindex {
                for chunk in writes.chunks(INSERT_CHUNK) {
                    let rows: Vec<_> = chunk
                        .iter()
                        .map(|(item, version)| {
                            let r = &item.resource;
                            (
                                resources::resource_type.eq(&r.resource_type),
                                resources::id.eq(&r.id),
                                resources::version_id.eq(*version),
                                resources::last_updated.eq(&now),
                                resources::content_sha256.eq(&r.content_sha256),
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
                            resources::version_id.eq(excluded(resources::version_id)),
                            resources::last_updated.eq(excluded(resources::last_updated)),
                            resources::content_sha256.eq(excluded(resources::content_sha256)),
                            resources::patient_id.eq(excluded(resources::patient_id)),
                            resources::content.eq(excluded(resources::content)),
                        ))
                        .execute(conn)?;
                }
            }

            // Index rows of every written or deleted resource are replaced whole.
            // Only resources stored before this batch can have index rows:
            // deleting by id for new ones would cost a lookup per row for
            // nothing (on PostgreSQL, before statistics exist, a scan).
            let mut stale: BTreeMap<&str, Vec<&str>> = deleted.clone();
            let mut touched: std::collections::BTreeSet<&str> = deleted.keys().copied().collect();
            for (item, _) in &writes {
                let r = &item.resource;
                touched.insert(&r.resource_type);
                if batch.reindex || existing.contains_key(&(r.resource_type.clone(), r.id.clone()))
                {
                    stale.entry(&r.resource_type).or_default().push(&r.id);
                }
            }
            for (ty, ids) in &stale {
                for chunk in ids.chunks(INSERT_CHUNK) {
                    match *ty {
                        "Patient" => {
                            diesel::delete(patients::table.filter(patients::id.eq_any(chunk)))
                                .execute(conn)?
                        }
                        "Condition" => diesel::delete(
                            condition_codes::table
                                .filter(condition_codes::condition_id.eq_any(chunk)),
                        )
                        .execute(conn)?,
                        "Observation" => diesel::delete(
                            observation_values::table
                                .filter(observation_values::observation_id.eq_any(chunk)),
                        )
                        .execute(conn)?,
                        "Encounter" => diesel::delete(
                            encounters::table.filter(encounters::encounter_id.eq_any(chunk)),
                        )
                        .execute(conn)?,
                        "MedicationRequest" => diesel::delete(
                            medication_codes::table
                                .filter(medication_codes::medication_request_id.eq_any(chunk)),
                        )
                        .execute(conn)?,
                        "Consent" => diesel::delete(
                            consents::table.filter(consents::consent_id.eq_any(chunk)),
                        )
                        .execute(conn)?,
                        _ => 0,
                    };
                }
            }
            let items: Vec<&IndexedResource> = writes.iter().map(|(item, _)| *item).collect();
            insert_index_rows!(conn, &items);
            // Consent decisions depend on patients and consents: any change
            // to either retires every decision computed before this batch.
            // Materialised views are rebuilt after any change.
            if !items.is_empty() || !deleted.is_empty() {
                diesel::update(node_state::table.filter(node_state::key.eq(DATA_GENERATION)))
                    .set(node_state::value.eq(node_state::value + 1))
                    .execute(conn)?;
            }
            if touched.contains("Patient") || touched.contains("Consent") {
                diesel::update(node_state::table.filter(node_state::key.eq(CONSENT_GENERATION)))
                    .set(node_state::value.eq(node_state::value + 1))
                    .execute(conn)?;
            }

            if let Some(cp) = &batch.checkpoint {
                diesel::insert_into(import_checkpoints::table)
                    .values((
                        import_checkpoints::source.eq(&cp.source),
                        import_checkpoints::fingerprint.eq(&cp.fingerprint),
                        import_checkpoints::lines_committed.eq(cp.lines_committed),
                        import_checkpoints::finished.eq(cp.finished),
                        import_checkpoints::updated_at.eq(&now),
                    ))
                    .on_conflict(import_checkpoints::source)
                    .do_update()
                    .set((
                        import_checkpoints::fingerprint
                            .eq(excluded(import_checkpoints::fingerprint)),
                        import_checkpoints::lines_committed
                            .eq(excluded(import_checkpoints::lines_committed)),
                        import_checkpoints::finished.eq(excluded(import_checkpoints::finished)),
                        import_checkpoints::updated_at.eq(excluded(import_checkpoints::updated_at)),
                    ))
                    .execute(conn)?;
            }
            diesel::QueryResult::Ok(outcome)
        }))
        .map_err(Error::from)
    }

    /// The checkpoint recorded for an import source, if any.
    pub fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        let row: Option<(String, String, i64, bool)> =
            with_conn!(self.backend, |conn| import_checkpoints::table
                .filter(import_checkpoints::source.eq(source))
                .select((
                    import_checkpoints::source,
                    import_checkpoints::fingerprint,
                    import_checkpoints::lines_committed,
                    import_checkpoints::finished,
                ))
                .first(conn)
                .optional()?);
        Ok(row.map(
            |(source, fingerprint, lines_committed, finished)| Checkpoint {
                source,
                fingerprint,
                lines_committed,
                finished,
            },
        ))
    }

    /// All code mappings, keyed by (source system, source code).
    pub fn code_map(&self) -> Result<Vec<CodeMapping>> {
        let rows: Vec<(String, String, String, String)> =
            with_conn!(self.backend, |conn| code_map::table
                .select((
                    code_map::source_system,
                    code_map::source_code,
                    code_map::target_system,
                    code_map::target_code,
                ))
                .order((code_map::source_system, code_map::source_code))
                .load(conn)?);
        Ok(rows
            .into_iter()
            .map(
                |(source_system, source_code, target_system, target_code)| CodeMapping {
                    source_system,
                    source_code,
                    target_system,
                    target_code,
                },
            )
            .collect())
    }

    /// Replaces every mapping from `source_system` to `target_system` in
    /// one transaction.
    pub fn replace_code_map(
        &self,
        source_system: &str,
        target_system: &str,
        mappings: &[CodeMapping],
    ) -> Result<()> {
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            diesel::delete(
                code_map::table
                    .filter(code_map::source_system.eq(source_system))
                    .filter(code_map::target_system.eq(target_system)),
            )
            .execute(conn)?;
            for chunk in mappings.chunks(INSERT_CHUNK) {
                let rows: Vec<_> = chunk
                    .iter()
                    .map(|m| {
                        (
                            code_map::source_system.eq(&m.source_system),
                            code_map::source_code.eq(&m.source_code),
                            code_map::target_system.eq(&m.target_system),
                            code_map::target_code.eq(&m.target_code),
                        )
                    })
                    .collect();
                diesel::insert_into(code_map::table)
                    .values(rows)
                    .execute(conn)?;
            }
            diesel::QueryResult::Ok(())
        }))?;
        Ok(())
    }

    /// Current resources in (type, id) order, after `after`, at most `limit`.
    pub fn resources_page(
        &self,
        resource_type: Option<&str>,
        after: Option<&ResourceKey>,
        limit: i64,
    ) -> Result<Vec<StoredVersion>> {
        type Row = (String, String, i64, String, String);
        let rows: Vec<Row> = with_conn!(self.backend, |conn| {
            let mut query = resources::table
                .select((
                    resources::resource_type,
                    resources::id,
                    resources::version_id,
                    resources::last_updated,
                    resources::content,
                ))
                .order((resources::resource_type, resources::id))
                .limit(limit)
                .into_boxed();
            if let Some(ty) = resource_type {
                query = query.filter(resources::resource_type.eq(ty.to_owned()));
            }
            if let Some(key) = after {
                query = query.filter(
                    resources::resource_type.gt(key.resource_type.clone()).or(
                        resources::resource_type
                            .eq(key.resource_type.clone())
                            .and(resources::id.gt(key.id.clone())),
                    ),
                );
            }
            query.load(conn)?
        });
        Ok(rows
            .into_iter()
            .map(
                |(resource_type, id, version_id, last_updated, content)| StoredVersion {
                    key: ResourceKey { resource_type, id },
                    version_id,
                    last_updated,
                    content,
                },
            )
            .collect())
    }

    /// Every stored version of a resource, oldest first; `None` content marks
    /// a deletion.
    pub fn history(&self, resource_type: &str, id: &str) -> Result<Vec<(i64, Option<String>)>> {
        let mut versions: Vec<(i64, Option<String>)> =
            with_conn!(self.backend, |conn| resource_history::table
                .filter(resource_history::resource_type.eq(resource_type))
                .filter(resource_history::id.eq(id))
                .select((resource_history::version_id, resource_history::content))
                .load(conn)?);
        let current: Option<(i64, String)> = with_conn!(self.backend, |conn| resources::table
            .filter(resources::resource_type.eq(resource_type))
            .filter(resources::id.eq(id))
            .select((resources::version_id, resources::content))
            .first(conn)
            .optional()?);
        versions.extend(current.map(|(v, c)| (v, Some(c))));
        versions.sort_by_key(|(v, _)| *v);
        Ok(versions)
    }

    /// Number of stored resources per resource type.
    pub fn resource_counts(&self) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = with_conn!(self.backend, |conn| resources::table
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
        Ok(with_conn!(self.backend, |conn| resources::table
            .filter(resources::resource_type.eq(resource_type))
            .filter(resources::id.eq(id))
            .select(resources::content)
            .first::<String>(conn)
            .optional()?))
    }

    /// The current data generation: bumped by every import batch that
    /// writes a resource.
    pub fn data_generation(&self) -> Result<i64> {
        Ok(with_conn!(self.backend, |conn| node_state::table
            .filter(node_state::key.eq(DATA_GENERATION))
            .select(node_state::value)
            .first::<i64>(conn)?))
    }

    /// The data generation a view was last materialised at.
    pub fn view_generation(&self, view_sha256: &str) -> Result<Option<i64>> {
        Ok(with_conn!(self.backend, |conn| {
            view_materialisations::table
                .filter(view_materialisations::view_sha256.eq(view_sha256))
                .select(view_materialisations::generation)
                .first::<i64>(conn)
                .optional()?
        }))
    }

    /// Replaces a view's materialised (patient, value) rows, in one
    /// transaction, and records the data generation they reflect.
    pub fn replace_view_values(
        &self,
        view_sha256: &str,
        generation: i64,
        rows: &[(String, f64)],
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            diesel::delete(view_values::table.filter(view_values::view_sha256.eq(view_sha256)))
                .execute(conn)?;
            for chunk in rows.chunks(5000) {
                let values: Vec<_> = chunk
                    .iter()
                    .map(|(patient, value)| {
                        (
                            view_values::view_sha256.eq(view_sha256),
                            view_values::patient_id.eq(patient),
                            view_values::value.eq(*value),
                        )
                    })
                    .collect();
                diesel::insert_into(view_values::table)
                    .values(values)
                    .execute(conn)?;
            }
            diesel::insert_into(view_materialisations::table)
                .values((
                    view_materialisations::view_sha256.eq(view_sha256),
                    view_materialisations::generation.eq(generation),
                    view_materialisations::row_count.eq(rows.len() as i64),
                    view_materialisations::built_at.eq(&now),
                ))
                .on_conflict(view_materialisations::view_sha256)
                .do_update()
                .set((
                    view_materialisations::generation.eq(generation),
                    view_materialisations::row_count.eq(rows.len() as i64),
                    view_materialisations::built_at.eq(&now),
                ))
                .execute(conn)?;
            diesel::QueryResult::Ok(())
        }))?;
        Ok(())
    }

    /// The current consent generation (see [`crate::consent::eligibility`]).
    pub fn consent_generation(&self) -> Result<i64> {
        Ok(with_conn!(self.backend, |conn| node_state::table
            .filter(node_state::key.eq(CONSENT_GENERATION))
            .select(node_state::value)
            .first::<i64>(conn)?))
    }

    /// The summary JSON of a stored consent context, if it exists.
    pub fn consent_context(&self, context: &str) -> Result<Option<String>> {
        Ok(with_conn!(self.backend, |conn| consent_contexts::table
            .filter(consent_contexts::context.eq(context))
            .select(consent_contexts::summary)
            .first::<String>(conn)
            .optional()?))
    }

    /// Every patient (id and the demographics consent decisions copy) and
    /// every consent, for consent evaluation.
    pub fn consent_inputs(&self) -> Result<ConsentInputs> {
        type Row = (String, String, String, String, String, i64, String);
        let (patients, rows): (Vec<PatientRow>, Vec<Row>) =
            with_conn!(self.backend, |conn| conn.transaction(|conn| {
                let patients = patients::table
                    .select((patients::id, patients::gender, patients::birth_ymd))
                    .order(patients::id)
                    .load::<(String, String, Option<i64>)>(conn)?
                    .into_iter()
                    .map(|(id, gender, birth_ymd)| PatientRow {
                        id,
                        gender,
                        birth_ymd,
                    })
                    .collect();
                let rows = consents::table
                    .select((
                        consents::consent_id,
                        consents::patient_id,
                        consents::status,
                        consents::scope,
                        consents::decision,
                        consents::recorded_at,
                        consents::provision,
                    ))
                    .load::<Row>(conn)?;
                diesel::QueryResult::Ok((patients, rows))
            })?);
        Ok(ConsentInputs {
            patients,
            consents: rows
                .into_iter()
                .map(|r| ConsentRow {
                    consent_id: r.0,
                    patient_id: r.1,
                    status: r.2,
                    scope: r.3,
                    decision: r.4,
                    recorded_at: r.5,
                    provision: r.6,
                })
                .collect(),
        })
    }

    /// Stores the decisions of one consent context atomically, and prunes
    /// contexts of older generations and all but the newest few.
    pub fn save_consent_context(
        &self,
        context: &str,
        generation: i64,
        summary: &str,
        included: &[Decision<'_>],
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            let stale: Vec<String> = consent_contexts::table
                .filter(consent_contexts::generation.lt(generation))
                .select(consent_contexts::context)
                .load(conn)?;
            let mut stale = stale;
            let newest: Vec<String> = consent_contexts::table
                .filter(consent_contexts::generation.ge(generation))
                .order(consent_contexts::created_at.desc())
                .select(consent_contexts::context)
                .offset(KEEP_CONSENT_CONTEXTS - 1)
                .load(conn)?;
            stale.extend(newest);
            for old in &stale {
                diesel::delete(
                    consent_eligibility::table.filter(consent_eligibility::context.eq(old)),
                )
                .execute(conn)?;
                diesel::delete(consent_contexts::table.filter(consent_contexts::context.eq(old)))
                    .execute(conn)?;
            }
            diesel::delete(
                consent_eligibility::table.filter(consent_eligibility::context.eq(context)),
            )
            .execute(conn)?;
            let rows: Vec<_> = included
                .iter()
                .map(|d| {
                    (
                        consent_eligibility::context.eq(context),
                        consent_eligibility::patient_id.eq(&d.patient.id),
                        consent_eligibility::sensitive_mask.eq(d.sensitive_mask),
                        consent_eligibility::gender.eq(&d.patient.gender),
                        consent_eligibility::birth_ymd.eq(d.patient.birth_ymd),
                        consent_eligibility::print.eq(d.print),
                    )
                })
                .collect();
            insert_rows!(conn, consent_eligibility::table, rows);
            diesel::insert_into(consent_contexts::table)
                .values((
                    consent_contexts::context.eq(context),
                    consent_contexts::generation.eq(generation),
                    consent_contexts::created_at.eq(&now),
                    consent_contexts::summary.eq(summary),
                ))
                .execute(conn)?;
            diesel::QueryResult::Ok(())
        }))?;
        Ok(())
    }

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

    /// Runs a grouped count compiled by the engine.
    pub fn grouped_count(&self, sql: &str, binds: &[Bind]) -> Result<Vec<GroupCount>> {
        self.run_compiled(sql, binds)
    }

    /// Runs a cohort-members query compiled by the engine.
    pub fn cohort_rows(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Member>> {
        self.run_compiled(sql, binds)
    }

    /// Runs a cohort query compiled by the engine that selects only the
    /// members' print hashes.
    pub fn cohort_prints(&self, sql: &str, binds: &[Bind]) -> Result<Vec<i64>> {
        let rows: Vec<PrintRow> = self.run_compiled(sql, binds)?;
        Ok(rows.into_iter().map(|r| r.print).collect())
    }

    /// Runs a code-rows query compiled by the engine
    /// (`engine::compile_code_rows`).
    pub fn code_rows(&self, sql: &str, binds: &[Bind]) -> Result<Vec<CodeRow>> {
        self.run_compiled(sql, binds)
    }

    /// The included patients of a stored consent context, by patient id.
    pub fn consent_decisions(&self, context: &str) -> Result<Vec<StoredDecision>> {
        type Row = (String, i64, String, Option<i64>, i64);
        let rows: Vec<Row> = with_conn!(self.backend, |conn| consent_eligibility::table
            .filter(consent_eligibility::context.eq(context))
            .select((
                consent_eligibility::patient_id,
                consent_eligibility::sensitive_mask,
                consent_eligibility::gender,
                consent_eligibility::birth_ymd,
                consent_eligibility::print,
            ))
            .order(consent_eligibility::patient_id)
            .load::<Row>(conn)?);
        Ok(rows
            .into_iter()
            .map(
                |(patient_id, sensitive_mask, gender, birth_ymd, print)| StoredDecision {
                    patient_id,
                    sensitive_mask,
                    gender,
                    birth_ymd,
                    print,
                },
            )
            .collect())
    }

    fn run_compiled<T>(&self, sql: &str, binds: &[Bind]) -> Result<Vec<T>>
    where
        T: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        macro_rules! run {
            ($conn:ident, $db:ty) => {{
                let mut query = diesel::sql_query(sql).into_boxed::<$db>();
                for bind in binds {
                    query = match bind {
                        Bind::Text(s) => query.bind::<Text, _>(s.clone()),
                        Bind::Int(i) => query.bind::<BigInt, _>(*i),
                        Bind::Float(f) => query.bind::<diesel::sql_types::Double, _>(*f),
                    };
                }
                query.load::<T>($conn)?
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

    /// Released cohorts of `organisation` whose size is within `radius` of
    /// `size`: the only ones that can differ from a cohort of that size by
    /// fewer than `radius` patients.
    ///
    /// The cohort whose print has digest `except` is left out: it is the
    /// one being checked, released before.
    pub fn cohorts_near(
        &self,
        organisation: &str,
        size: i64,
        radius: i64,
        except: &str,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(with_conn!(self.backend, |conn| released_cohorts::table
            .filter(released_cohorts::organisation.eq(organisation))
            .filter(released_cohorts::size.gt(size - radius))
            .filter(released_cohorts::size.lt(size + radius))
            .filter(released_cohorts::print_sha256.ne(except))
            .select(released_cohorts::members)
            .load::<Vec<u8>>(conn)?))
    }

    /// How many distinct cohorts were released to `organisation`.
    pub fn released_cohort_count(&self, organisation: &str) -> Result<i64> {
        Ok(with_conn!(self.backend, |conn| released_cohorts::table
            .filter(released_cohorts::organisation.eq(organisation))
            .count()
            .get_result::<i64>(conn)?))
    }

    /// Records a released cohort, once per organisation: a print already
    /// recorded (same digest) is left as it is.
    pub fn record_cohort(
        &self,
        organisation: &str,
        study_id: &str,
        query_sha256: &str,
        size: i64,
        members: &[u8],
        print_sha256: &str,
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| diesel::insert_into(
            released_cohorts::table
        )
        .values((
            released_cohorts::organisation.eq(organisation),
            released_cohorts::study_id.eq(study_id),
            released_cohorts::query_sha256.eq(query_sha256),
            released_cohorts::released_at.eq(&now),
            released_cohorts::size.eq(size),
            released_cohorts::members.eq(members),
            released_cohorts::print_sha256.eq(print_sha256),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?);
        Ok(())
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

/// A value bound to a placeholder of a hand-written query.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Float(f64),
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

impl From<diesel::result::Error> for ChargeError {
    fn from(e: diesel::result::Error) -> Self {
        ChargeError::Db(e)
    }
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

/// One patient of a cohort, with what grouping needs.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Member {
    #[diesel(sql_type = Text)]
    pub id: String,
    /// The patient's hash in cohort prints
    /// ([`crate::differencing::patient_hash`], as a signed column).
    #[diesel(sql_type = BigInt)]
    pub print: i64,
    #[diesel(sql_type = Text)]
    pub gender: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    pub birth_ymd: Option<i64>,
    /// Index of the first diagnosis group the patient has, -1 for none.
    #[diesel(sql_type = BigInt)]
    pub dx: i64,
    /// The analysis variable's value, when it has one.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    pub value: Option<f64>,
    /// 1 when the patient has a rate's event.
    #[diesel(sql_type = BigInt)]
    pub event: i64,
}

/// A cohort member's print hash alone: all a plain count reads.
#[derive(Debug, Clone, Copy, QueryableByName)]
struct PrintRow {
    #[diesel(sql_type = BigInt)]
    print: i64,
}

impl Member {
    /// A member known by its print hash alone (a plain count's).
    pub fn printed(print: i64) -> Self {
        Member {
            id: String::new(),
            print,
            gender: String::new(),
            birth_ymd: None,
            dx: -1,
            value: None,
            event: 0,
        }
    }
}

/// One row of a grouped count: the group's key columns and its size.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct GroupCount {
    #[diesel(sql_type = Text)]
    pub k_sex: String,
    #[diesel(sql_type = BigInt)]
    pub k_band: i64,
    #[diesel(sql_type = BigInt)]
    pub k_dx: i64,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of now")
}

/// A resource's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub resource_type: String,
    pub id: String,
}

/// Resources, deletions and index rows written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub items: Vec<IndexedResource>,
    pub deletes: Vec<ResourceKey>,
    /// Progress of the import source, committed with the batch.
    pub checkpoint: Option<Checkpoint>,
    /// Rewrite only the index rows of `items` (their content is unchanged).
    pub reindex: bool,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.items.len() + self.deletes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    /// Deletions of resources that were not stored.
    pub not_found: u64,
}

impl std::ops::AddAssign for BatchOutcome {
    fn add_assign(&mut self, other: Self) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.deleted += other.deleted;
        self.not_found += other.not_found;
    }
}

/// How far the import of one source file has been committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub source: String,
    pub fingerprint: String,
    pub lines_committed: i64,
    pub finished: bool,
}

/// One local code mapping, e.g. a HIRA EDI lab code to LOINC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeMapping {
    pub source_system: String,
    pub source_code: String,
    pub target_system: String,
    pub target_code: String,
}

/// A stored current version of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub key: ResourceKey,
    pub version_id: i64,
    pub last_updated: String,
    pub content: String,
}

/// A resource and the index rows derived from it.
#[derive(Debug, Clone)]
pub struct IndexedResource {
    pub resource: StoredResource,
    pub patient: Option<PatientRow>,
    pub conditions: Vec<ConditionCode>,
    pub observations: Vec<ObservationValue>,
    pub encounter: Option<EncounterRow>,
    pub medications: Vec<MedicationCode>,
    pub consent: Option<ConsentRow>,
}

#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub patient_id: Option<String>,
    /// The resource's JSON as received.
    pub content: String,
    /// Hex SHA-256 of `content`.
    pub content_sha256: String,
}

/// A patient's indexed demographics; consent decisions carry a copy, which
/// the engine reads instead of `patients`.
#[derive(Debug, Clone)]
pub struct PatientRow {
    pub id: String,
    pub gender: String,
    /// Birth date as YYYYMMDD.
    pub birth_ymd: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ConditionCode {
    pub condition_id: String,
    pub patient_id: String,
    pub system: String,
    pub code: String,
    pub onset_at: Option<i64>,
    pub recorded_at: Option<i64>,
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
pub struct EncounterRow {
    pub encounter_id: String,
    pub patient_id: String,
    pub class_code: String,
    pub start_at: Option<i64>,
    pub end_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct MedicationCode {
    pub medication_request_id: String,
    pub patient_id: String,
    pub system: String,
    pub code: String,
    pub authored_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub consent_id: String,
    pub patient_id: String,
    pub status: String,
    pub scope: String,
    pub decision: String,
    pub recorded_at: i64,
    /// JSON of the normalised provision tree ([`crate::consent::Provision`]).
    pub provision: String,
}

/// One included patient of a consent context, as stored.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub patient: &'a PatientRow,
    /// Bit mask of the sensitive categories the patient permits.
    pub sensitive_mask: i64,
    /// The patient's cohort-print hash, as a signed column.
    pub print: i64,
}

/// One included patient of a consent context, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDecision {
    pub patient_id: String,
    pub sensitive_mask: i64,
    pub gender: String,
    pub birth_ymd: Option<i64>,
    pub print: i64,
}

/// A patient with a coded row, and the sensitive category bit of the
/// row's code (0 when it has none).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct CodeRow {
    #[diesel(sql_type = Text)]
    pub patient_id: String,
    #[diesel(sql_type = BigInt)]
    pub category_bit: i64,
}

/// Everything consent evaluation needs: every patient and every consent.
#[derive(Debug, Clone, Default)]
pub struct ConsentInputs {
    pub patients: Vec<PatientRow>,
    pub consents: Vec<ConsentRow>,
}

/// One line of the audit log.
pub use ghx_audit::Entry as AuditEntry;

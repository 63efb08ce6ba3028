//! FHIR resources kept verbatim with their history, the index tables
//! aggregate queries run on (written a batch at a time, whole or not at
//! all), import checkpoints and the EDI -> LOINC code map.

use std::collections::{BTreeMap, HashMap};

use diesel::prelude::*;
use diesel::upsert::excluded;
use ghx_db::{WriteTransaction, with_conn};

use super::schema::{
    code_map, condition_codes, consents, encounters, import_checkpoints, medication_codes,
    node_state, observation_values, patients, resource_history, resources,
};
use super::{CONSENT_GENERATION, DATA_GENERATION, Error, INSERT_CHUNK, Result, Store, now_rfc3339};
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
                    patients::link_token.eq(p.link_token.as_deref()),
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
            // Linkage tokens to set on patients whose stored content is
            // unchanged (the RRN, stripped, is not part of it).
            let mut relinked: Vec<(&str, &str)> = Vec::new();
            for item in &batch.items {
                let r = &item.resource;
                let key = (r.resource_type.clone(), r.id.clone());
                match existing.get(&key) {
                    Some((_, sha)) if *sha == r.content_sha256 && !batch.reindex => {
                        outcome.unchanged += 1;
                        if let Some(p) = &item.patient
                            && let Some(token) = &p.link_token
                        {
                            relinked.push((&p.id, token));
                        }
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
                // New resources are inserted in bulk (COPY on PostgreSQL);
                // stored ones replace their row.
                let (fresh, stored): (Vec<_>, Vec<_>) = writes.iter().partition(|(item, _)| {
                    let r = &item.resource;
                    !existing.contains_key(&(r.resource_type.clone(), r.id.clone()))
                });
                // One row shape for both (a macro: the row borrows from the
                // batch, which a closure's signature cannot say).
                macro_rules! resource_rows {
                    ($writes:expr) => {
                        $writes
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
                            .collect::<Vec<_>>()
                    };
                }
                let fresh_rows = resource_rows!(fresh);
                insert_rows!(conn, resources::table, fresh_rows);
                for chunk in stored.chunks(INSERT_CHUNK) {
                    let rows = resource_rows!(chunk);
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
            // A patient keeps its token when rewritten from content that no
            // longer holds the RRN (a re-index, or an export without it).
            let mut kept: Vec<(String, String)> = Vec::new();
            for chunk in stale
                .get("Patient")
                .into_iter()
                .flat_map(|ids| ids.chunks(INSERT_CHUNK))
            {
                kept.extend(
                    patients::table
                        .filter(patients::id.eq_any(chunk))
                        .filter(patients::link_token.is_not_null())
                        .select((patients::id, patients::link_token.assume_not_null()))
                        .load::<(String, String)>(conn)?,
                );
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
            let derived: std::collections::HashSet<&str> = items
                .iter()
                .filter_map(|i| i.patient.as_ref())
                .filter(|p| p.link_token.is_some())
                .map(|p| p.id.as_str())
                .collect();
            let kept = kept
                .iter()
                .filter(|(id, _)| !derived.contains(id.as_str()))
                .map(|(id, token)| (id.as_str(), token.as_str()));
            // Kept first: a token derived in this batch is the newer one.
            for (id, token) in kept.chain(relinked) {
                diesel::update(
                    patients::table.filter(patients::id.eq(id)).filter(
                        patients::link_token
                            .is_null()
                            .or(patients::link_token.ne(token)),
                    ),
                )
                .set(patients::link_token.eq(token))
                .execute(conn)?;
            }
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
        type Row = (String, String, i64, String, Option<String>, String);
        let rows: Vec<Row> = with_conn!(self.backend, |conn| {
            let mut query = resources::table
                .select((
                    resources::resource_type,
                    resources::id,
                    resources::version_id,
                    resources::last_updated,
                    resources::patient_id,
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
                |(resource_type, id, version_id, last_updated, patient_id, content)| {
                    StoredVersion {
                        key: ResourceKey { resource_type, id },
                        version_id,
                        last_updated,
                        patient_id,
                        content,
                    }
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

    /// Every patient's linkage token, by patient id (patients without one
    /// are left out).
    pub fn link_tokens(&self) -> Result<Vec<(String, String)>> {
        Ok(with_conn!(self.backend, |conn| patients::table
            .filter(patients::link_token.is_not_null())
            .select((patients::id, patients::link_token.assume_not_null()))
            .load::<(String, String)>(conn)?))
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

    /// Whether any diagnosis, lab or prescription (`resource_type`
    /// Condition, Observation or MedicationRequest) is indexed under
    /// `system`: one seek on the code index.
    pub fn holds_code_system(&self, resource_type: &str, system: &str) -> Result<bool> {
        let found: Option<String> = with_conn!(self.backend, |conn| match resource_type {
            "Condition" => condition_codes::table
                .filter(condition_codes::system.eq(system))
                .select(condition_codes::system)
                .first(conn)
                .optional()?,
            "Observation" => observation_values::table
                .filter(observation_values::system.eq(system))
                .select(observation_values::system)
                .first(conn)
                .optional()?,
            "MedicationRequest" => medication_codes::table
                .filter(medication_codes::system.eq(system))
                .select(medication_codes::system)
                .first(conn)
                .optional()?,
            _ => None,
        });
        Ok(found.is_some())
    }

    /// The (resource type, code system) pairs the index holds codes in:
    /// diagnoses, labs and prescriptions (a scan: for `ghx node status`).
    pub fn held_code_systems(&self) -> Result<Vec<(String, String)>> {
        let (conditions, observations, medications) = with_conn!(self.backend, |conn| {
            let c: Vec<String> = condition_codes::table
                .select(condition_codes::system)
                .distinct()
                .load(conn)?;
            let o: Vec<String> = observation_values::table
                .select(observation_values::system)
                .distinct()
                .load(conn)?;
            let m: Vec<String> = medication_codes::table
                .select(medication_codes::system)
                .distinct()
                .load(conn)?;
            (c, o, m)
        });
        let pairs = |ty: &str, systems: Vec<String>| {
            systems
                .into_iter()
                .map(|s| (ty.to_owned(), s))
                .collect::<Vec<_>>()
        };
        let mut held = pairs("Condition", conditions);
        held.extend(pairs("Observation", observations));
        held.extend(pairs("MedicationRequest", medications));
        Ok(held)
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
    /// The patient import found the resource to be about (a Patient's own
    /// id), if any.
    pub patient_id: Option<String>,
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
    /// HMAC-SHA256 of the patient's RRN under the federation's link key
    /// (hex), when import had both ([`ghx_disclosure::linkage`]).
    pub link_token: Option<String>,
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

impl std::ops::AddAssign for BatchOutcome {
    fn add_assign(&mut self, other: Self) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.deleted += other.deleted;
        self.not_found += other.not_found;
    }
}

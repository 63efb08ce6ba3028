//! The cohort index: the node's in-memory answer to cohorts defined by
//! codes, sex and age, the shape most aggregate queries have.
//!
//! For a consent context (its included patients, [`crate::consent::eligibility`])
//! the index numbers the patients 0..n and keeps their sex, birth date,
//! sensitive-category mask and print hash in arrays. A coded criterion
//! without a date window (a diagnosis or prescription code or prefix, or a
//! diagnosis group of the group-by) becomes the bit set of those patients
//! with a matching row whose diagnosis they permit, loaded once from the
//! code index tables with one SQL statement
//! ([`crate::engine::compile_code_rows`]) and kept for the current data
//! generation. A query is then an intersection of bit sets and one pass
//! over its members' arrays, instead of one index search per candidate.
//!
//! The SQL of [`crate::engine`] stays the reference and the path for every
//! other query (observation values, encounters, date windows, variables
//! other than age, rates, training's members): [`CohortIndex::members`]
//! falls back to it, and the store suite checks that both give the same
//! members. Nothing here outlives the process or leaves the node: the
//! arrays are the consent decisions' own columns.
//!
//! Freshness: the context's decisions are immutable under their key (a
//! change of consent makes a new key), and code sets are tagged with the
//! data generation import bumps in the transaction that writes index rows.
//! A query reads the generation before and after loading missing sets; if
//! an import committed in between, it does not keep them and answers from
//! SQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fixedbitset::FixedBitSet;
use ghx_study::query::{Analysis, CodeMatch, QuerySpec, Variable};

use crate::consent::SensitiveCodes;
use crate::engine::{self, CodeTable, Demographics, Output};
use crate::store::{Member, Store};

/// Contexts kept (a context key changes with the consent generation, the
/// purpose and the hour).
const KEEP_CONTEXTS: usize = 4;
/// Code sets kept per context before the oldest are dropped.
const KEEP_SETS: usize = 256;

/// Cohorts answered from memory; see the module docs.
#[derive(Debug, Default)]
pub struct CohortIndex {
    contexts: Mutex<Vec<Arc<ContextIndex>>>,
}

/// A coded criterion as the index keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SetKey {
    table: CodeTable,
    system: String,
    codes: Vec<String>,
    matching: CodeMatch,
}

/// What a query asks of the index.
#[derive(Debug)]
struct Plan {
    criteria: Vec<SetKey>,
    diagnosis: Vec<SetKey>,
    sexes: Vec<&'static str>,
    min_age: Option<i64>,
    max_age: Option<i64>,
    as_of: i64,
    output: Output,
    demographics: Demographics,
}

impl Plan {
    /// The plan for `spec`, None when the index cannot answer it.
    fn of(spec: &QuerySpec) -> Option<Plan> {
        let cohort = &spec.cohort;
        if !cohort.observations.is_empty() || !cohort.encounters.is_empty() {
            return None;
        }
        let unwindowed = |w: &ghx_study::query::Window| w.unix_bounds() == (None, None);
        if !cohort.conditions.iter().all(|c| unwindowed(&c.window))
            || !cohort.medications.iter().all(|m| unwindowed(&m.window))
        {
            return None;
        }
        match &spec.analysis {
            Analysis::Count { .. } => {}
            Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. }
                if matches!(variable, Variable::Age) => {}
            _ => return None,
        }
        let coded = |table, c: &ghx_study::query::CodeCriterion| SetKey {
            table,
            system: c.system.clone(),
            codes: vec![c.code.clone()],
            matching: c.matching,
        };
        let criteria = cohort
            .conditions
            .iter()
            .map(|c| coded(CodeTable::Conditions, c))
            .chain(
                cohort
                    .medications
                    .iter()
                    .map(|m| coded(CodeTable::Medications, m)),
            )
            .collect();
        let diagnosis = spec
            .dimensions()
            .iter()
            .find_map(|d| match d {
                ghx_study::query::Dimension::Diagnosis { diagnosis } => Some(diagnosis),
                _ => None,
            })
            .map(|groups| {
                groups
                    .iter()
                    .map(|g| SetKey {
                        table: CodeTable::Conditions,
                        system: g.system.clone(),
                        codes: g.codes.clone(),
                        matching: g.matching,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let as_of = engine::ymd(cohort.as_of);
        Some(Plan {
            criteria,
            diagnosis,
            sexes: cohort.sex.iter().map(|s| s.code()).collect(),
            min_age: cohort.age.and_then(|a| a.min).map(i64::from),
            max_age: cohort.age.and_then(|a| a.max).map(i64::from),
            as_of,
            output: engine::analysis_output(spec),
            demographics: Demographics::of(spec),
        })
    }
}

/// One consent context's included patients, numbered by patient id.
#[derive(Debug)]
struct ContextIndex {
    context: String,
    ordinal: HashMap<String, u32>,
    /// Index into `genders` per patient.
    gender: Vec<u32>,
    genders: Vec<String>,
    birth: Vec<Option<i64>>,
    mask: Vec<i64>,
    print: Vec<i64>,
    sets: Mutex<Sets>,
}

/// Code sets of one context at one data generation.
#[derive(Debug, Default)]
struct Sets {
    generation: i64,
    by_key: HashMap<SetKey, Arc<FixedBitSet>>,
}

impl ContextIndex {
    fn load(store: &Store, context: &str) -> Result<Self, crate::store::Error> {
        let rows = store.consent_decisions(context)?;
        let mut index = ContextIndex {
            context: context.to_owned(),
            ordinal: HashMap::with_capacity(rows.len()),
            gender: Vec::with_capacity(rows.len()),
            genders: Vec::new(),
            birth: Vec::with_capacity(rows.len()),
            mask: Vec::with_capacity(rows.len()),
            print: Vec::with_capacity(rows.len()),
            sets: Mutex::new(Sets::default()),
        };
        for (i, row) in rows.into_iter().enumerate() {
            let gender = match index.genders.iter().position(|g| *g == row.gender) {
                Some(g) => g,
                None => {
                    index.genders.push(row.gender);
                    index.genders.len() - 1
                }
            };
            index.gender.push(gender as u32);
            index.birth.push(row.birth_ymd);
            index.mask.push(row.sensitive_mask);
            index.print.push(row.print);
            index.ordinal.insert(row.patient_id, i as u32);
        }
        Ok(index)
    }

    fn len(&self) -> usize {
        self.print.len()
    }

    /// The patients of `key`, loading it when the generation has no set
    /// for it. Returns whether it was loaded.
    fn set(
        &self,
        store: &Store,
        generation: i64,
        key: &SetKey,
        sensitive: &SensitiveCodes,
    ) -> Result<(Arc<FixedBitSet>, bool), crate::store::Error> {
        {
            let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
            if sets.generation == generation
                && let Some(set) = sets.by_key.get(key)
            {
                return Ok((set.clone(), false));
            }
        }
        let (sql, binds) = engine::compile_code_rows(
            key.table,
            &key.system,
            &key.codes,
            key.matching,
            store.dialect(),
            sensitive,
        );
        let rows = tracing::info_span!("store", backend = ?store.dialect())
            .in_scope(|| store.code_rows(&sql, &binds))?;
        let mut set = FixedBitSet::with_capacity(self.len());
        for row in rows {
            if let Some(&i) = self.ordinal.get(&row.patient_id) {
                // A sensitive diagnosis counts only if the patient
                // permits its category.
                if row.category_bit & !self.mask[i as usize] == 0 {
                    set.insert(i as usize);
                }
            }
        }
        Ok((Arc::new(set), true))
    }

    fn keep(&self, generation: i64, loaded: Vec<(SetKey, Arc<FixedBitSet>)>) {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if sets.generation != generation || sets.by_key.len() + loaded.len() > KEEP_SETS {
            sets.by_key.clear();
            sets.generation = generation;
        }
        sets.by_key.extend(loaded);
    }

    /// The members of the plan's cohort, with the columns its output
    /// selects (as [`engine::cohort_for_analysis`] fills them).
    fn members(
        &self,
        plan: &Plan,
        criteria: &[Arc<FixedBitSet>],
        dx: &[Arc<FixedBitSet>],
    ) -> Vec<Member> {
        let mut chosen = match criteria.split_first() {
            Some((first, rest)) => {
                let mut chosen = (**first).clone();
                for set in rest {
                    chosen.intersect_with(set);
                }
                chosen
            }
            None => {
                let mut all = FixedBitSet::with_capacity(self.len());
                all.insert_range(..);
                all
            }
        };
        if !plan.sexes.is_empty() {
            let allowed: Vec<u32> = self
                .genders
                .iter()
                .enumerate()
                .filter(|(_, g)| plan.sexes.contains(&g.as_str()))
                .map(|(i, _)| i as u32)
                .collect();
            chosen = chosen
                .ones()
                .filter(|&i| allowed.contains(&self.gender[i]))
                .collect();
        }
        let mut members = Vec::with_capacity(chosen.count_ones(..));
        for i in chosen.ones() {
            let birth = self.birth[i];
            // As the SQL: born by the reference date, and an age bound
            // excludes patients without a birth date.
            if birth.is_some_and(|b| b > plan.as_of) {
                continue;
            }
            let age = birth.map(|b| (plan.as_of - b) / 10000);
            if plan.min_age.is_some_and(|m| age.is_none_or(|a| a < m))
                || plan.max_age.is_some_and(|m| age.is_none_or(|a| a > m))
            {
                continue;
            }
            let print = self.print[i];
            if plan.output == Output::Prints {
                members.push(Member::printed(print));
                continue;
            }
            let dx = dx
                .iter()
                .position(|set| set.contains(i))
                .map_or(-1, |g| g as i64);
            members.push(Member {
                id: String::new(),
                print,
                gender: if plan.demographics.gender {
                    self.genders[self.gender[i] as usize].clone()
                } else {
                    String::new()
                },
                birth_ymd: if plan.demographics.birth { birth } else { None },
                dx,
                value: None,
                event: 0,
            });
        }
        members
    }
}

impl CohortIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the index answers `spec` (else [`Self::members`] runs the
    /// engine's SQL).
    pub fn covers(spec: &QuerySpec) -> bool {
        Plan::of(spec).is_some()
    }

    /// The consenting members of the query's cohort with what the analysis
    /// needs, the same as [`engine::cohort_for_analysis`] returns (order
    /// aside): from the index when it covers the query, else from that SQL.
    pub fn members(
        &self,
        store: &Store,
        spec: &QuerySpec,
        consent_context: &str,
        sensitive: &SensitiveCodes,
    ) -> Result<Vec<Member>, crate::views::Error> {
        let Some(plan) = Plan::of(spec) else {
            return engine::cohort_for_analysis(store, spec, consent_context, sensitive);
        };
        // Its own span; what it loads from the store runs in `store` spans
        // below it.
        let _span = tracing::info_span!("cohort_index").entered();
        let context = self.context(store, consent_context)?;
        let generation = store.data_generation()?;
        let mut loaded = Vec::new();
        let mut sets = |keys: &[SetKey]| -> Result<Vec<Arc<FixedBitSet>>, crate::store::Error> {
            keys.iter()
                .map(|key| {
                    let (set, new) = context.set(store, generation, key, sensitive)?;
                    if new {
                        loaded.push((key.clone(), set.clone()));
                    }
                    Ok(set)
                })
                .collect()
        };
        let criteria = sets(&plan.criteria)?;
        let dx = sets(&plan.diagnosis)?;
        if !loaded.is_empty() {
            // Sets loaded by separate statements must be of one generation.
            if store.data_generation()? != generation {
                return engine::cohort_for_analysis(store, spec, consent_context, sensitive);
            }
            context.keep(generation, loaded);
        }
        Ok(context.members(&plan, &criteria, &dx))
    }

    fn context(
        &self,
        store: &Store,
        consent_context: &str,
    ) -> Result<Arc<ContextIndex>, crate::store::Error> {
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = contexts.iter().position(|c| c.context == consent_context) {
            // Most recently used last.
            let context = contexts.remove(i);
            contexts.push(context.clone());
            return Ok(context);
        }
        let context = tracing::info_span!("store", backend = ?store.dialect())
            .in_scope(|| ContextIndex::load(store, consent_context))?;
        let context = Arc::new(context);
        if contexts.len() >= KEEP_CONTEXTS {
            contexts.remove(0);
        }
        contexts.push(context.clone());
        Ok(context)
    }
}

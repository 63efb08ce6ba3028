//! The aggregate engine: compiles a validated query into one SQL statement
//! over the index tables, and computes the query's raw (unreleased) cells
//! from the cohort members it returns.
//!
//! Raw cells never leave the node: they go only to [`crate::release`].
//! Every value from the query is a bound parameter; the SQL text is built
//! only from fixed fragments chosen by the query's structure. Fragments are
//! generated in the order they appear in the SQL text, because SQLite's
//! placeholders are positional. The cohort's most selective code drives the
//! plan (candidates from a code index, then per-candidate checks), so a
//! query's cost follows the cohort's size rather than the node's; that
//! criterion is not tested again per candidate when the index lookup says
//! all of it.

use std::collections::{BTreeMap, HashMap};

use ghx_study::query::{
    Analysis, CodeCriterion, CodeMatch, Dimension, EncounterCriterion, Event, NO_DIAGNOSIS, Named,
    ObservationCriterion, Pick, QuerySpec, Variable, Window,
};

use crate::consent::SensitiveCodes;
pub use crate::store::Member;
use crate::store::{self, Bind, Dialect, Store};
use crate::terminology;

pub use ghx_disclosure::{Raw, RawCell};

/// What [`analyse`] computed, with what it had to leave out.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysed {
    pub cells: Vec<RawCell>,
    /// Who is behind each cell's value, in the order of `cells`.
    pub members: Vec<CellMembers>,
    /// Cohort members without a value of the analysis variable.
    pub without_value: u64,
}

/// The patients behind a raw cell's value, as their print hashes
/// ([`Member::print`]): the cell's patients (for a histogram, those with a
/// value), and those of them with a rate's event or a summary's value.
/// Differencing compares them with earlier releases
/// ([`crate::differencing::cells`]); a summary's release protects both
/// sides ([`crate::release::Candidate::lacking`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellMembers {
    pub patients: Vec<i64>,
    pub events: Vec<i64>,
    /// For a summary, each patient with a value paired with it
    /// ([`valued`]): the same patients with a value changed differ here.
    pub valued: Vec<i64>,
}

/// A patient's print paired with a value (as the summary uses it, clipped),
/// as one 64-bit hash.
pub(crate) fn valued(print: i64, value: f64) -> i64 {
    // SplitMix64's finaliser over the two, mixed.
    let mut z = (print as u64) ^ value.to_bits().rotate_left(29);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// Counts distinct consenting patients in the query's cohort, per group,
/// with a grouped SQL statement. The node itself counts cohort members
/// ([`analyse`]); this is the independent check and the benchmark's local
/// baseline. Only count analyses.
pub fn count(
    store: &Store,
    spec: &QuerySpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
) -> Result<Vec<RawCell>, store::Error> {
    let (sql, binds) = compile(
        spec,
        store.dialect(),
        consent_context,
        sensitive,
        Output::Counts,
    );
    let rows = store.grouped_count(&sql, &binds)?;
    let dimensions = spec.dimensions();
    Ok(rows
        .into_iter()
        .map(|row| RawCell {
            key: dimensions
                .iter()
                .map(|d| match d {
                    Dimension::Named(Named::Sex) => row.k_sex.clone(),
                    Dimension::Named(Named::AgeBand) => {
                        ghx_study::query::age_band_label(row.k_band)
                    }
                    Dimension::Diagnosis { diagnosis } => diagnosis_label(diagnosis, row.k_dx),
                })
                .collect(),
            value: Raw::Count(u64::try_from(row.n).unwrap_or(0)),
        })
        .collect())
}

/// The consenting patients of the query's cohort, with every column of
/// [`Member`] (training joins features by id and reads sex). They never
/// leave the node. A view variable is materialised first if the data
/// changed since it last was ([`crate::views`]).
pub fn cohort_members(
    store: &Store,
    spec: &QuerySpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
) -> Result<Vec<Member>, crate::views::Error> {
    members(store, spec, consent_context, sensitive, Output::Members)
}

/// The consenting patients of the query's cohort with only what the
/// analysis needs: their print hashes (what differencing compares) and the
/// columns [`analyse`] reads for this query; the others are empty (no id,
/// and sex or birth date only when grouped or measured by them; a plain
/// count selects the print hashes alone).
pub fn cohort_for_analysis(
    store: &Store,
    spec: &QuerySpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
) -> Result<Vec<Member>, crate::views::Error> {
    members(
        store,
        spec,
        consent_context,
        sensitive,
        analysis_output(spec),
    )
}

/// What the node's analysis of `spec` selects of its members: a plain
/// count reads nothing but their prints.
pub(crate) fn analysis_output(spec: &QuerySpec) -> Output {
    if matches!(spec.analysis, Analysis::Count { .. }) && spec.dimensions().is_empty() {
        Output::Prints
    } else {
        Output::Analysis
    }
}

/// Which demographic columns an [`Output::Analysis`] select fills (the
/// others are empty): sex when grouped by it, the birth date when grouped
/// or measured by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Demographics {
    pub gender: bool,
    pub birth: bool,
}

impl Demographics {
    pub(crate) fn of(spec: &QuerySpec) -> Self {
        let dims = spec.dimensions();
        let by_age = matches!(
            &spec.analysis,
            Analysis::Summary {
                variable: Variable::Age,
                ..
            } | Analysis::Histogram {
                variable: Variable::Age,
                ..
            }
        );
        Demographics {
            gender: dims.contains(&Dimension::SEX),
            birth: by_age || dims.contains(&Dimension::AGE_BAND),
        }
    }
}

/// The index table a coded criterion is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CodeTable {
    Conditions,
    Medications,
}

/// SQL selecting the distinct (patient, sensitive category bit) pairs of
/// the rows of `table` whose code matches one of `codes` (any date): what
/// [`crate::cohort_index`] loads a coded criterion's patients from. The
/// bits are those of the row's diagnosis ([`SensitiveCodes::sql_condition_bits`])
/// or prescription ([`SensitiveCodes::sql_medication_bits`]), read from
/// every coding of it; 0 for codes that cannot be sensitive.
pub(crate) fn compile_code_rows(
    table: CodeTable,
    system: &str,
    codes: &[String],
    matching: CodeMatch,
    dialect: Dialect,
    sensitive: &SensitiveCodes,
) -> (String, Vec<Bind>) {
    let mut sql = Sql {
        dialect,
        binds: Vec::new(),
        sensitive,
    };
    let system_uri = terminology::canonical_system(system);
    let codes: Vec<String> = codes
        .iter()
        .map(|code| terminology::normalize_code(system_uri, code).into_owned())
        .collect();
    let (name, alias) = match table {
        CodeTable::Conditions => ("condition_codes", "c"),
        CodeTable::Medications => ("medication_codes", "m"),
    };
    let prefix = matching == CodeMatch::Prefix;
    // Placeholders in text order: the bit's (rare disease prefixes) first.
    let bit = match table {
        // Every diagnosis is tested: another coding of the same diagnosis
        // may say a category the selecting code does not.
        CodeTable::Conditions => {
            sensitive.sql_condition_bits("c.condition_id", |prefix| sql.param(Bind::Text(prefix)))
        }
        CodeTable::Medications
            if codes
                .iter()
                .any(|code| sensitive.medication_may_be_sensitive(system_uri, code, prefix)) =>
        {
            sensitive.sql_medication_bits("m.medication_request_id")
        }
        _ => "0".to_owned(),
    };
    let test = match table {
        CodeTable::Conditions => sql.diagnosis_test(alias, system_uri, &codes, matching),
        CodeTable::Medications => sql.code_tests(alias, system_uri, &codes, matching),
    };
    (
        format!(
            "SELECT DISTINCT {alias}.patient_id AS patient_id, CAST({bit} AS BIGINT) AS category_bit \
             FROM {name} {alias} WHERE {test}"
        ),
        sql.binds,
    )
}

fn members(
    store: &Store,
    spec: &QuerySpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
    output: Output,
) -> Result<Vec<Member>, crate::views::Error> {
    if let Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. } =
        &spec.analysis
    {
        crate::views::ensure(store, variable)?;
    }
    let (sql, binds) = compile(spec, store.dialect(), consent_context, sensitive, output);
    // The store's own span: the one SQL statement, on the index tables.
    let span = tracing::info_span!("store", backend = ?store.dialect());
    let rows = span.in_scope(|| {
        if output == Output::Prints {
            store
                .cohort_prints(&sql, &binds)
                .map(|prints| prints.into_iter().map(Member::printed).collect())
        } else {
            store.cohort_rows(&sql, &binds)
        }
    })?;
    Ok(rows)
}

fn diagnosis_label(groups: &[ghx_study::query::DiagnosisGroup], index: i64) -> String {
    usize::try_from(index)
        .ok()
        .and_then(|i| groups.get(i))
        .map_or_else(|| NO_DIAGNOSIS.to_owned(), |g| g.label.clone())
}

/// Age band index at `as_of` (YYYYMMDD), -1 when the birth date is unknown.
fn band(as_of: i64, birth: Option<i64>) -> i64 {
    birth.map_or(-1, |b| ((as_of - b) / 10000 / 10).min(9))
}

/// Computes the analysis's raw cells from the cohort members. Cells are in
/// the query's natural key order ([`QuerySpec::key_order`]), and
/// when `full_domain` is set every possible key is present, empty or not,
/// so that which cells exist says nothing about the data (how every
/// released table is made: otherwise a small cell listed would be known to
/// hold at least one patient).
pub fn analyse(spec: &QuerySpec, members: &[Member], full_domain: bool) -> Analysed {
    let dims = spec.dimensions();
    let as_of = ymd(spec.cohort.as_of);
    let (bins, clip) = match &spec.analysis {
        Analysis::Histogram { bins, .. } => (Some(*bins), None),
        Analysis::Summary { clip, .. } => (None, *clip),
        _ => (None, None),
    };
    // Members are counted under a compact key (sex, band, diagnosis group,
    // bin) first; each group's text key is made once.
    let by_sex = dims.contains(&Dimension::SEX);
    let by_band = dims.contains(&Dimension::AGE_BAND);
    let by_dx = dims
        .iter()
        .any(|d| matches!(d, Dimension::Diagnosis { .. }));
    let text_key = |sex: &str, band_index: i64, dx: i64| -> Vec<String> {
        dims.iter()
            .map(|d| match d {
                Dimension::Named(Named::Sex) => sex.to_owned(),
                Dimension::Named(Named::AgeBand) => ghx_study::query::age_band_label(band_index),
                Dimension::Diagnosis { diagnosis } => diagnosis_label(diagnosis, dx),
            })
            .collect()
    };
    let value_of = |m: &Member| member_value(spec, m);

    let mut cells: BTreeMap<Vec<String>, Raw> = BTreeMap::new();
    let empty = || match &spec.analysis {
        Analysis::Count { .. } | Analysis::Histogram { .. } => Raw::Count(0),
        Analysis::Summary { .. } => Raw::Values(Vec::new()),
        Analysis::Rate { .. } => Raw::Rate {
            events: 0,
            population: 0,
        },
    };
    if full_domain {
        for key in spec.table_keys() {
            cells.insert(key, empty());
        }
    }
    let mut without_value = 0;
    let mut groups: HashMap<(&str, i64, i64, usize), (Raw, CellMembers)> = HashMap::new();
    for m in members {
        let value = value_of(m);
        let bin = match bins {
            Some(bins) => {
                let Some(v) = value else {
                    without_value += 1;
                    continue;
                };
                bins.index(v)
            }
            None => 0,
        };
        let compact = (
            if by_sex { m.gender.as_str() } else { "" },
            if by_band { band(as_of, m.birth_ymd) } else { 0 },
            if by_dx { m.dx } else { 0 },
            bin,
        );
        let (raw, who) = groups
            .entry(compact)
            .or_insert_with(|| (empty(), CellMembers::default()));
        match raw {
            Raw::Count(n) => *n += 1,
            Raw::Values(values) => match value {
                Some(v) => {
                    let v = clip.map_or(v, |r| v.clamp(r.min, r.max));
                    values.push(v);
                    who.events.push(m.print);
                    who.valued.push(valued(m.print, v));
                }
                None => without_value += 1,
            },
            Raw::Rate { events, population } => {
                *population += 1;
                *events += u64::from(m.event != 0);
                if m.event != 0 {
                    who.events.push(m.print);
                }
            }
        }
        who.patients.push(m.print);
    }
    let mut who_by_key: HashMap<Vec<String>, CellMembers> = HashMap::new();
    for ((sex, band_index, dx, bin), (raw, who)) in groups {
        let mut key = text_key(sex, band_index, dx);
        if let Some(bins) = bins {
            key.push(bins.label(bin));
        }
        let into = who_by_key.entry(key.clone()).or_default();
        into.patients.extend(who.patients);
        into.events.extend(who.events);
        into.valued.extend(who.valued);
        merge(cells.entry(key).or_insert_with(empty), raw);
    }
    if cells.is_empty() && dims.is_empty() && bins.is_none() {
        cells.insert(Vec::new(), empty());
    }
    let mut cells: Vec<RawCell> = cells
        .into_iter()
        .map(|(key, mut value)| {
            if let Raw::Values(v) = &mut value {
                v.sort_by(f64::total_cmp);
            }
            RawCell { key, value }
        })
        .collect();
    cells.sort_by_cached_key(|c| spec.key_order(&c.key));
    let members = cells
        .iter()
        .map(|c| who_by_key.remove(&c.key).unwrap_or_default())
        .collect();
    Analysed {
        cells,
        members,
        without_value,
    }
}

/// Adds one group's raw value to a cell's (both of the same analysis).
fn merge(into: &mut Raw, from: Raw) {
    match (into, from) {
        (Raw::Count(a), Raw::Count(b)) => *a += b,
        (Raw::Values(a), Raw::Values(b)) => a.extend(b),
        (
            Raw::Rate { events, population },
            Raw::Rate {
                events: e,
                population: p,
            },
        ) => {
            *events += e;
            *population += p;
        }
        // One analysis makes one kind of cell (values are not printed).
        _ => unreachable!("cells of one analysis are of one kind"),
    }
}

/// A date as the integer YYYYMMDD the index tables use.
/// A cohort member's value of the analysis variable, if it has one.
pub(crate) fn member_value(spec: &QuerySpec, m: &Member) -> Option<f64> {
    match &spec.analysis {
        Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. } => match variable
        {
            Variable::Age => m
                .birth_ymd
                .map(|b| ((ymd(spec.cohort.as_of) - b) / 10000) as f64),
            Variable::Observation { .. } | Variable::View { .. } => {
                m.value.filter(|v| v.is_finite())
            }
        },
        _ => None,
    }
}

pub(crate) fn ymd(d: time::Date) -> i64 {
    i64::from(d.year()) * 10000 + i64::from(u8::from(d.month())) * 100 + i64::from(d.day())
}

/// What a compiled query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Group keys and counts.
    Counts,
    /// The cohort's patients with every member column.
    Members,
    /// The cohort's patients with the columns the analysis reads.
    Analysis,
    /// The cohort's patients' print hashes only (a plain count).
    Prints,
}

/// SQL text under construction with its binds.
struct Sql<'a> {
    dialect: Dialect,
    binds: Vec<Bind>,
    sensitive: &'a SensitiveCodes,
}

impl Sql<'_> {
    fn param(&mut self, bind: Bind) -> String {
        self.binds.push(bind);
        self.dialect.placeholder(self.binds.len())
    }

    /// ` AND column >= from AND column < to` for a window.
    fn window(&mut self, column: &str, window: &Window) -> String {
        let (from, to) = window.unix_bounds();
        let mut out = String::new();
        if let Some(from) = from {
            out.push_str(&format!(" AND {column} >= {}", self.param(Bind::Int(from))));
        }
        if let Some(to) = to {
            out.push_str(&format!(" AND {column} < {}", self.param(Bind::Int(to))));
        }
        out
    }

    /// `alias.code = $n` or `alias.code LIKE $n` for an already normalised
    /// code.
    fn code_test(&mut self, alias: &str, code: String, matching: CodeMatch) -> String {
        match matching {
            CodeMatch::Exact => format!("{alias}.code = {}", self.param(Bind::Text(code))),
            CodeMatch::Prefix => format!(
                "{alias}.code LIKE {}",
                self.param(Bind::Text(format!("{code}%")))
            ),
        }
    }

    /// `(alias.system = S AND (code tests))` for normalised codes of `system`.
    fn code_tests(
        &mut self,
        alias: &str,
        system: &str,
        codes: &[String],
        matching: CodeMatch,
    ) -> String {
        let param = self.param(Bind::Text(system.to_owned()));
        let tests: Vec<String> = codes
            .iter()
            .map(|code| self.code_test(alias, code.clone(), matching))
            .collect();
        format!("({alias}.system = {param} AND ({}))", tests.join(" OR "))
    }

    /// A diagnosis code test across the node's concept layer: the codes in
    /// their own system, and those that are ICD-10 categories also in the
    /// other systems that share the category
    /// ([`terminology::sharing_category`]).
    fn diagnosis_test(
        &mut self,
        alias: &str,
        system: &str,
        codes: &[String],
        matching: CodeMatch,
    ) -> String {
        let mut test = self.code_tests(alias, system, codes, matching);
        let categories: Vec<String> = codes
            .iter()
            .filter(|code| terminology::is_category(system, code))
            .cloned()
            .collect();
        if !categories.is_empty() {
            for other in terminology::sharing_category(system) {
                test.push_str(" OR ");
                test.push_str(&self.code_tests(alias, other, &categories, matching));
            }
        }
        format!("({test})")
    }

    /// A condition test on rows of `condition_codes c`: system and code(s),
    /// and the patient's permission for the diagnosis's sensitive category
    /// when one of the codes could be in one.
    fn condition_codes(&mut self, system: &str, codes: &[String], matching: CodeMatch) -> String {
        // Codes are compared in the form import indexed them in.
        let system_uri = terminology::canonical_system(system);
        let codes: Vec<String> = codes
            .iter()
            .map(|code| terminology::normalize_code(system_uri, code).into_owned())
            .collect();
        let test = self.diagnosis_test("c", system_uri, &codes, matching);
        let codes = format!("c.patient_id = p.patient_id AND {test}");
        // A sensitive diagnosis is visible only if the patient permits its
        // category, read from every coding of it (whatever code selects it).
        let sensitive = self.sensitive;
        let category_bit =
            sensitive.sql_condition_bits("c.condition_id", |prefix| self.param(Bind::Text(prefix)));
        format!("{codes} AND (CAST({category_bit} AS BIGINT) & ~p.sensitive_mask) = 0")
    }

    fn condition(&mut self, criterion: &CodeCriterion) -> String {
        let codes = self.condition_codes(
            &criterion.system,
            std::slice::from_ref(&criterion.code),
            criterion.matching,
        );
        let window = self.window("COALESCE(c.onset_at, c.recorded_at)", &criterion.window);
        format!("EXISTS (SELECT 1 FROM condition_codes c WHERE {codes}{window})")
    }

    fn medication(&mut self, criterion: &CodeCriterion) -> String {
        let system_uri = terminology::canonical_system(&criterion.system);
        let system = self.param(Bind::Text(system_uri.to_owned()));
        let code_text = terminology::normalize_code(system_uri, &criterion.code).into_owned();
        // A prescription in a sensitive class is visible only if the
        // patient permits its category, as a diagnosis is.
        let sensitive = if self.sensitive.medication_may_be_sensitive(
            system_uri,
            &code_text,
            criterion.matching == CodeMatch::Prefix,
        ) {
            format!(
                " AND (CAST({} AS BIGINT) & ~p.sensitive_mask) = 0",
                self.sensitive
                    .sql_medication_bits("m.medication_request_id")
            )
        } else {
            String::new()
        };
        let code = self.code_test("m", code_text, criterion.matching);
        let window = self.window("m.authored_at", &criterion.window);
        format!(
            "EXISTS (SELECT 1 FROM medication_codes m WHERE m.patient_id = p.patient_id \
             AND m.system = {system} AND {code}{sensitive}{window})"
        )
    }

    fn observation(&mut self, criterion: &ObservationCriterion) -> String {
        let system_uri = terminology::canonical_system(&criterion.system);
        let system = self.param(Bind::Text(system_uri.to_owned()));
        let code_text = terminology::normalize_code(system_uri, &criterion.code).into_owned();
        let sensitive = self.observation_permitted("o");
        let code = self.param(Bind::Text(code_text));
        let mut range = String::new();
        if let Some(min) = criterion.min {
            range.push_str(&format!(" AND o.value >= {}", self.param(Bind::Float(min))));
        }
        if let Some(max) = criterion.max {
            range.push_str(&format!(" AND o.value <= {}", self.param(Bind::Float(max))));
        }
        let window = self.window("o.effective_at", &criterion.window);
        format!(
            "EXISTS (SELECT 1 FROM observation_values o WHERE o.patient_id = p.patient_id \
             AND o.system = {system} AND o.code = {code}{range}{window}{sensitive})"
        )
    }

    /// ` AND` the patient permits every category the observation row
    /// aliased `alias` is in, read from every coding of it and of its
    /// components (a panel's code may be unlisted, a component's listed).
    /// Binds nothing.
    fn observation_permitted(&self, alias: &str) -> String {
        format!(
            " AND (CAST({} AS BIGINT) & ~p.sensitive_mask) = 0",
            self.sensitive
                .sql_observation_bits(&format!("{alias}.observation_id"))
        )
    }

    fn encounter(&mut self, criterion: &EncounterCriterion) -> String {
        let class = match &criterion.class {
            Some(class) => format!(
                " AND n.class_code = {}",
                self.param(Bind::Text(class.clone()))
            ),
            None => String::new(),
        };
        let window = self.window("n.start_at", &criterion.window);
        let rows = format!("FROM encounters n WHERE n.patient_id = p.patient_id{class}{window}");
        if criterion.min_count <= 1 {
            format!("EXISTS (SELECT 1 {rows})")
        } else {
            let min = self.param(Bind::Int(i64::from(criterion.min_count)));
            format!("(SELECT COUNT(*) {rows}) >= {min}")
        }
    }

    /// The patients with the cohort's most selective code, as a subquery on
    /// a code index: an exact diagnosis, else a diagnosis prefix, else a
    /// prescription. None when the cohort has no coded criterion.
    ///
    /// Also returns the cohort without that criterion when the subquery
    /// already says all of it (no date window, and for a diagnosis no code
    /// it matches can be in a sensitive category), so that it is not tested
    /// twice per candidate.
    fn driver(
        &mut self,
        cohort: &ghx_study::query::Cohort,
    ) -> Option<(String, Option<ghx_study::query::Cohort>)> {
        let condition = cohort
            .conditions
            .iter()
            .position(|c| c.matching == CodeMatch::Exact)
            .or_else(|| (!cohort.conditions.is_empty()).then_some(0));
        let (table, criterion) = match condition {
            Some(i) => ("condition_codes", &cohort.conditions[i]),
            None => ("medication_codes", cohort.medications.first()?),
        };
        let system_uri = terminology::canonical_system(&criterion.system);
        let code_text = terminology::normalize_code(system_uri, &criterion.code).into_owned();
        let unwindowed = criterion.window.unix_bounds() == (None, None);
        // A diagnosis criterion stays in the rest: it tests the patient's
        // permission for the diagnosis's categories.
        let rest = match condition {
            None if unwindowed
                && !self.sensitive.medication_may_be_sensitive(
                    system_uri,
                    &code_text,
                    criterion.matching == CodeMatch::Prefix,
                ) =>
            {
                let mut rest = cohort.clone();
                rest.medications.remove(0);
                Some(rest)
            }
            _ => None,
        };
        let codes = [code_text];
        let test = if condition.is_some() {
            self.diagnosis_test("d", system_uri, &codes, criterion.matching)
        } else {
            self.code_tests("d", system_uri, &codes, criterion.matching)
        };
        Some((
            format!("SELECT d.patient_id FROM {table} d WHERE {test}"),
            rest,
        ))
    }

    /// Every criterion of a cohort or event, joined by AND.
    fn criteria(
        &mut self,
        conditions: &[CodeCriterion],
        observations: &[ObservationCriterion],
        encounters: &[EncounterCriterion],
        medications: &[CodeCriterion],
    ) -> Vec<String> {
        let mut tests = Vec::new();
        tests.extend(conditions.iter().map(|c| self.condition(c)));
        tests.extend(observations.iter().map(|o| self.observation(o)));
        tests.extend(encounters.iter().map(|e| self.encounter(e)));
        tests.extend(medications.iter().map(|m| self.medication(m)));
        tests
    }

    /// The index of the first diagnosis group the patient has, else -1.
    fn diagnosis(&mut self, groups: &[ghx_study::query::DiagnosisGroup]) -> String {
        let mut sql = "CASE".to_owned();
        for (i, g) in groups.iter().enumerate() {
            let codes = self.condition_codes(&g.system, &g.codes, g.matching);
            sql.push_str(&format!(
                " WHEN EXISTS (SELECT 1 FROM condition_codes c WHERE {codes}) THEN {i}"
            ));
        }
        sql.push_str(" ELSE -1 END");
        format!("CAST({sql} AS BIGINT)")
    }

    /// The analysis variable's value for the patient (NULL for age, which
    /// is computed from the birth date).
    fn variable(&mut self, variable: &Variable) -> String {
        if let (Variable::View { view, pick, .. }, Some(sha)) = (variable, variable.view_digest()) {
            let sha = self.param(Bind::Text(sha));
            let aggregate = match pick {
                Pick::Min => "MIN(v.value)",
                Pick::Max => "MAX(v.value)",
                _ => "CAST(AVG(v.value) AS DOUBLE PRECISION)",
            };
            // A row read from an observation counts only if the patient
            // permits every category of that observation (an HIV viral load
            // is HIV whatever view reads it); any view not over Patient is
            // treated as one over observations.
            let over_patients =
                view.get("resource").and_then(serde_json::Value::as_str) == Some("Patient");
            // An observation the index left out (entered in error) is not
            // read through a view either.
            let permitted = if over_patients {
                String::new()
            } else {
                format!(
                    " AND EXISTS (SELECT 1 FROM observation_values oy \
                     WHERE oy.observation_id = v.resource_id) \
                     AND (CAST({} AS BIGINT) & ~p.sensitive_mask) = 0",
                    self.sensitive.sql_observation_bits("v.resource_id")
                )
            };
            return format!(
                "(SELECT {aggregate} FROM view_values v \
                 WHERE v.view_sha256 = {sha} AND v.patient_id = p.patient_id{permitted})"
            );
        }
        let Variable::Observation {
            system,
            code,
            pick,
            window,
        } = variable
        else {
            return "CAST(NULL AS DOUBLE PRECISION)".to_owned();
        };
        let system_uri = terminology::canonical_system(system);
        let system = self.param(Bind::Text(system_uri.to_owned()));
        let code_text = terminology::normalize_code(system_uri, code).into_owned();
        let sensitive = self.observation_permitted("o");
        let code = self.param(Bind::Text(code_text));
        let window = self.window("o.effective_at", window);
        let rows = format!(
            "FROM observation_values o WHERE o.patient_id = p.patient_id AND o.system = {system} \
             AND o.code = {code} AND o.value IS NOT NULL{window}{sensitive}"
        );
        match pick {
            Pick::Latest => {
                format!("(SELECT o.value {rows} ORDER BY o.effective_at DESC NULLS LAST LIMIT 1)")
            }
            Pick::Earliest => {
                format!("(SELECT o.value {rows} ORDER BY o.effective_at ASC NULLS LAST LIMIT 1)")
            }
            Pick::Min => format!("(SELECT MIN(o.value) {rows})"),
            Pick::Max => format!("(SELECT MAX(o.value) {rows})"),
            Pick::Mean => format!("(SELECT CAST(AVG(o.value) AS DOUBLE PRECISION) {rows})"),
        }
    }

    fn event(&mut self, event: &Event) -> String {
        let tests = self.criteria(
            &event.conditions,
            &event.observations,
            &event.encounters,
            &event.medications,
        );
        format!("CASE WHEN {} THEN 1 ELSE 0 END", tests.join(" AND "))
    }
}

/// The SQL and its binds for a query.
pub(crate) fn compile(
    spec: &QuerySpec,
    dialect: Dialect,
    consent_context: &str,
    sensitive: &SensitiveCodes,
    output: Output,
) -> (String, Vec<Bind>) {
    let mut sql = Sql {
        dialect,
        binds: Vec::new(),
        sensitive,
    };
    let as_of = ymd(spec.cohort.as_of);
    let diagnosis = spec.dimensions().iter().find_map(|d| match d {
        Dimension::Diagnosis { diagnosis } => Some(diagnosis.as_slice()),
        _ => None,
    });
    let dx = |sql: &mut Sql| match diagnosis {
        Some(groups) => sql.diagnosis(groups),
        None => "CAST(-1 AS BIGINT)".to_owned(),
    };
    let selected = match output {
        Output::Counts => {
            let dims = spec.dimensions();
            let sex = if dims.contains(&Dimension::SEX) {
                "p.gender"
            } else {
                "''"
            };
            let band = if dims.contains(&Dimension::AGE_BAND) {
                let a = sql.param(Bind::Int(as_of));
                let b = sql.param(Bind::Int(as_of));
                format!(
                    "CASE WHEN p.birth_ymd IS NULL THEN -1 \
                          WHEN ({a} - p.birth_ymd) / 10000 >= 90 THEN 9 \
                          ELSE (({b} - p.birth_ymd) / 10000) / 10 END"
                )
            } else {
                // Typed, so the column decodes as BIGINT on every backend.
                "CAST(0 AS BIGINT)".to_owned()
            };
            let dx = dx(&mut sql);
            format!("{sex} AS k_sex, {band} AS k_band, {dx} AS k_dx, COUNT(*) AS n")
        }
        Output::Prints => "p.print AS print".to_owned(),
        Output::Members | Output::Analysis => {
            let full = output == Output::Members;
            let demographics = Demographics::of(spec);
            let id = if full {
                "p.patient_id"
            } else {
                "CAST('' AS TEXT)"
            };
            let gender = if full || demographics.gender {
                "p.gender"
            } else {
                "CAST('' AS TEXT)"
            };
            let birth = if full || demographics.birth {
                "p.birth_ymd"
            } else {
                "CAST(NULL AS BIGINT)"
            };
            let dx = dx(&mut sql);
            let value = match &spec.analysis {
                Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. } => {
                    sql.variable(variable)
                }
                _ => "CAST(NULL AS DOUBLE PRECISION)".to_owned(),
            };
            let event = match &spec.analysis {
                Analysis::Rate { event, .. } => sql.event(event),
                _ => "0".to_owned(),
            };
            format!(
                "{id} AS id, p.print AS print, {gender} AS gender, {birth} AS birth_ymd, {dx} AS dx, \
                 {value} AS value, CAST({event} AS BIGINT) AS event"
            )
        }
    };
    // Only patients whose consent permits this request take part. Their
    // decisions carry the demographics, so a candidate is one lookup.
    let context = sql.param(Bind::Text(consent_context.to_owned()));
    let mut text =
        format!("SELECT {selected} FROM consent_eligibility p WHERE p.context = {context}");
    let born = sql.param(Bind::Int(as_of));
    text.push_str(&format!(
        " AND (p.birth_ymd IS NULL OR p.birth_ymd <= {born})"
    ));
    // Drive the plan from the coded criterion that selects fewest patients:
    // the candidates with that code, looked up by code index, instead of a
    // probe per consenting patient. The criterion's full test (window,
    // sensitive categories) still follows.
    let mut rest = None;
    if let Some((driver, implied)) = sql.driver(&spec.cohort) {
        text.push_str(&format!(" AND p.patient_id IN ({driver})"));
        rest = implied;
    }
    if !spec.cohort.sex.is_empty() {
        let sexes: Vec<String> = spec
            .cohort
            .sex
            .iter()
            .map(|s| sql.param(Bind::Text(s.code().to_owned())))
            .collect();
        text.push_str(&format!(" AND p.gender IN ({})", sexes.join(", ")));
    }
    let cohort = rest.as_ref().unwrap_or(&spec.cohort);
    for test in sql.criteria(
        &cohort.conditions,
        &cohort.observations,
        &cohort.encounters,
        &cohort.medications,
    ) {
        text.push_str(" AND ");
        text.push_str(&test);
    }
    if let Some(age) = cohort.age {
        if let Some(min) = age.min {
            let a = sql.param(Bind::Int(as_of));
            let m = sql.param(Bind::Int(i64::from(min)));
            text.push_str(&format!(" AND ({a} - p.birth_ymd) / 10000 >= {m}"));
        }
        if let Some(max) = age.max {
            let a = sql.param(Bind::Int(as_of));
            let m = sql.param(Bind::Int(i64::from(max)));
            text.push_str(&format!(" AND ({a} - p.birth_ymd) / 10000 <= {m}"));
        }
    }
    if output == Output::Counts && !spec.dimensions().is_empty() {
        text.push_str(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
    }
    (text, sql.binds)
}

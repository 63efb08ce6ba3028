//! The ghx query language, version `ghx.query/v1`: a cohort of patients and an
//! aggregate analysis over it.
//!
//! A query travels as canonical JSON (see [`QuerySpec::canonical_json`]); the
//! capability for a study binds the SHA-256 of exactly those bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::Date;

/// The language version this crate speaks.
pub const VERSION: &str = "ghx.query/v1";
/// Smallest epsilon any noised release may declare: far below it the
/// floating-point noise samplers degenerate (`exp(-epsilon)` is 1), and
/// no release needs it.
pub const MIN_EPSILON: f64 = 0.01;

/// The KCD-8 code system as KR Core names it.
pub const KCD8_SYSTEM: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
/// ICD-10 (WHO), which KCD-8 extends.
pub const ICD10_SYSTEM: &str = "http://hl7.org/fhir/sid/icd-10";
/// LOINC.
pub const LOINC_SYSTEM: &str = "http://loinc.org";

/// Most grouping dimensions one query may ask for; more would make cells too
/// small to release anyway.
const MAX_DIMENSIONS: usize = 3;
/// Most criteria (conditions, observations, encounters and medications
/// together) a cohort or an event may list.
pub const MAX_CRITERIA: usize = 32;
/// Most codes one diagnosis group may list.
pub const MAX_GROUP_CODES: usize = 200;
/// Most codes a query may read in all.
pub const MAX_CODES: usize = 1000;
/// Most cells a query's full table may have (every combination of its
/// dimensions' values, times the bins of a histogram): disclosure control
/// audits each released table, and noise covers every cell of it.
pub const MAX_CELLS: u64 = 10_000;

/// A query that failed validation; the message names the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("query is not valid JSON for {VERSION}: {0}")]
    Syntax(String),
    #[error("unsupported query version `{0}`; this node speaks {VERSION}")]
    Version(String),
    #[error("cohort.conditions[{index}]: {problem}")]
    Condition { index: usize, problem: String },
    #[error("analysis.group_by: {0}")]
    GroupBy(String),
    #[error("cohort.observations[{index}]: {problem}")]
    Observation { index: usize, problem: String },
    #[error("cohort.age: {0}")]
    Age(String),
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A versioned aggregate query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    pub version: String,
    pub cohort: Cohort,
    pub analysis: Analysis,
    /// Calibrated noise each node adds before release; none by default.
    /// In a pooled release, each node's share of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<Noise>,
    /// Whether each hospital releases its own cells (the default), or the
    /// hospitals' cells are summed under secure aggregation and only the
    /// federation's table is released.
    #[serde(default, skip_serializing_if = "Release::is_per_hospital")]
    pub release: Release,
    /// In a pooled count, histogram or rate: count each patient once
    /// across hospitals, by the linkage tokens of their resident
    /// registration numbers, rather than once per hospital that treats
    /// them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub each_patient_once: bool,
    /// Slots of each distinct count's bitmap (a power of two, 256 to
    /// 65,536); [`DEFAULT_LINKAGE_SLOTS`] when unset, fewer when the table
    /// has many cells ([`QuerySpec::linkage_slots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkage_slots: Option<u32>,
}

/// Slots per distinct count when a query sets none: linear counting's
/// standard error stays under 2% up to about 80,000 patients per cell.
pub const DEFAULT_LINKAGE_SLOTS: u32 = 1 << 14;
/// Most numbers all of a linked table's bitmaps may hold together (each a
/// 64-bit number on the wire).
pub const MAX_LINKAGE_NUMBERS: u64 = 1 << 20;

/// How a query's cells are released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// Each hospital suppresses its own small cells; the coordinator adds
    /// what they release.
    #[default]
    PerHospital,
    /// Each hospital's raw cells, with its share of the noise, are masked
    /// and summed under secure aggregation; disclosure control applies to
    /// the federation's (noisy) table, and no hospital's cell is seen.
    Pooled,
}

impl Release {
    fn is_per_hospital(&self) -> bool {
        *self == Release::PerHospital
    }

    pub fn name(self) -> &'static str {
        match self {
            Release::PerHospital => "per_hospital",
            Release::Pooled => "pooled",
        }
    }
}

/// Which patients the analysis counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    /// The date ages are computed at; fixed in the query so that every node
    /// and every rerun computes the same ages.
    #[serde(with = "iso_date")]
    pub as_of: Date,
    /// Every listed condition must be recorded for the patient.
    #[serde(default)]
    pub conditions: Vec<CodeCriterion>,
    /// Every listed observation must be recorded for the patient, with a
    /// value in the range when one is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<ObservationCriterion>,
    /// Optional age range at `as_of`, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<AgeRange>,
    /// Administrative genders admitted; empty admits every patient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sex: Vec<Sex>,
    /// Every listed encounter criterion must be met.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encounters: Vec<EncounterCriterion>,
    /// Every listed medication must have been prescribed (MedicationRequest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub medications: Vec<CodeCriterion>,
}

/// FHIR administrative gender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sex {
    Female,
    Male,
    Other,
    Unknown,
}

impl Sex {
    pub fn code(self) -> &'static str {
        match self {
            Sex::Female => "female",
            Sex::Male => "male",
            Sex::Other => "other",
            Sex::Unknown => "unknown",
        }
    }
}

/// Days (inclusive) in Korea Standard Time (UTC+09:00) within which a
/// recorded event must fall; either end may be open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    #[serde(
        default,
        with = "opt_iso_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub from: Option<Date>,
    #[serde(
        default,
        with = "opt_iso_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub to: Option<Date>,
}

/// Seconds KST is ahead of UTC.
const KST_OFFSET_SECONDS: i64 = 9 * 3600;

impl Window {
    /// The window as half-open Unix-second bounds `[start, end)`.
    pub fn unix_bounds(&self) -> (Option<i64>, Option<i64>) {
        let midnight = |d: Date| d.midnight().assume_utc().unix_timestamp() - KST_OFFSET_SECONDS;
        (
            self.from.map(midnight),
            self.to.map(|d| midnight(d) + 86_400),
        )
    }

    fn check(&self, field: &str) -> Result<(), Error> {
        if let (Some(from), Some(to)) = (self.from, self.to)
            && to < from
        {
            return Err(invalid(
                field,
                format!("window ends ({to}) before it starts ({from})"),
            ));
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }
}

/// Encounters the patient must have had: of a class (HL7 v3 ActCode such as
/// AMB, IMP, EMER), within a window, at least `min_count` times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncounterCriterion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Window::is_open")]
    pub window: Window,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub min_count: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// An observation criterion: a code (LOINC, or a local code the node maps to
/// LOINC) and an optional inclusive value range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationCriterion {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// When the observation was made (`effective`).
    #[serde(default, skip_serializing_if = "Window::is_open")]
    pub window: Window,
}

/// A coded criterion: a code system and a code or code prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeCriterion {
    pub system: String,
    pub code: String,
    #[serde(default, rename = "match")]
    pub matching: CodeMatch,
    /// When the event was recorded: a condition's onset (else its recorded
    /// date), a prescription's authoring.
    #[serde(default, skip_serializing_if = "Window::is_open")]
    pub window: Window,
}

/// How a criterion's code is compared with recorded codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeMatch {
    /// The recorded code equals the criterion's code.
    #[default]
    Exact,
    /// The recorded code starts with the criterion's code (E11 matches E11.9).
    Prefix,
}

/// Inclusive age bounds in whole years.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeRange {
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
}

/// What is computed over the cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Analysis {
    /// Number of distinct patients, optionally cross-tabulated.
    Count {
        #[serde(default)]
        group_by: Vec<Dimension>,
    },
    /// Count, mean, standard deviation, minimum and maximum of a numeric
    /// variable, per group.
    Summary {
        variable: Variable,
        #[serde(default)]
        group_by: Vec<Dimension>,
        /// Values are clamped into this range before anything is computed;
        /// required with noise, which is calibrated to it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip: Option<Range>,
    },
    /// Counts of a numeric variable in fixed bins (the same at every node,
    /// so histograms add up exactly), per group; quantiles are read off the
    /// combined histogram.
    Histogram {
        variable: Variable,
        bins: Bins,
        #[serde(default)]
        group_by: Vec<Dimension>,
        /// Quantiles (0 < q < 1) to estimate from the histogram.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        quantiles: Vec<f64>,
    },
    /// Crude rate: patients of the cohort with the event, per `per`
    /// patients of the cohort, per group.
    Rate {
        event: Event,
        #[serde(default = "per_thousand")]
        per: u32,
        #[serde(default)]
        group_by: Vec<Dimension>,
    },
}

fn per_thousand() -> u32 {
    1000
}

/// The event a rate counts: criteria of the same kinds as the cohort's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<CodeCriterion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<ObservationCriterion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encounters: Vec<EncounterCriterion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub medications: Vec<CodeCriterion>,
}

/// An inclusive numeric range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

/// Histogram bins: `count` bins of `width` from `start`, plus an underflow
/// bin below `start` and an overflow bin at or above the last edge.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bins {
    pub start: f64,
    pub width: f64,
    pub count: u32,
}

/// Most bins a histogram may have.
pub const MAX_BINS: u32 = 200;

impl Bins {
    /// The bin index of a value: 0 is the underflow bin, `count + 1` the
    /// overflow bin.
    pub fn index(&self, value: f64) -> usize {
        if value < self.start {
            return 0;
        }
        let i = ((value - self.start) / self.width).floor();
        if i >= f64::from(self.count) {
            self.count as usize + 1
        } else {
            i as usize + 1
        }
    }

    /// The half-open interval `[lo, hi)` of bin `index` (infinite at the ends).
    pub fn bounds(&self, index: usize) -> (f64, f64) {
        let edge = |i: usize| self.start + self.width * i as f64;
        match index {
            0 => (f64::NEG_INFINITY, self.start),
            i if i > self.count as usize => (edge(self.count as usize), f64::INFINITY),
            i => (edge(i - 1), edge(i)),
        }
    }

    /// The label of bin `index` as it appears in cell keys: `<40`,
    /// `[40,50)`, `>=120`.
    pub fn label(&self, index: usize) -> String {
        match self.bounds(index) {
            (lo, hi) if lo.is_infinite() => format!("<{hi}"),
            (lo, hi) if hi.is_infinite() => format!(">={lo}"),
            (lo, hi) => format!("[{lo},{hi})"),
        }
    }

    /// The bin whose label is `label`.
    pub fn index_of(&self, label: &str) -> Option<usize> {
        (0..self.count as usize + 2).find(|i| self.label(*i) == label)
    }
}

/// A numeric value per patient of the cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Variable {
    /// Age in whole years at `as_of`.
    Age,
    /// The value of an observation (LOINC, or a local code mapped to it),
    /// picked among the patient's observations in the window.
    Observation {
        system: String,
        code: String,
        #[serde(default)]
        pick: Pick,
        #[serde(default, skip_serializing_if = "Window::is_open")]
        window: Window,
    },
    /// A column of an SQL on FHIR v2 ViewDefinition over Patient or
    /// Observation resources. The view must have a column `patient` (the
    /// patient's id, e.g. `subject.getReferenceKey(Patient)` or
    /// `getResourceKey()`); `pick` (min, max or mean) combines a patient's rows.
    View {
        view: serde_json::Value,
        column: String,
        pick: Pick,
    },
}

/// Resource types a view variable may read: not diagnoses or prescriptions,
/// whose sensitive categories a view could not be held to.
pub const VIEW_RESOURCES: [&str; 2] = ["Patient", "Observation"];

impl Variable {
    /// What the variable measures, whichever of a patient's values it
    /// picks: `age`, an observation's `system|code`, a view's digest and
    /// column. Exact summaries of one measurement share one clip range,
    /// and exact histograms one set of bins (two give, by difference, what
    /// the patients between them hold).
    pub fn measurement(&self) -> String {
        match self {
            Variable::Age => "age".to_owned(),
            Variable::Observation { system, code, .. } => format!("observation {system}|{code}"),
            Variable::View { column, .. } => {
                format!("view {} {column}", self.view_digest().unwrap_or_default())
            }
        }
    }

    /// The SHA-256 of a view variable's canonical ViewDefinition (keys
    /// sorted), under which the node materialises it.
    pub fn view_digest(&self) -> Option<String> {
        match self {
            Variable::View { view, .. } => {
                Some(digest(&serde_json::to_vec(view).expect("JSON serializes")))
            }
            _ => None,
        }
    }
}

/// Which of a patient's observation values a variable takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pick {
    /// The most recent one.
    #[default]
    Latest,
    /// The first one.
    Earliest,
    /// The lowest one.
    Min,
    /// The highest one.
    Max,
    /// The average of all of them.
    Mean,
}

/// Noise added to every released number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noise {
    pub mechanism: Mechanism,
    /// Privacy-loss parameter charged to the study's budget for this query.
    pub epsilon: f64,
    /// For the Gaussian mechanism: the probability the epsilon bound fails.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delta: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A differential-privacy mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Discrete Laplace (two-sided geometric) noise on counts, Laplace noise
    /// on sums; pure epsilon-differential privacy.
    Laplace,
    /// Gaussian noise, (epsilon, delta)-differential privacy.
    Gaussian,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }
}

/// A grouping dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dimension {
    /// `"sex"` or `"age_band"`.
    Named(Named),
    /// `{"diagnosis": [groups]}`: the first listed group whose codes the
    /// patient has, else `none`.
    Diagnosis { diagnosis: Vec<DiagnosisGroup> },
}

/// A dimension named by a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Named {
    /// FHIR administrative gender: female, male, other, unknown.
    Sex,
    /// Ten-year age band at `as_of`: 0-9, 10-19, ..., 80-89, 90+.
    AgeBand,
}

/// A labelled set of diagnosis codes, one value of a diagnosis dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosisGroup {
    pub label: String,
    pub system: String,
    pub codes: Vec<String>,
    #[serde(default, rename = "match")]
    pub matching: CodeMatch,
}

/// The value of a diagnosis dimension for patients in none of its groups.
pub const NO_DIAGNOSIS: &str = "none";

impl Dimension {
    pub const SEX: Dimension = Dimension::Named(Named::Sex);
    pub const AGE_BAND: Dimension = Dimension::Named(Named::AgeBand);

    pub fn name(&self) -> &'static str {
        match self {
            Dimension::Named(Named::Sex) => "sex",
            Dimension::Named(Named::AgeBand) => "age_band",
            Dimension::Diagnosis { .. } => "diagnosis",
        }
    }
}

/// FHIR administrative genders: the sex dimension's full domain.
const SEXES: [Sex; 4] = [Sex::Female, Sex::Male, Sex::Other, Sex::Unknown];

/// The age bands (as [`age_band_label`] numbers them) a cohort of ages
/// `range` can fill: every band, "unknown" (-1) included, without a range;
/// with one, the bands it overlaps (a patient without a birth date never
/// meets a range).
pub fn age_bands(range: Option<AgeRange>) -> impl Iterator<Item = i64> {
    let (min, max) = match range {
        None => (None, None),
        Some(r) => (r.min.map(i64::from), r.max.map(i64::from)),
    };
    let unknown = range.is_none_or(|r| r.min.is_none() && r.max.is_none());
    (-1..=9).filter(move |band| match *band {
        -1 => unknown,
        b => {
            let (lo, hi) = (b * 10, if b == 9 { i64::MAX } else { b * 10 + 9 });
            min.is_none_or(|m| hi >= m) && max.is_none_or(|m| lo <= m)
        }
    })
}

/// The label of the ten-year age band with index `band` (age / 10, capped at 9).
pub fn age_band_label(band: i64) -> String {
    match band {
        b if b >= 9 => "90+".to_owned(),
        b if b < 0 => "unknown".to_owned(),
        b => format!("{}-{}", b * 10, b * 10 + 9),
    }
}

impl QuerySpec {
    /// Parses and validates a query document.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        // Check the version first so an old or new document gets a version
        // error rather than a confusing field error.
        match declared_version(json).map_err(Error::Syntax)? {
            Some(v) if v == VERSION => {}
            Some(other) => return Err(Error::Version(other)),
            None => return Err(Error::Syntax("missing field `version`".to_owned())),
        }
        let spec: QuerySpec =
            serde_json::from_slice(json).map_err(|e| Error::Syntax(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), Error> {
        let cohort = &self.cohort;
        let mut criteria = vec![(
            "cohort",
            cohort.conditions.len()
                + cohort.observations.len()
                + cohort.encounters.len()
                + cohort.medications.len(),
        )];
        if let Analysis::Rate { event, .. } = &self.analysis {
            criteria.push((
                "analysis.event",
                event.conditions.len()
                    + event.observations.len()
                    + event.encounters.len()
                    + event.medications.len(),
            ));
        }
        if let Some((field, n)) = criteria.into_iter().find(|(_, n)| *n > MAX_CRITERIA) {
            return Err(invalid(
                field,
                format!("at most {MAX_CRITERIA} criteria in all, got {n}"),
            ));
        }
        for (index, criterion) in self.cohort.conditions.iter().enumerate() {
            check_code(&criterion.system, &criterion.code).map_err(|p| Error::Condition {
                index,
                problem: p.to_owned(),
            })?;
            criterion
                .window
                .check(&format!("cohort.conditions[{index}]"))?;
        }
        for (index, criterion) in self.cohort.observations.iter().enumerate() {
            check_observation(criterion)
                .map_err(|problem| Error::Observation { index, problem })?;
        }
        check_events("cohort", &self.cohort.medications, &self.cohort.encounters)?;
        if let Some(AgeRange {
            min: Some(min),
            max: Some(max),
        }) = self.cohort.age
            && min > max
        {
            return Err(Error::Age(format!("min {min} is greater than max {max}")));
        }
        for (i, s) in self.cohort.sex.iter().enumerate() {
            if self.cohort.sex[..i].contains(s) {
                return Err(invalid(
                    "cohort.sex",
                    format!("`{}` is listed twice", s.code()),
                ));
            }
        }
        let group_by = self.dimensions();
        if group_by.len() > MAX_DIMENSIONS {
            return Err(Error::GroupBy(format!(
                "at most {MAX_DIMENSIONS} dimensions, got {}",
                group_by.len()
            )));
        }
        for (i, d) in group_by.iter().enumerate() {
            if group_by[..i].iter().any(|e| e.name() == d.name()) {
                return Err(Error::GroupBy(format!("`{}` is listed twice", d.name())));
            }
            if let Dimension::Diagnosis { diagnosis } = d {
                check_diagnosis_groups(diagnosis)?;
            }
        }
        let codes = self.codes_read().len();
        if codes > MAX_CODES {
            return Err(invalid(
                "query",
                format!("reads at most {MAX_CODES} codes in all, got {codes}"),
            ));
        }
        let cells = self.full_table_cells();
        if cells > MAX_CELLS {
            return Err(Error::GroupBy(format!(
                "the full table would have {cells} cells; at most {MAX_CELLS} (fewer dimensions, groups or bins)"
            )));
        }
        if self.each_patient_once || self.linkage_slots.is_some() {
            self.check_linkage()?;
        }
        if self.release == Release::Pooled {
            if let Some(noise) = &self.noise
                && (noise.mechanism != Mechanism::Gaussian || noise.delta <= 0.0)
            {
                return Err(invalid(
                    "noise",
                    "a pooled release adds distributed discrete Gaussian noise: the mechanism must be gaussian, with a delta",
                ));
            }
            if let Analysis::Summary { clip: None, .. } = &self.analysis {
                return Err(invalid(
                    "analysis.clip",
                    "a pooled summary needs a clip range: values are summed in fixed point within it",
                ));
            }
        }
        match &self.analysis {
            Analysis::Count { .. } => {}
            Analysis::Summary { variable, clip, .. } => {
                check_variable(variable)?;
                if let Some(r) = clip
                    && !(r.min.is_finite() && r.max.is_finite() && r.min <= r.max)
                {
                    return Err(invalid(
                        "analysis.clip",
                        "min and max must be finite with min <= max",
                    ));
                }
                if self.noise.is_some() && clip.is_none() {
                    return Err(invalid(
                        "analysis.clip",
                        "a summary with noise needs a clip range: the noise is calibrated to it",
                    ));
                }
            }
            Analysis::Histogram {
                variable,
                bins,
                quantiles,
                ..
            } => {
                check_variable(variable)?;
                if !(bins.start.is_finite() && bins.width.is_finite() && bins.width > 0.0) {
                    return Err(invalid(
                        "analysis.bins",
                        "start must be finite and width a positive number",
                    ));
                }
                if bins.count == 0 || bins.count > MAX_BINS {
                    return Err(invalid(
                        "analysis.bins",
                        format!("count must be 1 to {MAX_BINS}"),
                    ));
                }
                if let Some(q) = quantiles.iter().find(|q| !(**q > 0.0 && **q < 1.0)) {
                    return Err(invalid(
                        "analysis.quantiles",
                        format!("{q} is not between 0 and 1 (exclusive)"),
                    ));
                }
            }
            Analysis::Rate { event, per, .. } => {
                if *per == 0 {
                    return Err(invalid("analysis.per", "must be at least 1"));
                }
                if event.conditions.is_empty()
                    && event.observations.is_empty()
                    && event.encounters.is_empty()
                    && event.medications.is_empty()
                {
                    return Err(invalid(
                        "analysis.event",
                        "needs at least one condition, observation, encounter or medication",
                    ));
                }
                for (i, c) in event.conditions.iter().enumerate() {
                    check_code(&c.system, &c.code)
                        .map_err(|p| invalid(format!("analysis.event.conditions[{i}]"), p))?;
                    c.window.check(&format!("analysis.event.conditions[{i}]"))?;
                }
                for (i, o) in event.observations.iter().enumerate() {
                    check_observation(o)
                        .map_err(|p| invalid(format!("analysis.event.observations[{i}]"), p))?;
                }
                check_events("analysis.event", &event.medications, &event.encounters)?;
            }
        }
        if let Some(noise) = &self.noise {
            // Below MIN_EPSILON, exp(-epsilon) rounds towards 1 and the
            // noise towards nothing (a tiny epsilon must not mean exact).
            if !(noise.epsilon.is_finite() && noise.epsilon >= MIN_EPSILON && noise.epsilon <= 10.0)
            {
                return Err(invalid(
                    "noise.epsilon",
                    format!("must be at least {MIN_EPSILON} and at most 10"),
                ));
            }
            match noise.mechanism {
                Mechanism::Laplace if noise.delta != 0.0 => {
                    return Err(invalid(
                        "noise.delta",
                        "the Laplace mechanism takes no delta",
                    ));
                }
                Mechanism::Gaussian if !(noise.delta > 0.0 && noise.delta < 1e-3) => {
                    return Err(invalid(
                        "noise.delta",
                        "the Gaussian mechanism needs 0 < delta < 0.001",
                    ));
                }
                // The classical calibration holds for epsilon < 1; a pooled
                // release's zCDP accounting for any.
                Mechanism::Gaussian if noise.epsilon >= 1.0 && self.release != Release::Pooled => {
                    return Err(invalid(
                        "noise.epsilon",
                        "the Gaussian mechanism as calibrated here needs epsilon < 1 (a pooled release takes any)",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The canonical encoding: what travels and what the capability binds.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a query spec always serializes")
    }

    /// The FHIR resource types the query reads.
    pub fn resource_types(&self) -> std::collections::BTreeSet<String> {
        let mut types = std::collections::BTreeSet::from(["Patient".to_owned()]);
        let mut add = |present: bool, t: &str| {
            if present {
                types.insert(t.to_owned());
            }
        };
        let c = &self.cohort;
        add(!c.conditions.is_empty(), "Condition");
        add(!c.observations.is_empty(), "Observation");
        add(!c.encounters.is_empty(), "Encounter");
        add(!c.medications.is_empty(), "MedicationRequest");
        add(
            self.dimensions()
                .iter()
                .any(|d| matches!(d, Dimension::Diagnosis { .. })),
            "Condition",
        );
        match &self.analysis {
            Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. } => {
                add(
                    matches!(variable, Variable::Observation { .. }),
                    "Observation",
                );
            }
            Analysis::Rate { event, .. } => {
                add(!event.conditions.is_empty(), "Condition");
                add(!event.observations.is_empty(), "Observation");
                add(!event.encounters.is_empty(), "Encounter");
                add(!event.medications.is_empty(), "MedicationRequest");
            }
            Analysis::Count { .. } => {}
        }
        types
    }

    /// The grouping dimensions, in cell-key order.
    pub fn dimensions(&self) -> &[Dimension] {
        match &self.analysis {
            Analysis::Count { group_by }
            | Analysis::Summary { group_by, .. }
            | Analysis::Histogram { group_by, .. }
            | Analysis::Rate { group_by, .. } => group_by,
        }
    }

    /// What counting each patient once asks: a pooled count, histogram
    /// or rate, and bitmaps that fit.
    fn check_linkage(&self) -> Result<(), Error> {
        if !self.each_patient_once {
            return Err(invalid("linkage_slots", "set only with each_patient_once"));
        }
        if self.release != Release::Pooled {
            return Err(invalid(
                "each_patient_once",
                "needs a pooled release: only a secure sum over the hospitals can count a patient once",
            ));
        }
        if let Analysis::Summary { .. } = self.analysis {
            return Err(invalid(
                "each_patient_once",
                "applies to counts, histograms and rates; a pooled summary uses each hospital's value of a patient (see THREATS.md)",
            ));
        }
        if let Some(slots) = self.linkage_slots
            && (!slots.is_power_of_two() || !(256..=65_536).contains(&slots))
        {
            return Err(invalid(
                "linkage_slots",
                format!("must be a power of two from 256 to 65536, got {slots}"),
            ));
        }
        let numbers = self.full_table_cells() * self.numbers_per_cell();
        if numbers * 256 > MAX_LINKAGE_NUMBERS {
            return Err(invalid(
                "each_patient_once",
                format!(
                    "the table's {numbers} distinct counts of at least 256 slots each exceed {MAX_LINKAGE_NUMBERS} numbers; fewer dimensions or bins"
                ),
            ));
        }
        Ok(())
    }

    /// Counts per cell: two for a rate (events and population), else one.
    fn numbers_per_cell(&self) -> u64 {
        match self.analysis {
            Analysis::Rate { .. } => 2,
            _ => 1,
        }
    }

    /// The slots of each distinct count's bitmap when counting each patient
    /// once: the asked or default number, halved until all bitmaps fit in
    /// [`MAX_LINKAGE_NUMBERS`]; `None` when the query counts per hospital.
    pub fn linkage_slots(&self) -> Option<u32> {
        if !self.each_patient_once {
            return None;
        }
        let numbers = (self.table_keys().len() as u64 * self.numbers_per_cell()).max(1);
        let mut slots = self.linkage_slots.unwrap_or(DEFAULT_LINKAGE_SLOTS);
        while slots > 256 && numbers * u64::from(slots) > MAX_LINKAGE_NUMBERS {
            slots /= 2;
        }
        Some(slots)
    }

    /// How many cells the full table of this query has: every value of
    /// every dimension (4 sexes, 11 age bands with `unknown`, each
    /// diagnosis group and `none`) combined, times a histogram's bins with
    /// its underflow and overflow bins.
    pub fn full_table_cells(&self) -> u64 {
        let values = |d: &Dimension| -> u64 {
            match d {
                Dimension::Named(Named::Sex) => 4,
                Dimension::Named(Named::AgeBand) => 11,
                Dimension::Diagnosis { diagnosis } => diagnosis.len() as u64 + 1,
            }
        };
        let bins = match &self.analysis {
            Analysis::Histogram { bins, .. } => u64::from(bins.count) + 2,
            _ => 1,
        };
        self.dimensions()
            .iter()
            .map(values)
            .fold(bins, u64::saturating_mul)
    }

    /// The names of the cell-key components: the grouping dimensions, then
    /// `bin` for a histogram.
    pub fn key_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .dimensions()
            .iter()
            .map(|d| d.name().to_owned())
            .collect();
        if matches!(self.analysis, Analysis::Histogram { .. }) {
            names.push("bin".to_owned());
        }
        names
    }

    /// Every coded thing the query reads, wherever in the query it appears:
    /// cohort and event criteria, diagnosis groups and the analysis
    /// variable. What a manifest must declare and a policy is asked about.
    pub fn codes_read(&self) -> Vec<CodeRead<'_>> {
        fn add<'a>(
            out: &mut Vec<CodeRead<'a>>,
            conditions: &'a [CodeCriterion],
            observations: &'a [ObservationCriterion],
            medications: &'a [CodeCriterion],
        ) {
            for c in conditions {
                out.push(CodeRead {
                    resource_type: "Condition",
                    system: &c.system,
                    code: &c.code,
                    matching: c.matching,
                });
            }
            for o in observations {
                out.push(CodeRead {
                    resource_type: "Observation",
                    system: &o.system,
                    code: &o.code,
                    matching: CodeMatch::Exact,
                });
            }
            for m in medications {
                out.push(CodeRead {
                    resource_type: "MedicationRequest",
                    system: &m.system,
                    code: &m.code,
                    matching: m.matching,
                });
            }
        }
        let mut out = Vec::new();
        let c = &self.cohort;
        add(&mut out, &c.conditions, &c.observations, &c.medications);
        for d in self.dimensions() {
            if let Dimension::Diagnosis { diagnosis } = d {
                for g in diagnosis {
                    for code in &g.codes {
                        out.push(CodeRead {
                            resource_type: "Condition",
                            system: &g.system,
                            code,
                            matching: g.matching,
                        });
                    }
                }
            }
        }
        match &self.analysis {
            Analysis::Summary { variable, .. } | Analysis::Histogram { variable, .. } => {
                if let Variable::Observation { system, code, .. } = variable {
                    out.push(CodeRead {
                        resource_type: "Observation",
                        system,
                        code,
                        matching: CodeMatch::Exact,
                    });
                }
            }
            Analysis::Rate { event, .. } => {
                add(
                    &mut out,
                    &event.conditions,
                    &event.observations,
                    &event.medications,
                );
            }
            Analysis::Count { .. } => {}
        }
        out
    }

    /// A sort key for a cell key of this query that puts cells in the
    /// dimensions' natural order (age bands and bins ascending, diagnosis
    /// groups as listed, `none` and `unknown` last) rather than by label.
    pub fn key_order(&self, key: &[String]) -> Vec<(usize, String)> {
        let bins = match &self.analysis {
            Analysis::Histogram { bins, .. } => Some(bins),
            _ => None,
        };
        key.iter()
            .enumerate()
            .map(|(i, label)| {
                let rank = match self.dimensions().get(i) {
                    Some(Dimension::Named(Named::AgeBand)) => (0..10)
                        .position(|b| age_band_label(b) == *label)
                        .unwrap_or(10),
                    Some(Dimension::Diagnosis { diagnosis }) => diagnosis
                        .iter()
                        .position(|g| g.label == *label)
                        .unwrap_or(diagnosis.len()),
                    Some(Dimension::Named(Named::Sex)) => 0,
                    None => bins.and_then(|b| b.index_of(label)).unwrap_or(usize::MAX),
                };
                (rank, label.clone())
            })
            .collect()
    }

    /// Every cell key of the query's full table, in [`QuerySpec::key_order`]:
    /// every value of every dimension the cohort admits (the sexes it
    /// lists, the age bands its range can fill, each diagnosis group and
    /// `none`) combined, then a histogram's bins. The query alone decides,
    /// so that which cells a table lists says nothing of who is in it; and
    /// nodes and the coordinator lay a pooled table out by it alike.
    pub fn table_keys(&self) -> Vec<Vec<String>> {
        let mut axes: Vec<Vec<String>> = self
            .dimensions()
            .iter()
            .map(|d| match d {
                Dimension::Named(Named::Sex) => {
                    if self.cohort.sex.is_empty() {
                        SEXES.iter().map(|s| s.code().to_owned()).collect()
                    } else {
                        self.cohort
                            .sex
                            .iter()
                            .map(|s| s.code().to_owned())
                            .collect()
                    }
                }
                Dimension::Named(Named::AgeBand) => {
                    age_bands(self.cohort.age).map(age_band_label).collect()
                }
                Dimension::Diagnosis { diagnosis } => diagnosis
                    .iter()
                    .map(|g| g.label.clone())
                    .chain([NO_DIAGNOSIS.to_owned()])
                    .collect(),
            })
            .collect();
        if let Analysis::Histogram { bins, .. } = &self.analysis {
            axes.push(
                (0..bins.count as usize + 2)
                    .map(|i| bins.label(i))
                    .collect(),
            );
        }
        let mut keys = axes.iter().fold(vec![Vec::new()], |keys, axis| {
            keys.iter()
                .flat_map(|k| {
                    axis.iter().map(move |part| {
                        let mut k = k.clone();
                        k.push(part.clone());
                        k
                    })
                })
                .collect()
        });
        keys.sort_by_cached_key(|k| self.key_order(k));
        keys
    }

    /// The analysis kind's name.
    pub fn kind(&self) -> &'static str {
        match self.analysis {
            Analysis::Count { .. } => "count",
            Analysis::Summary { .. } => "summary",
            Analysis::Histogram { .. } => "histogram",
            Analysis::Rate { .. } => "rate",
        }
    }
}

fn check_observation(criterion: &ObservationCriterion) -> Result<(), String> {
    check_code(&criterion.system, &criterion.code).map_err(str::to_owned)?;
    for bound in [criterion.min, criterion.max].into_iter().flatten() {
        if !bound.is_finite() {
            return Err("min and max must be finite numbers".to_owned());
        }
    }
    if let (Some(min), Some(max)) = (criterion.min, criterion.max)
        && min > max
    {
        return Err(format!("min {min} is greater than max {max}"));
    }
    criterion.window.check("window").map_err(|e| e.to_string())
}

fn check_events(
    at: &str,
    medications: &[CodeCriterion],
    encounters: &[EncounterCriterion],
) -> Result<(), Error> {
    for (i, m) in medications.iter().enumerate() {
        let field = format!("{at}.medications[{i}]");
        check_code(&m.system, &m.code).map_err(|p| invalid(&field, p))?;
        m.window.check(&field)?;
    }
    for (i, e) in encounters.iter().enumerate() {
        let field = format!("{at}.encounters[{i}]");
        if let Some(class) = &e.class
            && !(1..=16).contains(&class.len())
        {
            return Err(invalid(
                &field,
                "class must be an ActCode such as AMB, IMP or EMER",
            ));
        }
        if e.min_count == 0 {
            return Err(invalid(&field, "min_count must be at least 1"));
        }
        e.window.check(&field)?;
    }
    Ok(())
}

fn check_variable(variable: &Variable) -> Result<(), Error> {
    if let Variable::View { view, column, pick } = variable {
        let field = "analysis.variable.view";
        let parsed = ghx_sof::View::parse(view).map_err(|e| invalid(field, e.to_string()))?;
        if !VIEW_RESOURCES.contains(&parsed.resource()) {
            return Err(invalid(
                field,
                format!(
                    "a view variable may read {} only, not {}",
                    VIEW_RESOURCES.join(" or "),
                    parsed.resource()
                ),
            ));
        }
        for needed in ["patient", column.as_str()] {
            if !parsed.columns().iter().any(|c| c == needed) {
                return Err(invalid(field, format!("the view has no column `{needed}`")));
            }
        }
        if !matches!(pick, Pick::Min | Pick::Max | Pick::Mean) {
            return Err(invalid(
                "analysis.variable.pick",
                "a view variable takes min, max or mean of a patient's rows",
            ));
        }
        return Ok(());
    }
    if let Variable::Observation {
        system,
        code,
        window,
        ..
    } = variable
    {
        check_code(system, code).map_err(|p| invalid("analysis.variable", p))?;
        window.check("analysis.variable")?;
    }
    Ok(())
}

fn check_diagnosis_groups(groups: &[DiagnosisGroup]) -> Result<(), Error> {
    if groups.is_empty() || groups.len() > 20 {
        return Err(Error::GroupBy("diagnosis needs 1 to 20 groups".to_owned()));
    }
    for (i, g) in groups.iter().enumerate() {
        let label_ok = !g.label.is_empty()
            && g.label.len() <= 40
            && g.label != NO_DIAGNOSIS
            && !g.label.contains(['<', '>', '[']);
        if !label_ok || groups[..i].iter().any(|h| h.label == g.label) {
            return Err(Error::GroupBy(format!(
                "diagnosis group {i}: labels must be distinct, 1-40 characters, not `{NO_DIAGNOSIS}`"
            )));
        }
        if g.codes.is_empty() || g.codes.len() > MAX_GROUP_CODES {
            return Err(Error::GroupBy(format!(
                "diagnosis group `{}` lists {} codes; 1 to {MAX_GROUP_CODES} are allowed",
                g.label,
                g.codes.len()
            )));
        }
        for code in &g.codes {
            check_code(&g.system, code)
                .map_err(|p| Error::GroupBy(format!("diagnosis group `{}`: {p}", g.label)))?;
        }
    }
    Ok(())
}

/// A code the query reads, and from which resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeRead<'a> {
    pub resource_type: &'static str,
    pub system: &'a str,
    pub code: &'a str,
    pub matching: CodeMatch,
}

/// Checks a coded criterion's system and code.
fn check_code(system: &str, code: &str) -> Result<(), &'static str> {
    if !(system.starts_with("http://")
        || system.starts_with("https://")
        || system.starts_with("urn:"))
    {
        return Err(
            "system must be an absolute URI such as http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8",
        );
    }
    let code_ok = !code.is_empty()
        && code.len() <= 32
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !code_ok {
        return Err("code must be 1-32 characters of letters, digits, '.' and '-'");
    }
    Ok(())
}

/// The `version` a versioned JSON document declares, read before the rest
/// so that a document of another version gets a version error rather than
/// a confusing field error.
pub(crate) fn declared_version(json: &[u8]) -> Result<Option<String>, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<String>,
    }
    serde_json::from_slice::<Versioned>(json)
        .map(|v| v.version)
        .map_err(|e| e.to_string())
}

/// Hex SHA-256 of query bytes, as bound in a capability.
pub fn digest(json: &[u8]) -> String {
    hex::encode(Sha256::digest(json))
}

pub(crate) mod opt_iso_date {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Date;

    pub(crate) fn serialize<S: Serializer>(date: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
        match date {
            Some(d) => super::iso_date::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::iso_date")] Date);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

pub(crate) mod iso_date {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::{Date, format_description::well_known::Iso8601, macros::format_description};

    pub(crate) fn serialize<S: Serializer>(date: &Date, s: S) -> Result<S::Ok, S::Error> {
        let f = format_description!("[year]-[month]-[day]");
        s.serialize_str(&date.format(f).map_err(serde::ser::Error::custom)?)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s, &Iso8601::DATE)
            .map_err(|_| D::Error::custom(format!("`{s}` is not a date of the form YYYY-MM-DD")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tables_age_bands_are_those_its_cohorts_age_range_can_fill() {
        let bands = |min: Option<u32>, max: Option<u32>| -> Vec<String> {
            age_bands(Some(AgeRange { min, max }))
                .map(age_band_label)
                .collect()
        };
        assert_eq!(age_bands(None).count(), 11);
        assert_eq!(bands(None, None).len(), 11);
        assert_eq!(
            bands(Some(30), None),
            ["30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+"]
        );
        assert_eq!(bands(Some(35), Some(40)), ["30-39", "40-49"]);
        assert_eq!(bands(None, Some(9)), ["0-9"]);
        assert_eq!(bands(Some(95), Some(120)), ["90+"]);
    }

    const E11_BY_SEX_AGE: &str = r#"{
        "version": "ghx.query/v1",
        "cohort": {"as_of": "2026-01-01",
                   "conditions": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E11", "match": "prefix"}]},
        "analysis": {"kind": "count", "group_by": ["sex", "age_band"]}
    }"#;

    #[test]
    fn counting_each_patient_once_is_for_pooled_counts_and_fits_its_bitmaps() {
        let query = |analysis: &str, extra: &str| {
            QuerySpec::parse(
                format!(
                    r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01"}},"analysis":{analysis}{extra}}}"#
                )
                .as_bytes(),
            )
        };
        let count = r#"{"kind":"count","group_by":["sex","age_band"]}"#;
        let once = query(count, r#","release":"pooled","each_patient_once":true"#).unwrap();
        assert_eq!(once.linkage_slots(), Some(DEFAULT_LINKAGE_SLOTS));
        assert_eq!(
            query(count, r#","release":"pooled""#)
                .unwrap()
                .linkage_slots(),
            None
        );
        let refused = |analysis: &str, extra: &str, says: &str| {
            let e = query(analysis, extra).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        };
        refused(
            count,
            r#","each_patient_once":true"#,
            "needs a pooled release",
        );
        refused(
            count,
            r#","release":"pooled","linkage_slots":4096"#,
            "only with each_patient_once",
        );
        refused(
            count,
            r#","release":"pooled","each_patient_once":true,"linkage_slots":1000"#,
            "power of two",
        );
        refused(
            r#"{"kind":"summary","variable":{"kind":"age"},"clip":{"min":0,"max":120}}"#,
            r#","release":"pooled","each_patient_once":true"#,
            "each hospital's value",
        );
        // A large histogram's bitmaps shrink to fit.
        let histogram = r#"{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":0,"width":1,"count":120},"group_by":["sex"]}"#;
        let big = query(histogram, r#","release":"pooled","each_patient_once":true"#).unwrap();
        let slots = big.linkage_slots().unwrap();
        assert!((256..DEFAULT_LINKAGE_SLOTS).contains(&slots));
        assert!(big.table_keys().len() as u64 * u64::from(slots) <= MAX_LINKAGE_NUMBERS);
    }

    #[test]
    fn parses_and_round_trips_canonically() {
        let spec = QuerySpec::parse(E11_BY_SEX_AGE.as_bytes()).unwrap();
        assert_eq!(spec.dimensions(), &[Dimension::SEX, Dimension::AGE_BAND]);
        let canonical = spec.canonical_json();
        assert_eq!(QuerySpec::parse(&canonical).unwrap(), spec);
        assert_eq!(
            QuerySpec::parse(&canonical).unwrap().canonical_json(),
            canonical
        );
    }

    #[test]
    fn queries_are_limited_in_criteria_codes_and_cells() {
        // Issue 38 (10): limits with errors that say which and how many.
        let condition =
            r#"{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11"}"#;
        let criteria = vec![condition; MAX_CRITERIA + 1].join(",");
        let err = QuerySpec::parse(
            format!(
                r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[{criteria}]}},"analysis":{{"kind":"count"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cohort: at most {MAX_CRITERIA} criteria in all, got {}",
                MAX_CRITERIA + 1
            )
        );
        let codes = (0..=MAX_GROUP_CODES)
            .map(|i| format!(r#""E{i}""#))
            .collect::<Vec<_>>()
            .join(",");
        let err = QuerySpec::parse(
            format!(
                r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01"}},"analysis":{{"kind":"count","group_by":[{{"diagnosis":[{{"label":"a","system":"urn:x","codes":[{codes}]}}]}}]}}}}"#
            )
            .as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("lists 201 codes; 1 to 200"),
            "{err}"
        );
        // 4 sexes x 11 age bands x 202 bins fits; with a diagnosis of two
        // groups (3 values) it does not.
        let histogram = |group_by: &str| {
            format!(
                r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01"}},"analysis":{{"kind":"histogram","variable":{{"kind":"age"}},"bins":{{"start":0,"width":1,"count":200}},"group_by":[{group_by}]}}}}"#
            )
        };
        let fits = QuerySpec::parse(histogram(r#""sex","age_band""#).as_bytes()).unwrap();
        assert_eq!(fits.full_table_cells(), 4 * 11 * 202);
        let err = QuerySpec::parse(
            histogram(r#""sex","age_band",{"diagnosis":[{"label":"a","system":"urn:x","codes":["A"]},{"label":"b","system":"urn:x","codes":["B"]}]}"#)
                .as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("the full table would have 26664 cells; at most 10000"),
            "{err}"
        );
    }

    #[test]
    fn bad_queries_get_errors_that_name_the_problem() {
        let cases = [
            (
                r#"{"version":"ghx.query/v9"}"#,
                "unsupported query version `ghx.query/v9`",
            ),
            (r#"not json"#, "query is not valid JSON"),
            (r#"{"cohort":{}}"#, "missing field `version`"),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-13-01"},"analysis":{"kind":"count"}}"#,
                "`2026-13-01` is not a date",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"kcd","code":"E11"}]},"analysis":{"kind":"count"}}"#,
                "cohort.conditions[0]: system must be an absolute URI",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"urn:x","code":"E1%"}]},"analysis":{"kind":"count"}}"#,
                "cohort.conditions[0]: code must be",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex","sex"]}}"#,
                "analysis.group_by: `sex` is listed twice",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"mean"}}"#,
                "unknown variant `mean`",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","age":{"min":50,"max":40}},"analysis":{"kind":"count"}}"#,
                "cohort.age: min 50 is greater than max 40",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","observations":[{"system":"http://loinc.org","code":"4548-4","min":7,"max":6.5}]},"analysis":{"kind":"count"}}"#,
                "cohort.observations[0]: min 7 is greater than max 6.5",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","colour":"red"},"analysis":{"kind":"count"}}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"urn:x","code":"E11","window":{"from":"2025-02-01","to":"2025-01-01"}}]},"analysis":{"kind":"count"}}"#,
                "cohort.conditions[0]: window ends (2025-01-01) before it starts (2025-02-01)",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","sex":["female","female"]},"analysis":{"kind":"count"}}"#,
                "cohort.sex: `female` is listed twice",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","encounters":[{"class":"AMB","min_count":0}]},"analysis":{"kind":"count"}}"#,
                "cohort.encounters[0]: min_count must be at least 1",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":0,"width":0,"count":10}}}"#,
                "analysis.bins: start must be finite and width a positive number",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":0,"width":10,"count":10},"quantiles":[0.5,1.5]}}"#,
                "analysis.quantiles: 1.5 is not between 0 and 1",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"summary","variable":{"kind":"age"}},"noise":{"mechanism":"laplace","epsilon":0.5}}"#,
                "analysis.clip: a summary with noise needs a clip range",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count"},"noise":{"mechanism":"gaussian","epsilon":0.5}}"#,
                "noise.delta: the Gaussian mechanism needs 0 < delta < 0.001",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count"},"noise":{"mechanism":"laplace","epsilon":0}}"#,
                "noise.epsilon: must be at least 0.01 and at most 10",
            ),
            (
                // Rounds exp(-epsilon) to 1: the noise would vanish.
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count"},"noise":{"mechanism":"laplace","epsilon":1e-20}}"#,
                "noise.epsilon: must be at least 0.01 and at most 10",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"rate","event":{}}}"#,
                "analysis.event: needs at least one condition",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":[{"diagnosis":[{"label":"none","system":"urn:x","codes":["E11"]}]}]}}"#,
                "diagnosis group 0: labels must be distinct",
            ),
        ];
        for (json, expected) in cases {
            let err = QuerySpec::parse(json.as_bytes()).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{json}: got `{err}`, expected `{expected}`"
            );
        }
    }

    #[test]
    fn statistics_queries_parse_and_name_their_cell_keys() {
        let json = r#"{
            "version": "ghx.query/v1",
            "cohort": {"as_of": "2026-01-01", "sex": ["female"],
                       "encounters": [{"class": "AMB", "window": {"from": "2025-01-01"}, "min_count": 2}]},
            "analysis": {"kind": "histogram",
                         "variable": {"kind": "observation", "system": "http://loinc.org", "code": "4548-4", "pick": "max"},
                         "bins": {"start": 4, "width": 0.5, "count": 12},
                         "group_by": ["age_band", {"diagnosis": [{"label": "T2D", "system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "codes": ["E11"], "match": "prefix"}]}],
                         "quantiles": [0.5]},
            "noise": {"mechanism": "laplace", "epsilon": 0.5}
        }"#;
        let spec = QuerySpec::parse(json.as_bytes()).unwrap();
        assert_eq!(spec.key_names(), ["age_band", "diagnosis", "bin"]);
        assert_eq!(spec.kind(), "histogram");
        assert!(spec.resource_types().contains("Encounter"));
        assert!(spec.resource_types().contains("Observation"));
        assert!(spec.resource_types().contains("Condition"));
        let canonical = spec.canonical_json();
        assert_eq!(QuerySpec::parse(&canonical).unwrap(), spec);
    }

    #[test]
    fn bins_label_and_index_every_value() {
        let bins = Bins {
            start: 40.0,
            width: 10.0,
            count: 3,
        };
        let labels: Vec<_> = [39.9, 40.0, 55.0, 69.99, 70.0, 1e9]
            .into_iter()
            .map(|v| bins.label(bins.index(v)))
            .collect();
        assert_eq!(
            labels,
            ["<40", "[40,50)", "[50,60)", "[60,70)", ">=70", ">=70"]
        );
        assert_eq!(bins.index_of("[50,60)"), Some(2));
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
                 "analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":40,"width":10,"count":3},"group_by":["age_band"]}}"#,
        )
        .unwrap();
        let mut keys: Vec<Vec<String>> = [
            ["unknown", "<40"],
            ["50-59", ">=70"],
            ["50-59", "[40,50)"],
            ["50-59", "<40"],
            ["0-9", "[60,70)"],
        ]
        .iter()
        .map(|k| k.iter().map(|s| (*s).to_owned()).collect())
        .collect();
        keys.sort_by_key(|k| spec.key_order(k));
        assert_eq!(
            keys.iter().map(|k| k.join(" ")).collect::<Vec<_>>(),
            [
                "0-9 [60,70)",
                "50-59 <40",
                "50-59 [40,50)",
                "50-59 >=70",
                "unknown <40"
            ]
        );
    }

    #[test]
    fn windows_are_korean_days() {
        let window = Window {
            from: Some(time::macros::date!(2025 - 01 - 01)),
            to: Some(time::macros::date!(2025 - 01 - 01)),
        };
        // 2025-01-01T00:00+09:00 is 2024-12-31T15:00Z.
        assert_eq!(
            window.unix_bounds(),
            (Some(1_735_657_200), Some(1_735_657_200 + 86_400))
        );
    }

    #[test]
    fn age_bands_are_ten_years_wide_and_open_at_ninety() {
        let labels: Vec<_> = [0, 4, 8, 9, 12].into_iter().map(age_band_label).collect();
        assert_eq!(labels, ["0-9", "40-49", "80-89", "90+", "90+"]);
    }
}

//! The aggregate engine: compiles a validated query into one SQL statement
//! over the index tables and returns raw (unreleased) group counts.
//!
//! Raw counts never leave the node: they go only to [`crate::release`].
//! Every value from the query is a bound parameter; the SQL text is built
//! only from fixed fragments chosen by the query's structure.

use ghx_study::query::{CodeMatch, Dimension, QuerySpec};

use crate::consent::SensitiveCodes;
pub use crate::store::Member;
use crate::store::{self, Bind, Dialect, Store};
use crate::terminology;

/// A group and its raw, unreleased count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCell {
    /// One value per query dimension, in the query's order.
    pub key: Vec<String>,
    pub count: u64,
}

/// Counts distinct consenting patients in the query's cohort, per group.
/// `consent_context` names prepared consent decisions
/// ([`crate::consent::eligibility`]): only patients included there are
/// counted, and only their diagnoses in sensitive categories they permit
/// are visible.
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
                    Dimension::Sex => row.k_sex.clone(),
                    Dimension::AgeBand => ghx_study::query::age_band_label(row.k_band),
                })
                .collect(),
            count: u64::try_from(row.n).unwrap_or(0),
        })
        .collect())
}

/// The consenting patients of the query's cohort, before any grouping,
/// with what grouping needs: what differencing detection compares and what
/// [`count_members`] counts. They never leave the node.
pub fn cohort_members(
    store: &Store,
    spec: &QuerySpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
) -> Result<Vec<Member>, store::Error> {
    let (sql, binds) = compile(
        spec,
        store.dialect(),
        consent_context,
        sensitive,
        Output::Members,
    );
    store.cohort_rows(&sql, &binds)
}

/// The same raw cells as [`count`], computed from the cohort's members, so
/// a node that needs the members anyway runs one SQL pass, not two.
pub fn count_members(spec: &QuerySpec, members: &[Member]) -> Vec<RawCell> {
    let dimensions = spec.dimensions();
    let as_of = ymd(spec.cohort.as_of);
    let mut groups: std::collections::BTreeMap<(String, i64), u64> =
        std::collections::BTreeMap::new();
    for m in members {
        let sex = if dimensions.contains(&Dimension::Sex) {
            m.gender.clone()
        } else {
            String::new()
        };
        let band = if dimensions.contains(&Dimension::AgeBand) {
            match m.birth_ymd {
                None => -1,
                Some(birth) => ((as_of - birth) / 10000 / 10).min(9),
            }
        } else {
            0
        };
        *groups.entry((sex, band)).or_default() += 1;
    }
    if members.is_empty() && dimensions.is_empty() {
        groups.insert((String::new(), 0), 0);
    }
    groups
        .into_iter()
        .map(|((sex, band), count)| RawCell {
            key: dimensions
                .iter()
                .map(|d| match d {
                    Dimension::Sex => sex.clone(),
                    Dimension::AgeBand => ghx_study::query::age_band_label(band),
                })
                .collect(),
            count,
        })
        .collect()
}

/// A date as the integer YYYYMMDD the index tables use.
fn ymd(d: time::Date) -> i64 {
    i64::from(d.year()) * 10000 + i64::from(u8::from(d.month())) * 100 + i64::from(d.day())
}

/// What a compiled query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Group keys and counts.
    Counts,
    /// The cohort's patient ids.
    Members,
}

/// The SQL and its binds for a query.
pub(crate) fn compile(
    spec: &QuerySpec,
    dialect: Dialect,
    consent_context: &str,
    sensitive: &SensitiveCodes,
    output: Output,
) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let mut param = |bind: Bind| {
        binds.push(bind);
        dialect.placeholder(binds.len())
    };
    let as_of = ymd(spec.cohort.as_of);
    let dims = match output {
        Output::Counts => spec.dimensions(),
        Output::Members => &[],
    };
    let sex = if dims.contains(&Dimension::Sex) {
        "p.gender"
    } else {
        "''"
    };
    let band = if dims.contains(&Dimension::AgeBand) {
        let a = param(Bind::Int(as_of));
        let b = param(Bind::Int(as_of));
        format!(
            "CASE WHEN p.birth_ymd IS NULL THEN -1 \
                  WHEN ({a} - p.birth_ymd) / 10000 >= 90 THEN 9 \
                  ELSE (({b} - p.birth_ymd) / 10000) / 10 END"
        )
    } else {
        // Typed, so the column decodes as BIGINT on every backend.
        "CAST(0 AS BIGINT)".to_owned()
    };
    // Only patients whose consent permits this request take part.
    let context = param(Bind::Text(consent_context.to_owned()));
    let selected = match output {
        Output::Counts => format!("{sex} AS k_sex, {band} AS k_band, COUNT(*) AS n"),
        Output::Members => "p.id AS id, p.gender AS gender, p.birth_ymd AS birth_ymd".to_owned(),
    };
    let mut sql = format!(
        "SELECT {selected} FROM patients p \
         JOIN consent_eligibility e ON e.patient_id = p.id AND e.context = {context} WHERE "
    );
    let born = param(Bind::Int(as_of));
    sql.push_str(&format!("(p.birth_ymd IS NULL OR p.birth_ymd <= {born})"));

    for criterion in &spec.cohort.conditions {
        // Codes are compared in the form import indexed them in.
        let system_uri = terminology::canonical_system(&criterion.system);
        let code_text = terminology::normalize_code(system_uri, &criterion.code).into_owned();
        let system = param(Bind::Text(system_uri.to_owned()));
        let code = match criterion.matching {
            CodeMatch::Exact => format!("c.code = {}", param(Bind::Text(code_text))),
            CodeMatch::Prefix => {
                format!("c.code LIKE {}", param(Bind::Text(format!("{code_text}%"))))
            }
        };
        // A sensitive diagnosis is visible only if the patient permits its
        // category.
        let category_bit = sensitive.sql_category_bit(|prefix| param(Bind::Text(prefix)));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM condition_codes c WHERE c.patient_id = p.id \
               AND c.system = {system} AND {code} \
               AND (CAST({category_bit} AS BIGINT) & ~e.sensitive_mask) = 0)"
        ));
    }
    for criterion in &spec.cohort.observations {
        let system_uri = terminology::canonical_system(&criterion.system);
        let system = param(Bind::Text(system_uri.to_owned()));
        let code = param(Bind::Text(
            terminology::normalize_code(system_uri, &criterion.code).into_owned(),
        ));
        let mut range = String::new();
        if let Some(min) = criterion.min {
            range.push_str(&format!(" AND o.value >= {}", param(Bind::Float(min))));
        }
        if let Some(max) = criterion.max {
            range.push_str(&format!(" AND o.value <= {}", param(Bind::Float(max))));
        }
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM observation_values o WHERE o.patient_id = p.id \
               AND o.system = {system} AND o.code = {code}{range})"
        ));
    }
    if let Some(age) = spec.cohort.age {
        if let Some(min) = age.min {
            let a = param(Bind::Int(as_of));
            let m = param(Bind::Int(i64::from(min)));
            sql.push_str(&format!(" AND ({a} - p.birth_ymd) / 10000 >= {m}"));
        }
        if let Some(max) = age.max {
            let a = param(Bind::Int(as_of));
            let m = param(Bind::Int(i64::from(max)));
            sql.push_str(&format!(" AND ({a} - p.birth_ymd) / 10000 <= {m}"));
        }
    }
    if !dims.is_empty() {
        sql.push_str(" GROUP BY 1, 2 ORDER BY 1, 2");
    }
    (sql, binds)
}

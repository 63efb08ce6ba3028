//! Fixed analysis bounds: the clip range of a variable's exact summaries
//! and the bins of its exact histograms are fixed, per organisation, by the
//! first such release.
//!
//! The same patients summarised under two clip ranges differ only by what
//! the patients between the two bounds hold: with an upper bound of 200
//! and then 150, n and mean give the sum of min(v, 200) − min(v, 150), which
//! with one patient above 150 is that patient's value (up to 200). The
//! sets of patients are the same, so no comparison of sets
//! ([`super::cells`]) sees it. A summary without a clip range is fixed as
//! such. Bins shifted by a year move the patients at the edges; fixing them
//! leaves one partition of each variable.
//!
//! A variable is its measurement: age (its bounds include the date ages are
//! taken at, which shifts them all); an observation's system and code as
//! the engine compares them (whichever value of a patient's it picks). A
//! view computes its column, so no clip range bounds it: exact summaries
//! and histograms of views are refused. Noised analyses are not held to this: their noise is calibrated to the
//! clip range they give, and differences between them are noised too.

use ghx_study::query::{Analysis, QuerySpec, Variable};

use super::Error;
use crate::store::Store;
use crate::terminology;

/// The bounds an exact analysis of a variable uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bounds {
    variable: String,
    label: String,
    kind: Kind,
    bounds: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Clip,
    Bins,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Clip => "clip",
            Kind::Bins => "bins",
        }
    }
}

impl Bounds {
    /// The bounds of an exact summary or histogram; none for anything
    /// else. An exact summary or histogram of a view column is refused: a
    /// view computes its column (`value + 5`), so one clip range per view
    /// bounds nothing.
    pub(crate) fn of(spec: &QuerySpec) -> Result<Option<Bounds>, Error> {
        if spec.noise.is_some() {
            return Ok(None);
        }
        let (variable, kind, mut bounds) = match &spec.analysis {
            Analysis::Summary { variable, clip, .. } => (
                variable,
                Kind::Clip,
                match clip {
                    Some(r) => format!("clip range {}..{}", r.min, r.max),
                    None => "no clip range".to_owned(),
                },
            ),
            Analysis::Histogram { variable, bins, .. } => (
                variable,
                Kind::Bins,
                format!(
                    "bins {} wide from {} ({} of them)",
                    bins.width, bins.start, bins.count
                ),
            ),
            _ => return Ok(None),
        };
        let (key, label) = match variable {
            Variable::Age => {
                // Ages move with the date they are taken at: another date
                // is another clip range.
                bounds.push_str(&format!(" at {}", spec.cohort.as_of));
                ("age".to_owned(), "age".to_owned())
            }
            Variable::Observation { system, code, .. } => {
                // As the engine compares them: one system under its
                // aliases, one code however it is written.
                let system = terminology::canonical_system(system);
                let code = terminology::normalize_code(system, code);
                (
                    format!("observation {system}|{code}"),
                    format!("observation {code}"),
                )
            }
            Variable::View { .. } => return Err(Error::ExactView),
        };
        Ok(Some(Bounds {
            variable: key,
            label,
            kind,
            bounds,
        }))
    }

    /// Refuses these bounds if others are fixed for the variable.
    pub(crate) fn check(&self, store: &Store, organisation: &str) -> Result<(), Error> {
        match store.analysis_bounds(organisation, &self.variable, self.kind.code())? {
            Some(fixed) if fixed != self.bounds => Err(Error::BoundsFixed {
                analysis: match self.kind {
                    Kind::Clip => "summaries",
                    Kind::Bins => "histograms",
                },
                what: match self.kind {
                    Kind::Clip => "clip ranges",
                    Kind::Bins => "sets of bins",
                },
                variable: self.label.clone(),
                organisation: organisation.to_owned(),
                fixed,
            }),
            _ => Ok(()),
        }
    }

    /// Fixes these bounds for the variable unless some are already.
    pub(crate) fn fix(
        &self,
        store: &Store,
        organisation: &str,
        study_id: &str,
    ) -> Result<(), Error> {
        store.fix_analysis_bounds(
            organisation,
            &self.variable,
            self.kind.code(),
            &self.bounds,
            study_id,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(analysis: &str) -> Option<Bounds> {
        let spec: QuerySpec = serde_json::from_str(&format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01"}},"analysis":{analysis}}}"#
        ))
        .unwrap();
        Bounds::of(&spec).unwrap()
    }

    #[test]
    fn an_exact_summary_of_a_view_column_is_refused_and_a_noised_one_is_not_held() {
        let view = r#"{"kind":"view","view":{"resourceType":"ViewDefinition","resource":"Observation","select":[{"column":[{"name":"patient","path":"subject.getReferenceKey(Patient)"},{"name":"v","path":"value.ofType(Quantity).value"}]}]},"column":"v","pick":"max"}"#;
        let spec = |noise: &str| -> QuerySpec {
            serde_json::from_str(&format!(
                r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01"}},"analysis":{{"kind":"summary","variable":{view},"clip":{{"min":0,"max":10}}}}{noise}}}"#
            ))
            .unwrap()
        };
        let refused = Bounds::of(&spec("")).unwrap_err();
        assert!(matches!(refused, Error::ExactView), "{refused}");
        assert!(refused.to_string().contains("ask with noise"));
        let noised = spec(r#","noise":{"mechanism":"laplace","epsilon":1.0}"#);
        assert_eq!(Bounds::of(&noised).unwrap(), None);
    }

    #[test]
    fn a_variable_is_its_measurement_whatever_value_is_picked() {
        let latest = bounds(
            r#"{"kind":"summary","variable":{"kind":"observation","system":"http://loinc.org","code":"4548-4"},"clip":{"min":3,"max":20}}"#,
        )
        .unwrap();
        let max = bounds(
            r#"{"kind":"summary","variable":{"kind":"observation","system":"http://loinc.org","code":"4548-4","pick":"max"},"clip":{"min":3,"max":15}}"#,
        )
        .unwrap();
        assert_eq!(latest.variable, max.variable);
        assert_ne!(latest.bounds, max.bounds);
        // Another spelling of the same system and code is the same.
        let spelled = bounds(
            r#"{"kind":"summary","variable":{"kind":"observation","system":"https://loinc.org","code":" 4548-4"},"clip":{"min":3,"max":20}}"#,
        )
        .unwrap();
        assert_eq!(spelled.variable, latest.variable);
        let unclipped = bounds(r#"{"kind":"summary","variable":{"kind":"age"}}"#).unwrap();
        assert_eq!(unclipped.bounds, "no clip range at 2026-01-01");
        assert!(bounds(r#"{"kind":"count"}"#).is_none());
    }
}

//! The query pipeline: a request the gate admitted, to a released result.
//!
//! consent (who takes part) -> engine (the cohort's members and raw cells)
//! -> differencing (refuse what is a few patients from earlier releases)
//! -> noise, paid for first ([`crate::budget`]) -> release (suppression and
//! every note). Nothing here knows the wire or the audit log: the api
//! records what [`Recorded`] says. Raw counts never leave this module except
//! through [`release`].

use std::sync::Mutex;

use ghx_study::query::Analysis;
use ghx_study::result::AggregateResult;

use crate::budget::{self, Budget};
use crate::classify::{Classify, Code};
use crate::cohort_index::CohortIndex;
use crate::consent::SensitiveCodes;
use crate::consent::eligibility::{self, Eligibility};
use crate::gate::Admitted;
use crate::store::{self, Store};
use crate::{differencing, engine, release};

/// Why an admitted request was not answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("storage: {0}")]
    Store(#[from] store::Error),
    #[error("consent evaluation: {0}")]
    Consent(#[from] eligibility::Error),
    #[error(transparent)]
    Differencing(#[from] differencing::Error),
    #[error(transparent)]
    View(#[from] crate::views::Error),
    #[error(transparent)]
    Budget(#[from] budget::Error),
    #[error("pooled table: {0}")]
    Pooled(#[from] ghx_disclosure::pooled::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Differencing(e) => e.code(),
            Error::View(e) => e.code(),
            Error::Budget(e) => e.code(),
            Error::Pooled(
                ghx_disclosure::pooled::Error::Unreachable { .. }
                | ghx_disclosure::pooled::Error::PhantomLoad { .. },
            ) => Code::InvalidArgument,
            Error::Store(_) | Error::Consent(_) | Error::Pooled(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::Differencing(e) => e.kind(),
            Error::View(e) => e.kind(),
            Error::Budget(e) => e.kind(),
            Error::Pooled(
                ghx_disclosure::pooled::Error::Unreachable { .. }
                | ghx_disclosure::pooled::Error::PhantomLoad { .. },
            ) => "query",
            Error::Store(_) | Error::Consent(_) | Error::Pooled(_) => "internal",
        }
    }
}

/// What the pipeline reads and the lock that keeps one organisation's
/// check-then-record of releases in order.
pub(crate) struct Pipeline<'a> {
    pub(crate) node_id: &'a str,
    pub(crate) store: &'a Store,
    pub(crate) eligibility: &'a Eligibility,
    pub(crate) cohorts: &'a CohortIndex,
    pub(crate) sensitive: &'a SensitiveCodes,
    /// Serialises check-then-record of released cohorts.
    pub(crate) releasing: &'a Mutex<()>,
    pub(crate) coding: &'a crate::coding::HeldSystems,
    pub(crate) budget: Budget<'a>,
}

/// What the audit entry says of a request, written as the pipeline goes so
/// that a refusal after consent (differencing, bounds, budget) records it
/// too.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    /// Patients consent left out (node-wide, for this request's context).
    pub(crate) consent_excluded: i64,
    /// The epsilon charged, 0 for an exact release.
    pub(crate) epsilon: f64,
}

impl Pipeline<'_> {
    /// Answers `admitted` (whose request has digest `request_sha256`),
    /// noting in `recorded` what its audit entry says.
    pub(crate) fn answer(
        &self,
        admitted: &Admitted,
        request_sha256: &str,
        recorded: &mut Recorded,
    ) -> Result<AggregateResult, Error> {
        let store = self.store;
        let spec = &admitted.spec;
        let (prepared, analysed, cohort) = self.consented_table(admitted, recorded)?;
        let org = &admitted.claims.org;
        let study = &admitted.claims.sub;
        let k = admitted.min_cell_size;
        let with_value = analysed
            .members
            .iter()
            .map(|m| match spec.analysis {
                Analysis::Summary { .. } => m.events.len(),
                _ => m.patients.len(),
            } as u64)
            .sum();
        let mut notes = release::Notes {
            access: admitted.access.summary(),
            consent: &prepared.summary,
            values: (with_value, analysed.without_value),
            noise: None,
            coding: self.coding.notes(store, spec)?,
        };
        let result = match &spec.noise {
            // An exact table is worked out first: which of its cells are
            // released decides the sets of patients compared with what the
            // organisation has had before.
            None => {
                let candidates = analysed
                    .cells
                    .iter()
                    .zip(&analysed.members)
                    .map(|(c, who)| {
                        release::Candidate::exact(c, k)
                            .lacking((who.patients.len() - who.events.len()) as u64)
                    })
                    .collect();
                let (result, lines) = tracing::info_span!("release").in_scope(|| {
                    release::release_with_lines(self.node_id, spec, analysed.cells, candidates, k)
                });
                let released: Vec<bool> = result
                    .cells
                    .iter()
                    .map(|c| c.value.patients().is_some())
                    .collect();
                let sets = differencing::cells::TableSets::of(
                    spec,
                    &cohort,
                    &analysed.members,
                    &released,
                    &lines,
                    k,
                );
                let bounds = differencing::bounds::Bounds::of(spec)?;
                let _releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
                let _differencing = tracing::info_span!("differencing").entered();
                // Refuse a cohort, or a set of patients behind any of the
                // table's numbers, a few patients away from one already
                // released to the same organisation, and bounds other than
                // the variable's fixed ones.
                if let Some(bounds) = &bounds {
                    bounds.check(store, org)?;
                }
                differencing::check(store, org, &cohort, k)?;
                differencing::cells::check(store, org, &sets, k)?;
                differencing::record(store, org, study, request_sha256, &cohort)?;
                differencing::cells::record(store, org, study, request_sha256, &sets)?;
                if let Some(bounds) = &bounds {
                    bounds.fix(store, org, study)?;
                }
                result
            }
            Some(noise) => {
                let releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
                let differencing_span = tracing::info_span!("differencing").entered();
                // Refuse a cohort a few patients away from one already
                // released to the same organisation.
                differencing::check(store, org, &cohort, k)?;
                // Noise is paid for before anything is released.
                let paid = self.charge(admitted, request_sha256, noise, recorded)?;
                let (candidates, statement) =
                    crate::noise::perturb(spec, noise, &analysed.cells, &mut rand::rngs::OsRng);
                differencing::record(store, org, study, request_sha256, &cohort)?;
                drop(differencing_span);
                // Suppression is computation on this answer alone: other
                // answers need not wait for its linear programmes.
                drop(releasing);
                let _release = tracing::info_span!("release").entered();
                notes.noise = Some((statement, paid));
                release::release(self.node_id, spec, analysed.cells, candidates, k)
            }
        };
        Ok(release::annotate(result, spec, notes, k))
    }

    /// Charges `noise` to the request's budgets (noted in `recorded`);
    /// the budget note for the result.
    fn charge(
        &self,
        admitted: &Admitted,
        request_sha256: &str,
        noise: &ghx_study::query::Noise,
        recorded: &mut Recorded,
    ) -> Result<String, Error> {
        let paid = self.budget.charge(
            &admitted.claims.jti,
            &admitted.claims,
            &admitted.manifest,
            request_sha256,
            (noise.epsilon, noise.delta),
        )?;
        recorded.epsilon = noise.epsilon;
        Ok(paid)
    }

    /// Consent for the request (what it excluded noted in `recorded`), then
    /// in one SQL pass the cohort's members, giving the table's raw cells
    /// over its whole domain and the cohort's print.
    fn consented_table(
        &self,
        admitted: &Admitted,
        recorded: &mut Recorded,
    ) -> Result<
        (
            eligibility::Prepared,
            engine::Analysed,
            differencing::CohortPrint,
        ),
        Error,
    > {
        let store = self.store;
        let prepared = tracing::info_span!("consent")
            .in_scope(|| self.eligibility.prepare(store, &admitted.consent))?;
        recorded.consent_excluded =
            i64::try_from(prepared.summary.excluded_total()).unwrap_or(i64::MAX);
        let spec = &admitted.spec;
        let (members, analysed) = tracing::info_span!("engine").in_scope(|| {
            let members = self
                .cohorts
                .members(store, spec, &prepared.context, self.sensitive)?;
            // Every cell of the table's domain, empty or not: which cells
            // exist must say nothing of the data, or a small cell listed
            // would be known to hold at least one patient.
            let analysed = engine::analyse(spec, &members, true);
            Ok::<_, Error>((members, analysed))
        })?;
        let cohort = differencing::CohortPrint::of_members(&members);
        Ok((prepared, analysed, cohort))
    }

    /// This node's vector for a pooled table over `nodes` nodes: its raw
    /// cells laid out as every node lays them out, plus its share of the
    /// noise (paid for first). Nothing here is released: the vector leaves
    /// only masked, and only its sum with every other node's is read.
    pub(crate) fn pooled(
        &self,
        admitted: &Admitted,
        request_sha256: &str,
        nodes: usize,
        linkage: Option<(
            &ghx_disclosure::linkage::LinkKey,
            &ghx_disclosure::linkage::QueryKey,
        )>,
        recorded: &mut Recorded,
    ) -> Result<Vec<i64>, Error> {
        use ghx_disclosure::pooled::{Layout, calibrate};
        let store = self.store;
        let spec = &admitted.spec;
        let layout = Layout::of(spec);
        let calibration = spec
            .noise
            .as_ref()
            .map(|noise| calibrate(noise, &layout, nodes))
            .transpose()?;
        if let Some(calibration) = &calibration {
            layout.check_load(calibration)?;
        }
        // Whatever can fail is done before the budget is charged.
        let tokens = match (linkage, layout.linked()) {
            (Some((link, _)), true) => Some(self.tokens(link)?),
            (None, false) => None,
            _ => return Err(ghx_disclosure::pooled::Error::QueryKey.into()),
        };
        let (_, analysed, cohort) = self.consented_table(admitted, recorded)?;
        let org = &admitted.claims.org;
        {
            // A cohort a few patients from one released to the organisation
            // before is refused here as for any release: the pooled sum
            // moves by what this node's part of the difference holds.
            let _releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            let _differencing = tracing::info_span!("differencing").entered();
            differencing::check(store, org, &cohort, admitted.min_cell_size)?;
            if let Some(noise) = &spec.noise {
                self.charge(admitted, request_sha256, noise, recorded)?;
            }
            differencing::record(store, org, &admitted.claims.sub, request_sha256, &cohort)?;
        }
        let mut vector = match (linkage, tokens) {
            (Some((_, key)), Some(tokens)) => self.linked(&layout, &analysed, &tokens, key)?,
            _ => layout.encode(&analysed.cells)?,
        };
        let lacking: Vec<(Vec<String>, u64)> = analysed
            .cells
            .iter()
            .zip(&analysed.members)
            .map(|(c, who)| {
                (
                    c.key.clone(),
                    (who.patients.len() - who.events.len()) as u64,
                )
            })
            .collect();
        layout.set_lacking(&mut vector, &lacking);
        if let Some(calibration) = &calibration {
            let noise = layout.noise(calibration)?;
            for (v, e) in vector.iter_mut().zip(noise) {
                *v = v.wrapping_add(e);
            }
        }
        Ok(vector)
    }

    /// The patients' linkage tokens under `link`, by print hash. Tokens of
    /// another (rotated) key match no other hospital's: their patients
    /// count as unlinked until imported again under this one.
    fn tokens(
        &self,
        link: &ghx_disclosure::linkage::LinkKey,
    ) -> Result<std::collections::HashMap<i64, String>, Error> {
        Ok(self
            .store
            .link_tokens()?
            .into_iter()
            .filter(|(_, token)| link.made(token))
            .map(|(id, token)| (differencing::patient_hash(&id) as i64, token))
            .collect())
    }

    /// This node's bitmaps for a table that counts each patient once: each
    /// patient of a cell placed by their linkage token under the query's
    /// key, or, without one, by a slot of this hospital's own; and how
    /// many of the cohort have no token.
    fn linked(
        &self,
        layout: &ghx_disclosure::pooled::Layout,
        analysed: &engine::Analysed,
        tokens: &std::collections::HashMap<i64, String>,
        key: &ghx_disclosure::linkage::QueryKey,
    ) -> Result<Vec<i64>, Error> {
        use std::collections::HashSet;
        let mut unlinked: HashSet<i64> = HashSet::new();
        let mut place = |print: &i64, bitmap: usize| match tokens.get(print) {
            Some(token) => key.linked(token, bitmap),
            None => {
                unlinked.insert(*print);
                key.local(self.node_id, *print, bitmap)
            }
        };
        let mut cells = Vec::with_capacity(analysed.cells.len());
        for (cell, who) in analysed.cells.iter().zip(&analysed.members) {
            let lists: Vec<&Vec<i64>> = match cell.value {
                ghx_disclosure::Raw::Rate { .. } => vec![&who.events, &who.patients],
                _ => vec![&who.patients],
            };
            let mut counts = Vec::with_capacity(lists.len());
            for (j, list) in lists.into_iter().enumerate() {
                let bitmap = layout.bitmap(&cell.key, j).ok_or_else(|| {
                    ghx_disclosure::pooled::Error::UnknownCell(cell.key.join("/"))
                })?;
                counts.push(list.iter().map(|p| place(p, bitmap)).collect());
            }
            cells.push(ghx_disclosure::pooled::LinkedCell {
                key: cell.key.clone(),
                counts,
            });
        }
        Ok(layout.encode_linked(&cells, unlinked.len() as u64)?)
    }
}

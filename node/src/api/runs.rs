//! A training run's footing at this node: the rows it is sealed to (a
//! new run compared like a release, then recorded and sealed with its own
//! secret) and whether the budgets here can pay for it.

use super::{ApiError, NodeApi};
use crate::training;

impl NodeApi {
    /// Refuses a new run whose noised rounds and evaluation the budgets
    /// here (the study's, and the organisation's over all studies) cannot
    /// pay: it would train to the end and fail there.
    pub(super) fn check_affordable(
        &self,
        work: &training::RoundWork,
        training_sha256: &str,
    ) -> Result<(), ApiError> {
        let store = &self.inner.store;
        let (org, study) = (&work.claims.org, &work.claims.sub);
        let spec = &work.spec;
        let training = match &spec.privacy {
            Some(privacy) => {
                let charged = store.privacy_charges_for(org, study, training_sha256)?;
                privacy.epsilon_after(charged + u64::from(spec.rounds))
                    - privacy.epsilon_after(charged)
            }
            None => 0.0,
        };
        let cost = training + spec.validation.map_or(0.0, |v| v.epsilon);
        if cost == 0.0 {
            return Ok(());
        }
        let study_left = work.manifest.privacy_budget - store.privacy_spent(org, study)?.epsilon;
        let org_left = self
            .inner
            .organisation_epsilon
            .map_or(f64::INFINITY, |cap| {
                cap - store.privacy_spent(org, "").map_or(0.0, |s| s.epsilon)
            });
        let left = study_left.min(org_left);
        if cost > left + 1e-9 {
            return Err(training::Error::RunUnaffordable {
                epsilon: cost,
                left: left.max(0.0),
            }
            .into());
        }
        Ok(())
    }

    /// Seals a run to this node's rows and returns its secret, or (`seal`
    /// false, at step 1) checks that it could be sealed, returning its
    /// secret only if it already is. The run computes on one set of rows
    /// here, with one secret: a round or evaluation over other rows (an
    /// import or a consent change since) would differ from the first by
    /// the changed patients' data, so it is refused (`RowsChanged`); a
    /// redo over the same rows, with the same seed, is the first again.
    /// A new run is compared like a release: its moments (round 0) are
    /// exact sums over its training rows, so its training patients, and
    /// each column of its rows (a patient's value with what the column
    /// reads), are each checked like a released cohort, refused 1..k−1 from a set released
    /// to the organisation before, and recorded before the run is sealed
    /// (a crash between the two leaves a record too many, never too few).
    pub(super) fn sealed(
        &self,
        sealing: Sealing<'_>,
        seal: bool,
    ) -> Result<Option<[u8; 32]>, ApiError> {
        let Sealing {
            run,
            organisation,
            data,
            min_cell_size,
        } = sealing;
        let inner = &self.inner;
        let rows = hex::encode(data.digest());
        let changed = || ApiError::from(training::Error::RowsChanged(run.run_id.to_owned()));
        // One run sealed at a time: two new runs are checked in turn.
        let _sealing = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
        let secret = match inner.store.run_seal(run)? {
            Some((secret, sealed)) if sealed == rows => secret,
            Some(_) => return Err(changed()),
            None => {
                let sets: Vec<_> = std::iter::once(&data.patients.train)
                    .chain(&data.patients.columns)
                    .map(|hashes| crate::differencing::CohortPrint::of_hashes(hashes.clone()))
                    .collect();
                for set in &sets {
                    crate::differencing::check(&inner.store, organisation, set, min_cell_size)?;
                }
                if !seal {
                    return Ok(None);
                }
                for set in &sets {
                    crate::differencing::record(
                        &inner.store,
                        organisation,
                        run.study_id,
                        run.training_sha256,
                        set,
                    )?;
                }
                let mut fresh = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut fresh);
                match inner.store.seal_run(run, &hex::encode(fresh), &rows)? {
                    Some((secret, sealed)) if sealed == rows => secret,
                    Some(_) => return Err(changed()),
                    None => return Err(training::Error::Unsealed(run.run_id.to_owned()).into()),
                }
            }
        };
        let secret = hex::decode(secret)
            .ok()
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
            .ok_or_else(|| ApiError::Task("a run's stored secret is unreadable".to_owned()))?;
        Ok(Some(secret))
    }
}

/// A run and the rows it is (to be) sealed to at this node.
pub(super) struct Sealing<'a> {
    pub(super) run: crate::store::RunKey<'a>,
    /// Whose released sets the run's are compared with.
    pub(super) organisation: &'a str,
    pub(super) data: &'a training::Extracted,
    pub(super) min_cell_size: u32,
}

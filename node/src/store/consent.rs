//! Consent inputs and the consent contexts decided from them: the
//! per-patient decisions an aggregate query is counted under.

use diesel::prelude::*;
use ghx_db::{WriteTransaction, with_conn};

use super::schema::{consent_contexts, consent_eligibility, consents, node_state, patients};
use super::{
    CONSENT_GENERATION, ConsentRow, INSERT_CHUNK, KEEP_CONSENT_CONTEXTS, PatientRow, Result, Store,
    now_rfc3339,
};

/// The columns a [`ConsentRow`] is read from, in its order.
pub(super) const CONSENT_COLUMNS: (
    consents::consent_id,
    consents::patient_id,
    consents::status,
    consents::scope,
    consents::decision,
    consents::recorded_at,
    consents::provision,
) = (
    consents::consent_id,
    consents::patient_id,
    consents::status,
    consents::scope,
    consents::decision,
    consents::recorded_at,
    consents::provision,
);

/// One row of [`CONSENT_COLUMNS`].
pub(super) type ConsentColumns = (String, String, String, String, String, i64, String);

pub(super) fn consent_row(r: ConsentColumns) -> ConsentRow {
    ConsentRow {
        consent_id: r.0,
        patient_id: r.1,
        status: r.2,
        scope: r.3,
        decision: r.4,
        recorded_at: r.5,
        provision: r.6,
    }
}

impl Store {
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
        let (patients, rows): (Vec<PatientRow>, Vec<ConsentColumns>) =
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
                        link_token: None,
                    })
                    .collect();
                let rows = consents::table
                    .select(CONSENT_COLUMNS)
                    .load::<ConsentColumns>(conn)?;
                diesel::QueryResult::Ok((patients, rows))
            })?);
        Ok(ConsentInputs {
            patients,
            consents: rows.into_iter().map(consent_row).collect(),
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

/// Everything consent evaluation needs: every patient and every consent.
#[derive(Debug, Clone, Default)]
pub struct ConsentInputs {
    pub patients: Vec<PatientRow>,
    pub consents: Vec<ConsentRow>,
}

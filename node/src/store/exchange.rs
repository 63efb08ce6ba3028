//! What the exchange reads and keeps: a resident's patient ids, consents
//! and current resources, and the ledger of disclosures (who received
//! which of a patient's records, when).

use diesel::prelude::*;
use ghx_db::with_conn;

use super::consent::{CONSENT_COLUMNS, ConsentColumns, consent_row};
use super::schema::{consents, exchange_disclosures, patients, resources};
use super::{ConsentRow, Result, Store};

/// One disclosure through the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosure {
    pub patient_id: String,
    pub request_id: String,
    pub recipient: String,
    pub purpose: String,
    pub scope: String,
    /// RFC 3339.
    pub disclosed_at: String,
    pub resources: i64,
    /// Hex SHA-256 chain over the parts sent.
    pub sha256: String,
    /// `sent`, `stopped: <why>`.
    pub outcome: String,
}

/// One current resource of a patient.
#[derive(Debug, Clone)]
pub struct PatientResource {
    pub resource_type: String,
    pub id: String,
    /// When the node stored this version (RFC 3339).
    pub last_updated: String,
    pub content: String,
}

impl Store {
    /// Patients whose linkage token is `token`.
    pub fn patients_with_token(&self, token: &str) -> Result<Vec<String>> {
        Ok(with_conn!(self.backend, |conn| patients::table
            .filter(patients::link_token.eq(token))
            .select(patients::id)
            .load::<String>(conn)?))
    }

    /// Whether a patient of this id is stored.
    pub fn has_patient(&self, id: &str) -> Result<bool> {
        Ok(with_conn!(self.backend, |conn| patients::table
            .filter(patients::id.eq(id))
            .select(patients::id)
            .first::<String>(conn)
            .optional()?)
        .is_some())
    }

    /// A patient's consents, as stored rows.
    pub fn patient_consents(&self, patient_id: &str) -> Result<Vec<ConsentRow>> {
        let rows: Vec<ConsentColumns> = with_conn!(self.backend, |conn| consents::table
            .filter(consents::patient_id.eq(patient_id))
            .select(CONSENT_COLUMNS)
            .load::<ConsentColumns>(conn)?);
        Ok(rows.into_iter().map(consent_row).collect())
    }

    /// A patient's current resources (their Patient included), in type and
    /// id order.
    pub fn patient_resources(&self, patient_id: &str) -> Result<Vec<PatientResource>> {
        let rows: Vec<(String, String, String, String)> =
            with_conn!(self.backend, |conn| resources::table
                .filter(resources::patient_id.eq(patient_id))
                .select((
                    resources::resource_type,
                    resources::id,
                    resources::last_updated,
                    resources::content,
                ))
                .order((resources::resource_type, resources::id))
                .load(conn)?);
        Ok(rows
            .into_iter()
            .map(
                |(resource_type, id, last_updated, content)| PatientResource {
                    resource_type,
                    id,
                    last_updated,
                    content,
                },
            )
            .collect())
    }

    /// Records a disclosure (before its first part is sent).
    pub fn record_disclosure(&self, d: &Disclosure) -> Result<()> {
        with_conn!(self.backend, |conn| {
            diesel::insert_into(exchange_disclosures::table)
                .values((
                    exchange_disclosures::patient_id.eq(&d.patient_id),
                    exchange_disclosures::request_id.eq(&d.request_id),
                    exchange_disclosures::recipient.eq(&d.recipient),
                    exchange_disclosures::purpose.eq(&d.purpose),
                    exchange_disclosures::scope.eq(&d.scope),
                    exchange_disclosures::disclosed_at.eq(&d.disclosed_at),
                    exchange_disclosures::resources.eq(d.resources),
                    exchange_disclosures::sha256.eq(&d.sha256),
                    exchange_disclosures::outcome.eq(&d.outcome),
                ))
                .execute(conn)?;
        });
        Ok(())
    }

    /// Marks how a recorded disclosure ended, when it did not as recorded.
    pub fn end_disclosure(&self, request_id: &str, outcome: &str) -> Result<()> {
        with_conn!(self.backend, |conn| {
            diesel::update(
                exchange_disclosures::table.filter(exchange_disclosures::request_id.eq(request_id)),
            )
            .set(exchange_disclosures::outcome.eq(outcome))
            .execute(conn)?;
        });
        Ok(())
    }

    /// A patient's disclosures, oldest first.
    pub fn disclosures_of(&self, patient_id: &str) -> Result<Vec<Disclosure>> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            i64,
            String,
            String,
        );
        let rows: Vec<Row> = with_conn!(self.backend, |conn| exchange_disclosures::table
            .filter(exchange_disclosures::patient_id.eq(patient_id))
            .order(exchange_disclosures::seq)
            .select((
                exchange_disclosures::patient_id,
                exchange_disclosures::request_id,
                exchange_disclosures::recipient,
                exchange_disclosures::purpose,
                exchange_disclosures::scope,
                exchange_disclosures::disclosed_at,
                exchange_disclosures::resources,
                exchange_disclosures::sha256,
                exchange_disclosures::outcome,
            ))
            .load(conn)?);
        Ok(rows
            .into_iter()
            .map(|r| Disclosure {
                patient_id: r.0,
                request_id: r.1,
                recipient: r.2,
                purpose: r.3,
                scope: r.4,
                disclosed_at: r.5,
                resources: r.6,
                sha256: r.7,
                outcome: r.8,
            })
            .collect())
    }
}

//! Materialised SQL-on-FHIR view values, one generation per view.

use diesel::prelude::*;
use ghx_db::{WriteTransaction, with_conn};

use super::schema::{view_materialisations, view_values};
use super::{Result, Store, now_rfc3339};

impl Store {
    /// The data generation a view was last materialised at.
    pub fn view_generation(&self, view_sha256: &str) -> Result<Option<i64>> {
        Ok(with_conn!(self.backend, |conn| {
            view_materialisations::table
                .filter(view_materialisations::view_sha256.eq(view_sha256))
                .select(view_materialisations::generation)
                .first::<i64>(conn)
                .optional()?
        }))
    }

    /// Replaces a view's materialised (patient, value) rows, in one
    /// transaction, and records the data generation they reflect.
    pub fn replace_view_values(
        &self,
        view_sha256: &str,
        generation: i64,
        rows: &[ViewRow],
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            diesel::delete(view_values::table.filter(view_values::view_sha256.eq(view_sha256)))
                .execute(conn)?;
            for chunk in rows.chunks(5000) {
                let values: Vec<_> = chunk
                    .iter()
                    .map(|row| {
                        (
                            view_values::view_sha256.eq(view_sha256),
                            view_values::patient_id.eq(&row.patient_id),
                            view_values::value.eq(row.value),
                            view_values::resource_id.eq(&row.resource_id),
                        )
                    })
                    .collect();
                diesel::insert_into(view_values::table)
                    .values(values)
                    .execute(conn)?;
            }
            diesel::insert_into(view_materialisations::table)
                .values((
                    view_materialisations::view_sha256.eq(view_sha256),
                    view_materialisations::generation.eq(generation),
                    view_materialisations::row_count.eq(rows.len() as i64),
                    view_materialisations::built_at.eq(&now),
                ))
                .on_conflict(view_materialisations::view_sha256)
                .do_update()
                .set((
                    view_materialisations::generation.eq(generation),
                    view_materialisations::row_count.eq(rows.len() as i64),
                    view_materialisations::built_at.eq(&now),
                ))
                .execute(conn)?;
            diesel::QueryResult::Ok(())
        }))?;
        Ok(())
    }
}

/// One row of a materialised view: a patient's value, and the resource it
/// was read from (whose sensitive categories a query checks).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewRow {
    pub patient_id: String,
    pub value: f64,
    pub resource_id: String,
}

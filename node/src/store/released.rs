//! What was released to whom, kept for differencing: the sets of patients
//! behind exact tables' numbers and the tables' partitions
//! ([`crate::differencing::cells`]), and the bounds fixed for each variable
//! ([`crate::differencing::bounds`]).

use diesel::prelude::*;

use super::schema::{analysis_bounds, released_cells, released_tables};
use super::{INSERT_CHUNK, Result, Store, now_rfc3339};
use ghx_db::with_conn;

/// A set to record.
#[derive(Debug, Clone)]
pub struct NewReleasedCell {
    pub size: i64,
    pub members: Vec<u8>,
    pub print_sha256: String,
    /// Whether the release gave the set's size exactly.
    pub exact: bool,
}

impl Store {
    /// Sets released to `organisation` whose size is within `radius` of
    /// `size` (the only ones that can differ from a set of that size by
    /// fewer than `radius` patients), as (digest, given exactly, members).
    pub fn cells_near(
        &self,
        organisation: &str,
        size: i64,
        radius: i64,
    ) -> Result<Vec<(String, bool, Vec<u8>)>> {
        Ok(with_conn!(self.backend, |conn| released_cells::table
            .filter(released_cells::organisation.eq(organisation))
            .filter(released_cells::size.gt(size - radius))
            .filter(released_cells::size.lt(size + radius))
            .select((
                released_cells::print_sha256,
                released_cells::exact,
                released_cells::members,
            ))
            .load::<(String, bool, Vec<u8>)>(conn)?))
    }

    /// Records sets released to `organisation`; a set already recorded is
    /// left as it is.
    pub fn record_cells(
        &self,
        organisation: &str,
        study_id: &str,
        query_sha256: &str,
        cells: &[NewReleasedCell],
    ) -> Result<()> {
        let now = now_rfc3339();
        for chunk in cells.chunks(INSERT_CHUNK / 10) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|c| {
                    (
                        released_cells::organisation.eq(organisation),
                        released_cells::study_id.eq(study_id),
                        released_cells::query_sha256.eq(query_sha256),
                        released_cells::released_at.eq(&now),
                        released_cells::size.eq(c.size),
                        released_cells::members.eq(&c.members),
                        released_cells::print_sha256.eq(&c.print_sha256),
                        released_cells::exact.eq(c.exact),
                    )
                })
                .collect();
            with_conn!(self.backend, |conn| diesel::insert_into(
                released_cells::table
            )
            .values(&rows)
            .on_conflict_do_nothing()
            .execute(conn)?);
        }
        Ok(())
    }

    /// Records an exact table's partition released to `organisation`, once
    /// (by digest).
    pub fn record_table(
        &self,
        organisation: &str,
        study_id: &str,
        query_sha256: &str,
        parts: &[u8],
        parts_sha256: &str,
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| diesel::insert_into(
            released_tables::table
        )
        .values((
            released_tables::organisation.eq(organisation),
            released_tables::study_id.eq(study_id),
            released_tables::query_sha256.eq(query_sha256),
            released_tables::released_at.eq(&now),
            released_tables::parts.eq(parts),
            released_tables::parts_sha256.eq(parts_sha256),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?);
        Ok(())
    }

    /// The partitions of the exact tables released to `organisation`.
    pub fn released_tables(&self, organisation: &str) -> Result<Vec<Vec<u8>>> {
        Ok(with_conn!(self.backend, |conn| released_tables::table
            .filter(released_tables::organisation.eq(organisation))
            .select(released_tables::parts)
            .load::<Vec<u8>>(conn)?))
    }

    /// The bounds of `kind` fixed for `variable` for `organisation`.
    pub fn analysis_bounds(
        &self,
        organisation: &str,
        variable: &str,
        kind: &str,
    ) -> Result<Option<String>> {
        Ok(with_conn!(self.backend, |conn| analysis_bounds::table
            .filter(analysis_bounds::organisation.eq(organisation))
            .filter(analysis_bounds::variable.eq(variable))
            .filter(analysis_bounds::kind.eq(kind))
            .select(analysis_bounds::bounds)
            .first::<String>(conn)
            .optional()?))
    }

    /// Fixes `bounds` for `variable` unless bounds of `kind` are fixed
    /// already.
    pub fn fix_analysis_bounds(
        &self,
        organisation: &str,
        variable: &str,
        kind: &str,
        bounds: &str,
        study_id: &str,
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| diesel::insert_into(
            analysis_bounds::table
        )
        .values((
            analysis_bounds::organisation.eq(organisation),
            analysis_bounds::variable.eq(variable),
            analysis_bounds::kind.eq(kind),
            analysis_bounds::bounds.eq(bounds),
            analysis_bounds::study_id.eq(study_id),
            analysis_bounds::fixed_at.eq(&now),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?);
        Ok(())
    }
}

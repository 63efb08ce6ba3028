//! Running compiled queries (counts, cohort members, code rows, prints) and
//! the released cohorts kept for differencing.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::PooledConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use ghx_db::{Backend, with_conn};

use super::schema::released_cohorts;
use super::{Result, Store, now_rfc3339};

impl Store {
    /// Runs a grouped count compiled by the engine.
    pub fn grouped_count(&self, sql: &str, binds: &[Bind]) -> Result<Vec<GroupCount>> {
        self.run_compiled(sql, binds)
    }

    /// Runs a cohort-members query compiled by the engine.
    pub fn cohort_rows(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Member>> {
        self.run_compiled(sql, binds)
    }

    /// Runs a cohort query compiled by the engine that selects only the
    /// members' print hashes.
    pub fn cohort_prints(&self, sql: &str, binds: &[Bind]) -> Result<Vec<i64>> {
        let rows: Vec<PrintRow> = self.run_compiled(sql, binds)?;
        Ok(rows.into_iter().map(|r| r.print).collect())
    }

    /// Runs a code-rows query compiled by the engine
    /// (`engine::compile_code_rows`).
    pub fn code_rows(&self, sql: &str, binds: &[Bind]) -> Result<Vec<CodeRow>> {
        self.run_compiled(sql, binds)
    }

    fn run_compiled<T>(&self, sql: &str, binds: &[Bind]) -> Result<Vec<T>>
    where
        T: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        macro_rules! run {
            ($conn:ident, $db:ty) => {{
                let mut query = diesel::sql_query(sql).into_boxed::<$db>();
                for bind in binds {
                    query = match bind {
                        Bind::Text(s) => query.bind::<Text, _>(s.clone()),
                        Bind::Int(i) => query.bind::<BigInt, _>(*i),
                        Bind::Float(f) => query.bind::<diesel::sql_types::Double, _>(*f),
                    };
                }
                query.load::<T>($conn)?
            }};
        }
        Ok(match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn: PooledConnection<_> = pool.get()?;
                let conn: &mut SqliteConnection = &mut conn;
                run!(conn, diesel::sqlite::Sqlite)
            }
            Backend::Postgres(pool) => {
                let mut conn: PooledConnection<_> = pool.get()?;
                let conn: &mut PgConnection = &mut conn;
                run!(conn, diesel::pg::Pg)
            }
        })
    }

    /// Released cohorts of `organisation` whose size is within `radius` of
    /// `size`: the only ones that can differ from a cohort of that size by
    /// fewer than `radius` patients.
    ///
    /// The cohort whose print has digest `except` is left out: it is the
    /// one being checked, released before.
    pub fn cohorts_near(
        &self,
        organisation: &str,
        size: i64,
        radius: i64,
        except: &str,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(with_conn!(self.backend, |conn| released_cohorts::table
            .filter(released_cohorts::organisation.eq(organisation))
            .filter(released_cohorts::size.gt(size - radius))
            .filter(released_cohorts::size.lt(size + radius))
            .filter(released_cohorts::print_sha256.ne(except))
            .select(released_cohorts::members)
            .load::<Vec<u8>>(conn)?))
    }

    /// How many distinct cohorts were released to `organisation`.
    pub fn released_cohort_count(&self, organisation: &str) -> Result<i64> {
        Ok(with_conn!(self.backend, |conn| released_cohorts::table
            .filter(released_cohorts::organisation.eq(organisation))
            .count()
            .get_result::<i64>(conn)?))
    }

    /// Records a released cohort, once per organisation: a print already
    /// recorded (same digest) is left as it is.
    pub fn record_cohort(
        &self,
        organisation: &str,
        study_id: &str,
        query_sha256: &str,
        size: i64,
        members: &[u8],
        print_sha256: &str,
    ) -> Result<()> {
        let now = now_rfc3339();
        with_conn!(self.backend, |conn| diesel::insert_into(
            released_cohorts::table
        )
        .values((
            released_cohorts::organisation.eq(organisation),
            released_cohorts::study_id.eq(study_id),
            released_cohorts::query_sha256.eq(query_sha256),
            released_cohorts::released_at.eq(&now),
            released_cohorts::size.eq(size),
            released_cohorts::members.eq(members),
            released_cohorts::print_sha256.eq(print_sha256),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?);
        Ok(())
    }
}

/// A value bound to a placeholder of a hand-written query.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Float(f64),
}

/// One patient of a cohort, with what grouping needs.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Member {
    #[diesel(sql_type = Text)]
    pub id: String,
    /// The patient's hash in cohort prints
    /// ([`crate::differencing::patient_hash`], as a signed column).
    #[diesel(sql_type = BigInt)]
    pub print: i64,
    #[diesel(sql_type = Text)]
    pub gender: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    pub birth_ymd: Option<i64>,
    /// Index of the first diagnosis group the patient has, -1 for none.
    #[diesel(sql_type = BigInt)]
    pub dx: i64,
    /// The analysis variable's value, when it has one.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    pub value: Option<f64>,
    /// 1 when the patient has a rate's event.
    #[diesel(sql_type = BigInt)]
    pub event: i64,
}

impl Member {
    /// A member known by its print hash alone (a plain count's).
    pub fn printed(print: i64) -> Self {
        Member {
            id: String::new(),
            print,
            gender: String::new(),
            birth_ymd: None,
            dx: -1,
            value: None,
            event: 0,
        }
    }
}

/// A cohort member's print hash alone: all a plain count reads.
#[derive(Debug, Clone, Copy, QueryableByName)]
struct PrintRow {
    #[diesel(sql_type = BigInt)]
    print: i64,
}

/// One row of a grouped count: the group's key columns and its size.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct GroupCount {
    #[diesel(sql_type = Text)]
    pub k_sex: String,
    #[diesel(sql_type = BigInt)]
    pub k_band: i64,
    #[diesel(sql_type = BigInt)]
    pub k_dx: i64,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// A patient with a coded row, and the sensitive category bit of the
/// row's code (0 when it has none).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct CodeRow {
    #[diesel(sql_type = Text)]
    pub patient_id: String,
    #[diesel(sql_type = BigInt)]
    pub category_bit: i64,
}

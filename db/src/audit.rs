//! The audit log table both stores keep (`audit_log`, `audit_checkpoints`):
//! appending chained entries, signing checkpoints, expiry, reading back.
//!
//! Key decision: one implementation for the node and the coordinator, in
//! hand-written SQL over the two backends, because the entry has more columns
//! than diesel's lean `table!` supports. Appends are serialised (a lock per
//! log, an immediate transaction on SQLite, an advisory lock on PostgreSQL)
//! because each entry's hash covers the one before it.

use std::sync::{Arc, Mutex};

use diesel::connection::Connection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Text};
use ghx_audit::checkpoint::{Checkpoint, Signer};
use ghx_audit::{Entry, GENESIS};

use crate::witnesses::Witnesses;
use crate::{Backend, Result, WriteTransaction, with_conn};

/// Checkpoints are signed every this many entries unless configured.
pub const DEFAULT_CHECKPOINT_EVERY: i64 = 64;

/// The PostgreSQL advisory lock key appends hold ("ghxaudit").
const PG_APPEND_LOCK: i64 = 0x6768_7861_7564_6974;

const COLUMNS: &str = "seq, at, caller, caller_role, caller_org, source, requester, requester_org, \
     study_id, capability_id, action, peer, decision, reason, purpose, policy_reasons, \
     query_sha256, result_sha256, result_cells, consent_excluded, epsilon, prev_hash, hash";

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    at: String,
    #[diesel(sql_type = Text)]
    caller: String,
    #[diesel(sql_type = Text)]
    caller_role: String,
    #[diesel(sql_type = Text)]
    caller_org: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    requester: String,
    #[diesel(sql_type = Text)]
    requester_org: String,
    #[diesel(sql_type = Text)]
    study_id: String,
    #[diesel(sql_type = Text)]
    capability_id: String,
    #[diesel(sql_type = Text)]
    action: String,
    #[diesel(sql_type = Text)]
    peer: String,
    #[diesel(sql_type = Text)]
    decision: String,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Text)]
    purpose: String,
    #[diesel(sql_type = Text)]
    policy_reasons: String,
    #[diesel(sql_type = Text)]
    query_sha256: String,
    #[diesel(sql_type = Text)]
    result_sha256: String,
    #[diesel(sql_type = BigInt)]
    result_cells: i64,
    #[diesel(sql_type = BigInt)]
    consent_excluded: i64,
    #[diesel(sql_type = Double)]
    epsilon: f64,
    #[diesel(sql_type = Text)]
    prev_hash: String,
    #[diesel(sql_type = Text)]
    hash: String,
}

impl From<Row> for Entry {
    fn from(r: Row) -> Self {
        Entry {
            seq: r.seq,
            at: r.at,
            caller: r.caller,
            caller_role: r.caller_role,
            caller_org: r.caller_org,
            source: r.source,
            requester: r.requester,
            requester_org: r.requester_org,
            study_id: r.study_id,
            capability_id: r.capability_id,
            action: r.action,
            peer: r.peer,
            decision: r.decision,
            reason: r.reason,
            purpose: r.purpose,
            policy_reasons: r.policy_reasons,
            query_sha256: r.query_sha256,
            result_sha256: r.result_sha256,
            result_cells: r.result_cells,
            consent_excluded: r.consent_excluded,
            epsilon: r.epsilon,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

#[derive(QueryableByName)]
struct CheckpointRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    hash: String,
    #[diesel(sql_type = Text)]
    at: String,
    #[diesel(sql_type = Text)]
    token: String,
}

#[derive(QueryableByName)]
struct Link {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    hash: String,
}

fn time_now() -> ghx_audit::OffsetDateTime {
    ghx_audit::OffsetDateTime::now_utc()
}

/// What expiry removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expired {
    pub deleted: usize,
    /// The signed checkpoint that now anchors the log's first entry.
    pub anchor: Option<i64>,
}

/// Errors of the audit log beyond the database's own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] crate::Error),
    #[error("cannot sign an audit checkpoint: {0}")]
    Sign(#[from] ghx_audit::checkpoint::Error),
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        Error::Store(e.into())
    }
}

impl From<diesel::r2d2::PoolError> for Error {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        Error::Store(e.into())
    }
}

/// One keeper's audit log in its database.
#[derive(Clone)]
pub struct AuditLog {
    backend: Backend,
    append: Arc<Mutex<()>>,
    signer: Option<Arc<Signer>>,
    checkpoint_every: i64,
    /// The last committed link, and the signed head over it once asked.
    head: Arc<Mutex<Option<Head>>>,
    witnesses: Witnesses,
}

/// The log's last link, and its signature once one was asked for.
struct Head {
    link: Link,
    token: Option<(String, std::time::Instant)>,
}

/// A signed head is signed again once this old, so that an idle keeper's
/// head stays within the clock window witnesses accept.
const HEAD_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("backend", &self.backend)
            .field("signed", &self.signer.is_some())
            .field("checkpoint_every", &self.checkpoint_every)
            .finish()
    }
}

/// The INSERT of one entry, written so the backend's prepared statement
/// is kept and reused (diesel's `sql_query` prepares it again every
/// time): an audited request's own cost includes this.
struct InsertEntry<'a>(&'a Entry);

impl<DB> diesel::query_builder::QueryFragment<DB> for InsertEntry<'_>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<Text>
        + diesel::sql_types::HasSqlType<BigInt>
        + diesel::sql_types::HasSqlType<Double>,
    str: diesel::serialize::ToSql<Text, DB>,
    i64: diesel::serialize::ToSql<BigInt, DB>,
    f64: diesel::serialize::ToSql<Double, DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> diesel::QueryResult<()> {
        let e = self.0;
        out.push_sql("INSERT INTO audit_log (");
        out.push_sql(COLUMNS);
        out.push_sql(") VALUES (");
        out.push_bind_param::<BigInt, _>(&e.seq)?;
        for text in [
            &e.at,
            &e.caller,
            &e.caller_role,
            &e.caller_org,
            &e.source,
            &e.requester,
            &e.requester_org,
            &e.study_id,
            &e.capability_id,
            &e.action,
            &e.peer,
            &e.decision,
            &e.reason,
            &e.purpose,
            &e.policy_reasons,
            &e.query_sha256,
            &e.result_sha256,
        ] {
            out.push_sql(", ");
            out.push_bind_param::<Text, str>(text.as_str())?;
        }
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&e.result_cells)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&e.consent_excluded)?;
        out.push_sql(", ");
        out.push_bind_param::<Double, _>(&e.epsilon)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, str>(e.prev_hash.as_str())?;
        out.push_sql(", ");
        out.push_bind_param::<Text, str>(e.hash.as_str())?;
        out.push_sql(")");
        Ok(())
    }
}

impl diesel::query_builder::QueryId for InsertEntry<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Conn> diesel::query_dsl::RunQueryDsl<Conn> for InsertEntry<'_> {}

/// The two columns of the chain the head is read from, for statements
/// the backend keeps prepared.
mod chain {
    diesel::table! {
        audit_log (seq) {
            seq -> BigInt,
            hash -> Text,
        }
    }

    diesel::table! {
        audit_checkpoints (seq) {
            seq -> BigInt,
            hash -> Text,
        }
    }
}

/// The columns a count of one study's entries reads.
mod by_study {
    diesel::table! {
        audit_log (seq) {
            seq -> BigInt,
            study_id -> Text,
            action -> Text,
            decision -> Text,
        }
    }
}

/// The last link of the chain: the last entry, or the last checkpoint when
/// there are no entries (expiry always keeps one, so only after tampering;
/// appends then continue past the checkpoint and verification names the
/// deletion instead of a fresh chain hiding it).
macro_rules! head {
    ($conn:expr) => {{
        let last: Option<(i64, String)> = chain::audit_log::table
            .select((chain::audit_log::seq, chain::audit_log::hash))
            .order(chain::audit_log::seq.desc())
            .first($conn)
            .optional()?;
        let last = match last {
            Some(l) => Some(l),
            None => chain::audit_checkpoints::table
                .select((
                    chain::audit_checkpoints::seq,
                    chain::audit_checkpoints::hash,
                ))
                .order(chain::audit_checkpoints::seq.desc())
                .first($conn)
                .optional()?,
        };
        last.map(|(seq, hash)| Link { seq, hash })
    }};
}

/// Appends `$entries` after the head, signing a checkpoint at every
/// multiple of the interval; evaluates to the chained entries.
macro_rules! append_body {
    ($self:expr, $conn:expr, $cp_sql:expr, $entries:expr) => {{
        let head: Option<Link> = head!($conn);
        let (mut seq, mut prev) = match head {
            Some(l) => (l.seq, l.hash),
            None => (0, GENESIS.to_owned()),
        };
        let mut chained = Vec::with_capacity($entries.len());
        for entry in $entries {
            let mut e = entry.clone();
            seq += 1;
            e.chain(seq, &prev);
            InsertEntry(&e).execute($conn)?;
            prev = e.hash.clone();
            if let Some(signer) = &$self.signer
                && seq % $self.checkpoint_every == 0
            {
                let cp = signer.sign(seq, &prev)?;
                insert_checkpoint!($conn, &$cp_sql, &cp);
            }
            chained.push(e);
        }
        Ok::<_, Error>(chained)
    }};
}

macro_rules! insert_checkpoint {
    ($conn:expr, $sql:expr, $cp:expr) => {{
        let cp: &Checkpoint = $cp;
        diesel::sql_query($sql)
            .bind::<BigInt, _>(cp.seq)
            .bind::<Text, _>(&cp.hash)
            .bind::<Text, _>(&cp.at)
            .bind::<Text, _>(&cp.token)
            .execute($conn)?;
    }};
}

impl AuditLog {
    /// The audit log in `backend`, whose migrations created its tables.
    /// Unsigned until [`AuditLog::signed_by`].
    pub fn new(backend: Backend) -> Self {
        AuditLog {
            witnesses: Witnesses::new(backend.clone()),
            backend,
            append: Arc::new(Mutex::new(())),
            signer: None,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            head: Arc::default(),
        }
    }

    /// The log in an opened store's `backend`: entries written before the
    /// log was chained (by an older ghx) get their links first.
    pub fn open(backend: Backend) -> Result<Self> {
        let log = AuditLog::new(backend);
        let sealed = log.seal()?;
        if sealed > 0 {
            tracing::info!(
                entries = sealed,
                "chained audit entries written before chaining"
            );
        }
        Ok(log)
    }

    /// Signs a checkpoint every `every` entries with `signer` (and
    /// [`spawn_upkeep`] signs one at start-up and daily).
    pub fn signed_by(self, signer: Signer, every: i64) -> Self {
        AuditLog {
            signer: Some(Arc::new(signer)),
            checkpoint_every: every.max(1),
            ..self
        }
    }

    fn checkpoint_sql(&self) -> String {
        let d = self.backend.dialect();
        format!(
            "INSERT INTO audit_checkpoints (seq, hash, at, token) VALUES ({}, {}, {}, {}) \
             ON CONFLICT (seq) DO NOTHING",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            d.placeholder(4)
        )
    }

    /// Appends one entry (its `seq`, `prev_hash` and `hash` are assigned
    /// here) and returns it as stored.
    pub fn append(&self, entry: &Entry) -> Result<Entry, Error> {
        let mut all = self.append_all(std::slice::from_ref(entry))?;
        Ok(all.pop().expect("one entry in, one out"))
    }

    /// Appends entries in one transaction, in order.
    pub fn append_all(&self, entries: &[Entry]) -> Result<Vec<Entry>, Error> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let _guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let cp_sql = self.checkpoint_sql();
        let chained: Vec<Entry> = match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.get().map_err(crate::Error::from)?;
                conn.immediate_transaction(|conn| append_body!(self, conn, cp_sql, entries))
            }
            Backend::Postgres(pool) => {
                let mut conn = pool.get().map_err(crate::Error::from)?;
                conn.transaction(|conn| {
                    diesel::sql_query(format!("SELECT pg_advisory_xact_lock({PG_APPEND_LOCK})"))
                        .execute(conn)?;
                    append_body!(self, conn, cp_sql, entries)
                })
            }
        }?;
        // Committed: the head a witness may now be given.
        if let Some(last) = chained.last() {
            *self.head.lock().unwrap_or_else(|e| e.into_inner()) = Some(Head {
                link: Link {
                    seq: last.seq,
                    hash: last.hash.clone(),
                },
                token: None,
            });
        }
        Ok(chained)
    }

    /// The keeper's signed head: a checkpoint token over the last committed
    /// entry, for the other side of a call to witness. Signed once per head
    /// (again once it is an hour old) and not stored here (the other side
    /// keeps it). `None` without a signer or entries.
    pub fn signed_head(&self) -> Result<Option<String>, Error> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        if head.is_none() {
            let link: Option<Link> = with_conn!(self.backend, |conn| head!(conn));
            *head = link.map(|link| Head { link, token: None });
        }
        let Some(head) = head.as_mut() else {
            return Ok(None);
        };
        let fresh = head
            .token
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < HEAD_FRESH_FOR);
        if !fresh {
            let token = signer.sign(head.link.seq, &head.link.hash)?.token;
            head.token = Some((token, std::time::Instant::now()));
        }
        Ok(head.token.as_ref().map(|(token, _)| token.clone()))
    }

    /// [`AuditLog::signed_head`] off the async threads, for a call to
    /// carry; a failure is logged, and the call goes without a head.
    pub async fn signed_head_for_call(&self) -> Option<String> {
        let log = self.clone();
        match tokio::task::spawn_blocking(move || log.signed_head()).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot sign the audit head");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit head task failed");
                None
            }
        }
    }

    /// The heads of other keepers' logs this keeper holds.
    pub fn witnesses(&self) -> &Witnesses {
        &self.witnesses
    }

    /// Signs a checkpoint at the current head unless one is there already
    /// (at start-up, before expiry, on demand). Returns it, or `None` when
    /// the log is empty or there is no signer.
    pub fn checkpoint_now(&self) -> Result<Option<Checkpoint>, Error> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let _guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let head: Option<Link> = with_conn!(self.backend, |conn| head!(conn));
        let Some(head) = head else {
            return Ok(None);
        };
        let cp = signer.sign(head.seq, &head.hash)?;
        let sql = self.checkpoint_sql();
        with_conn!(self.backend, |conn| insert_checkpoint!(conn, &sql, &cp));
        Ok(Some(cp))
    }

    /// Every entry, in order.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let sql = format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq");
        let rows: Vec<Row> = with_conn!(self.backend, |conn| diesel::sql_query(&sql).load(conn)?);
        Ok(rows.into_iter().map(Entry::from).collect())
    }

    /// How many entries of `study_id` record `action` decided `decision`.
    pub fn count(&self, study_id: &str, action: &str, decision: &str) -> Result<i64> {
        use by_study::audit_log::dsl as log;
        Ok(with_conn!(self.backend, |conn| log::audit_log
            .filter(log::study_id.eq(study_id))
            .filter(log::action.eq(action))
            .filter(log::decision.eq(decision))
            .count()
            .get_result(conn)?))
    }

    /// Every stored checkpoint, in order.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows: Vec<CheckpointRow> = with_conn!(self.backend, |conn| diesel::sql_query(
            "SELECT seq, hash, at, token FROM audit_checkpoints ORDER BY seq"
        )
        .load(conn)?);
        Ok(rows
            .into_iter()
            .map(|r| Checkpoint {
                seq: r.seq,
                hash: r.hash,
                at: r.at,
                token: r.token,
            })
            .collect())
    }

    /// Chains entries written before the log was chained (by a version
    /// without hashes): they get their links now, in order. Returns how many.
    pub fn seal(&self) -> Result<usize> {
        let _guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        // Every store open asks; only a log an older ghx wrote is loaded.
        let unsealed: Option<Link> = with_conn!(self.backend, |conn| diesel::sql_query(
            "SELECT seq, hash FROM audit_log WHERE hash = '' LIMIT 1"
        )
        .get_result(conn)
        .optional()?);
        if unsealed.is_none() {
            return Ok(0);
        }
        let entries = self.entries()?;
        let d = self.backend.dialect();
        let sql = format!(
            "UPDATE audit_log SET prev_hash = {}, hash = {} WHERE seq = {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        let mut prev = GENESIS.to_owned();
        let mut sealed = Vec::new();
        for mut e in entries {
            if e.hash.is_empty() {
                let seq = e.seq;
                e.chain(seq, &prev);
                sealed.push(e.clone());
            }
            prev = e.hash;
        }
        with_conn!(self.backend, |conn| conn.write_transaction(|conn| {
            for e in &sealed {
                diesel::sql_query(&sql)
                    .bind::<Text, _>(&e.prev_hash)
                    .bind::<Text, _>(&e.hash)
                    .bind::<BigInt, _>(e.seq)
                    .execute(conn)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?);
        Ok(sealed.len())
    }

    /// Routine upkeep: a checkpoint over the head, then expiry of what is
    /// older than the retention period.
    pub fn maintain(&self, settings: &ghx_audit::Settings) -> Result<Expired, Error> {
        self.checkpoint_now()?;
        let now = time_now();
        let expired = self.expire_before(&settings.cutoff(now))?;
        let cutoff = now.unix_timestamp() - i64::from(settings.retention_days) * 86_400;
        self.witnesses.expire_before(cutoff)?;
        Ok(expired)
    }

    /// Deletes the entries recorded before `cutoff` (RFC 3339), but only up
    /// to the last signed checkpoint among them, which then anchors what is
    /// left: the log stays verifiable from its new first entry. The last
    /// entry always stays, so an emptied log always means tampering.
    pub fn expire_before(&self, cutoff: &str) -> Result<Expired> {
        let _guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let d = self.backend.dialect();
        let find = format!(
            "SELECT c.seq AS seq, c.hash AS hash FROM audit_checkpoints c \
             JOIN audit_log l ON l.seq = c.seq WHERE l.at < {} AND c.at < {} \
             AND c.seq < (SELECT MAX(seq) FROM audit_log) ORDER BY c.seq DESC LIMIT 1",
            d.placeholder(1),
            d.placeholder(2)
        );
        // The anchor itself must be past retention: verification accepts a
        // log's start only on a checkpoint signed that long ago.
        let anchor: Option<Link> = with_conn!(self.backend, |conn| diesel::sql_query(&find)
            .bind::<Text, _>(cutoff)
            .bind::<Text, _>(cutoff)
            .get_result(conn)
            .optional()?);
        let Some(anchor) = anchor else {
            return Ok(Expired::default());
        };
        let delete = format!("DELETE FROM audit_log WHERE seq <= {}", d.placeholder(1));
        let deleted = with_conn!(self.backend, |conn| diesel::sql_query(&delete)
            .bind::<BigInt, _>(anchor.seq)
            .execute(conn)?);
        Ok(Expired {
            deleted,
            anchor: Some(anchor.seq),
        })
    }
}

/// Signs a checkpoint and expires entries past retention now and daily.
pub fn spawn_upkeep(log: AuditLog, settings: ghx_audit::Settings) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut daily = tokio::time::interval(std::time::Duration::from_secs(24 * 3600));
        loop {
            daily.tick().await;
            let (log, settings) = (log.clone(), settings.clone());
            match tokio::task::spawn_blocking(move || log.maintain(&settings)).await {
                Ok(Ok(expired)) if expired.deleted > 0 => {
                    tracing::info!(deleted = expired.deleted, anchor = ?expired.anchor, "audit entries past retention expired")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "audit upkeep failed"),
                Err(e) => tracing::error!(error = %e, "audit upkeep task failed"),
            }
        }
    })
}

/// Signs a checkpoint over the head as a service stops, so a log read after
/// a graceful shutdown is signed to its last entry.
pub async fn sign_on_shutdown(log: AuditLog) {
    match tokio::task::spawn_blocking(move || log.checkpoint_now()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot sign the audit log at shutdown"),
        Err(e) => tracing::error!(error = %e, "audit signing task failed"),
    }
}

//! The signed audit heads of other keepers that this keeper holds
//! (`audit_witnessed`): the coordinator keeps each node's, each node the
//! coordinator's, so that deleting or rewriting the tail of one keeper's
//! log, checkpoints and all, is caught against the other's database.
//!
//! Key decision: store, never judge. A head is kept as received when its
//! token parses and names the keeper it came from; its signature is
//! checked when a log is verified (`ghx_audit::witness`). Each distinct
//! (keeper, seq) is kept once and a head equal to the last one noted is not
//! written again: a row per entry the keeper adds, as its own log has.
//! Nothing is deleted before retention: a newer head vouches only for the
//! chain as it is now, so an older one is the evidence of a rewrite.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use ghx_audit::WitnessedHead;
use ghx_audit::checkpoint::Checkpoint;

use crate::{Backend, Result, with_conn};

/// A checkpoint token is about 300 bytes; anything much longer is not one.
pub const MAX_TOKEN_BYTES: usize = 2048;

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    keeper: String,
    #[diesel(sql_type = Text)]
    token: String,
    #[diesel(sql_type = Text)]
    received_at: String,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Why a received head was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the audit head is not a checkpoint token")]
    NotAToken,
    #[error("the audit head is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the audit head was signed more than a day from this clock's now")]
    Clock,
    #[error("the audit head is `{claimed}`'s, not `{sender}`'s")]
    OtherKeeper { claimed: String, sender: String },
}

/// The heads this keeper holds of others.
#[derive(Clone)]
pub struct Witnesses {
    backend: Backend,
    /// The last seq noted per keeper, to skip repeats without a write.
    last: Arc<Mutex<BTreeMap<String, i64>>>,
}

impl std::fmt::Debug for Witnesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witnesses")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Witnesses {
    pub(crate) fn new(backend: Backend) -> Self {
        Witnesses {
            backend,
            last: Arc::default(),
        }
    }

    /// Keeps `token`, a head `sender` sent of its own log. Returns whether
    /// it was new. A token that does not parse, or names another keeper,
    /// is refused (and nothing is stored).
    pub fn note(&self, sender: &str, token: &str) -> Result<bool, NoteError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::TooLong.into());
        }
        let (cp, claims) = Checkpoint::from_token(token).ok_or(Refused::NotAToken)?;
        if claims.iss == sender && self.is_last(sender, cp.seq) {
            return Ok(false);
        }
        // A head far off this clock would never expire, or expire at once:
        // whoever sent it does not keep time with the federation.
        let now = ghx_audit::OffsetDateTime::now_utc().unix_timestamp();
        if (claims.iat - now).abs() > 86_400 {
            return Err(Refused::Clock.into());
        }
        if claims.iss != sender {
            return Err(Refused::OtherKeeper {
                claimed: claims.iss,
                sender: sender.to_owned(),
            }
            .into());
        }
        if self.is_last(sender, cp.seq) {
            return Ok(false);
        }
        let d = self.backend.dialect();
        let sql = format!(
            "INSERT INTO audit_witnessed (keeper, seq, hash, iat, token, received_at) \
             VALUES ({}, {}, {}, {}, {}, {}) ON CONFLICT (keeper, seq) DO NOTHING",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            d.placeholder(4),
            d.placeholder(5),
            d.placeholder(6)
        );
        let stored = with_conn!(self.backend, |conn| diesel::sql_query(&sql)
            .bind::<Text, _>(sender)
            .bind::<BigInt, _>(cp.seq)
            .bind::<Text, _>(&cp.hash)
            .bind::<BigInt, _>(claims.iat)
            .bind::<Text, _>(token)
            .bind::<Text, _>(ghx_audit::now_rfc3339())
            .execute(conn)
            .map_err(crate::Error::from)?);
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sender.to_owned(), cp.seq);
        Ok(stored > 0)
    }

    fn is_last(&self, keeper: &str, seq: i64) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(keeper)
            == Some(&seq)
    }

    /// Every head held, by keeper and seq. A database from before witnesses
    /// (no table) holds none.
    pub fn all(&self) -> Result<Vec<WitnessedHead>> {
        if !self.table_exists()? {
            return Ok(Vec::new());
        }
        let rows: Vec<Row> = with_conn!(self.backend, |conn| diesel::sql_query(
            "SELECT keeper, token, received_at FROM audit_witnessed ORDER BY keeper, seq"
        )
        .load(conn)?);
        Ok(rows
            .into_iter()
            .map(|r| WitnessedHead {
                keeper: r.keeper,
                token: r.token,
                received_at: r.received_at,
            })
            .collect())
    }

    fn table_exists(&self) -> Result<bool> {
        let sql = match self.backend {
            Backend::Sqlite(_) => {
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'audit_witnessed'"
            }
            Backend::Postgres(_) => {
                "SELECT COUNT(*) AS n FROM pg_tables WHERE tablename = 'audit_witnessed' \
                 AND schemaname = ANY (current_schemas(false))"
            }
        };
        let found: Exists = with_conn!(self.backend, |conn| diesel::sql_query(sql)
            .get_result(conn)?);
        Ok(found.n > 0)
    }

    /// Drops heads signed before `cutoff` (unix seconds) but each keeper's
    /// newest, which still bounds that keeper's log. Returns how many.
    pub fn expire_before(&self, cutoff: i64) -> Result<usize> {
        let d = self.backend.dialect();
        let sql = format!(
            "DELETE FROM audit_witnessed WHERE iat < {} AND seq < \
             (SELECT MAX(w.seq) FROM audit_witnessed w WHERE w.keeper = audit_witnessed.keeper)",
            d.placeholder(1)
        );
        Ok(with_conn!(self.backend, |conn| diesel::sql_query(&sql)
            .bind::<BigInt, _>(cutoff)
            .execute(conn)?))
    }
}

/// A head not kept: refused, or the database failed.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Store(#[from] crate::Error),
}

impl From<diesel::r2d2::PoolError> for NoteError {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        NoteError::Store(e.into())
    }
}

//! How many evaluation rounds a study may have at this node, counted so
//! that requests arriving together cannot pass the limit together.
//!
//! The count is the study's answered evaluation rounds in the node's audit
//! log plus those admitted but not yet recorded there: an admission takes a
//! [`Reservation`], which counts until it is dropped, after the round's
//! audit entry is written. Reading the log and taking the reservation
//! happen under one lock.

use std::collections::HashMap;
use std::sync::Mutex;

/// The limit, and the evaluations admitted but not yet in the audit log.
#[derive(Debug)]
pub(crate) struct EvaluationLimit {
    limit: u32,
    pending: Mutex<HashMap<String, u32>>,
}

/// An admitted evaluation of one study, counted until dropped.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    of: &'a EvaluationLimit,
    study: String,
}

/// Why an evaluation was not admitted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal<E> {
    #[error("study {study} has had its {limit} evaluation rounds at this node")]
    Spent { study: String, limit: u32 },
    #[error(transparent)]
    Count(E),
}

impl EvaluationLimit {
    pub(crate) fn new(limit: u32) -> Self {
        EvaluationLimit {
            limit,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one more evaluation of `study` if the ones `recorded` (read
    /// under the lock) and those still pending leave room.
    pub(crate) fn reserve<E>(
        &self,
        study: &str,
        recorded: impl FnOnce() -> Result<i64, E>,
    ) -> Result<Reservation<'_>, Refusal<E>> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = recorded().map_err(Refusal::Count)?;
        let waiting = i64::from(pending.get(study).copied().unwrap_or(0));
        if recorded + waiting >= i64::from(self.limit) {
            return Err(Refusal::Spent {
                study: study.to_owned(),
                limit: self.limit,
            });
        }
        *pending.entry(study.to_owned()).or_insert(0) += 1;
        Ok(Reservation {
            of: self,
            study: study.to_owned(),
        })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut pending = self.of.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pending.get_mut(&self.study) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&self.study);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admissions_pending_together_count_against_the_limit() {
        let limit = EvaluationLimit::new(2);
        let none = || Ok::<i64, ()>(0);
        let first = limit.reserve("s", none).unwrap();
        let second = limit.reserve("s", none).unwrap();
        // Neither is in the log yet, and still a third is refused.
        assert!(matches!(
            limit.reserve("s", none),
            Err(Refusal::Spent { limit: 2, .. })
        ));
        // Another study has its own count.
        let other = limit.reserve("t", none).unwrap();
        // Once recorded, the log counts them instead.
        drop((first, second, other));
        assert!(limit.reserve("s", || Ok::<i64, ()>(2)).is_err());
        assert!(limit.reserve("s", || Ok::<i64, ()>(1)).is_ok());
        assert!(matches!(
            limit.reserve("s", || Err::<i64, &str>("log unreadable")),
            Err(Refusal::Count("log unreadable"))
        ));
    }

    #[test]
    fn concurrent_admissions_never_pass_the_limit_together() {
        let limit = EvaluationLimit::new(5);
        let admitted = std::sync::atomic::AtomicU32::new(0);
        let held = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    if let Ok(r) = limit.reserve("s", || Ok::<i64, ()>(0)) {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        held.lock().unwrap().push(r);
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 5);
    }
}

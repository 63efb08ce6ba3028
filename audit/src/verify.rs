//! Verifying a log: the chain from its anchor to its end, and every signed
//! checkpoint against it. The verdict names the first broken entry.

use crate::checkpoint::{Checkpoint, Verifier};
use crate::{Entry, GENESIS};

/// What is wrong at the first broken entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The entry's contents do not match its hash: edited (or moved to
    /// another position, which is part of what the hash covers).
    Edited,
    /// The entry does not follow the one before it: something was deleted,
    /// inserted or reordered just before it.
    Unlinked,
    /// Entries from `seq` up to `next - 1` are missing.
    Missing { next: i64 },
    /// The log starts after 1 and no signed checkpoint anchors its start, so
    /// the entries before it were deleted outside retention.
    Unanchored,
    /// The log is consistent but differs from a signed checkpoint: it was
    /// rewritten at or before this entry.
    Rewritten,
    /// A signed checkpoint covers entries past the end of the log: the
    /// entries from this one on were deleted.
    Truncated { signed_through: i64 },
    /// A checkpoint row is not the keeper's signature over this entry.
    BadCheckpoint(String),
    /// The log starts after 1, anchored by a checkpoint signed at
    /// `anchored_at`, less than the retention period ago: the entries
    /// before it were deleted, not expired.
    EarlyExpiry {
        anchored_at: String,
        retention_days: u32,
    },
    /// Another keeper (`by`) holds this keeper's signed head of this entry,
    /// and the entry differs from it: rewritten (and rechained).
    WitnessDiffers { by: String },
    /// The log ends before this entry, though `by` holds this keeper's
    /// signed head of entry `witnessed_through`: the tail was deleted,
    /// with any checkpoints above it.
    EndsBeforeWitness { witnessed_through: i64, by: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Edited => {
                f.write_str("its contents do not match its hash (edited, or moved from elsewhere)")
            }
            Problem::Unlinked => f.write_str(
                "it does not follow the entry before it (an entry was deleted, inserted or reordered)",
            ),
            Problem::Missing { next } => write!(f, "it is missing (the log continues at {next})"),
            Problem::Unanchored => f.write_str(
                "the entries before it are gone and no signed checkpoint anchors the log here",
            ),
            Problem::Rewritten => f.write_str(
                "the log differs from the keeper's signed checkpoint here (rewritten at or before this entry)",
            ),
            Problem::Truncated { signed_through } => write!(
                f,
                "it and the entries after it are gone, though a signed checkpoint covers up to {signed_through}"
            ),
            Problem::BadCheckpoint(why) => write!(f, "its checkpoint is not genuine: {why}"),
            Problem::EarlyExpiry {
                anchored_at,
                retention_days,
            } => write!(
                f,
                "the entries before it are gone, though the checkpoint anchoring the log here was signed at {anchored_at}, less than the {retention_days}-day retention period ago (deleted, not expired)"
            ),
            Problem::WitnessDiffers { by } => write!(
                f,
                "it differs from the keeper's signed head of it that {by} holds (rewritten)"
            ),
            Problem::EndsBeforeWitness {
                witnessed_through,
                by,
            } => write!(
                f,
                "the log ends here, though {by} holds the keeper's signed head of entry {witnessed_through} (entries deleted)"
            ),
        }
    }
}

/// The first broken entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: i64,
    pub problem: Problem,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {}: {}", self.seq, self.problem)
    }
}

/// The verdict on one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: usize,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// Whether checkpoint signatures were checked (a certificate was given).
    pub signatures_checked: bool,
    /// Checkpoints whose signatures were checked.
    pub checkpoints_checked: usize,
    /// The highest sequence number a good signed checkpoint covers.
    pub signed_through: Option<i64>,
    /// Entries after the last signed checkpoint: chained, not yet signed.
    pub unsigned_tail: usize,
    /// What other keepers witnessed of this log, when compared with it
    /// ([`crate::witness::compare`]); `None` when no witness was given.
    pub witnessed: Option<crate::witness::Witnessed>,
    pub broken: Option<Broken>,
}

impl Verification {
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Verifies `entries` (in store order, by `seq`) and `checkpoints`. Without
/// a `verifier` the chain and the checkpoints' hashes are still checked, but
/// not who signed them.
pub fn verify(
    entries: &[Entry],
    checkpoints: &[Checkpoint],
    verifier: Option<&Verifier>,
) -> Verification {
    let mut problems: Vec<Broken> = Vec::new();
    let mut checkpoints: Vec<&Checkpoint> = checkpoints.iter().collect();
    checkpoints.sort_by_key(|c| c.seq);

    let mut checked = 0;
    let mut good: Vec<&Checkpoint> = Vec::new();
    for cp in &checkpoints {
        if let Some(v) = verifier {
            checked += 1;
            if let Err(flaw) = v.check(cp) {
                problems.push(Broken {
                    seq: cp.seq,
                    problem: Problem::BadCheckpoint(flaw.to_string()),
                });
                continue;
            }
        }
        good.push(cp);
    }

    let first_seq = entries.first().map(|e| e.seq);
    let last_seq = entries.last().map(|e| e.seq);
    if let Some(first) = first_seq {
        let mut expected_prev = if first == 1 {
            Some(GENESIS.to_owned())
        } else {
            good.iter()
                .find(|c| c.seq == first - 1)
                .map(|c| c.hash.clone())
        };
        if expected_prev.is_none() {
            problems.push(Broken {
                seq: first,
                problem: Problem::Unanchored,
            });
        }
        let mut expected_seq = first;
        for entry in entries {
            if entry.seq != expected_seq {
                problems.push(Broken {
                    seq: expected_seq,
                    problem: Problem::Missing { next: entry.seq },
                });
                // Carry on from what is there so later problems are found too.
                expected_seq = entry.seq;
            }
            if entry.compute_hash() != entry.hash {
                problems.push(Broken {
                    seq: entry.seq,
                    problem: Problem::Edited,
                });
            } else if let Some(prev) = &expected_prev
                && entry.prev_hash != *prev
            {
                problems.push(Broken {
                    seq: entry.seq,
                    problem: Problem::Unlinked,
                });
            }
            expected_prev = Some(entry.hash.clone());
            expected_seq += 1;
        }
    }

    // Each good checkpoint must agree with the entry it covers.
    let by_seq = |seq: i64| -> Option<&Entry> {
        let first = first_seq?;
        let guess = usize::try_from(seq - first).ok()?;
        match entries.get(guess) {
            Some(e) if e.seq == seq => Some(e),
            _ => entries.iter().find(|e| e.seq == seq),
        }
    };
    for cp in &good {
        match (by_seq(cp.seq), last_seq) {
            (Some(entry), _) if entry.hash != cp.hash => problems.push(Broken {
                seq: entry.seq,
                problem: Problem::Rewritten,
            }),
            (None, Some(last)) if cp.seq > last => problems.push(Broken {
                seq: last + 1,
                problem: Problem::Truncated {
                    signed_through: cp.seq,
                },
            }),
            (None, None) if cp.seq > 0 => problems.push(Broken {
                seq: 1,
                problem: Problem::Truncated {
                    signed_through: cp.seq,
                },
            }),
            // Agrees with its entry; or before the first entry: expired
            // under retention (the anchor was checked above); or inside a
            // gap already reported.
            _ => {}
        }
    }

    let signed_through = good.iter().map(|c| c.seq).max();
    let unsigned_tail = match signed_through {
        Some(s) => entries.iter().filter(|e| e.seq > s).count(),
        None => entries.len(),
    };
    problems.sort_by_key(|b| b.seq);
    Verification {
        entries: entries.len(),
        first_seq,
        last_seq,
        signatures_checked: verifier.is_some(),
        checkpoints_checked: checked,
        signed_through,
        unsigned_tail,
        witnessed: None,
        broken: problems.into_iter().next(),
    }
}

/// How long entries are kept: expiry deletes them only through a
/// checkpoint signed more than `days` before `now`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub days: u32,
    pub now: time::OffsetDateTime,
}

/// [`verify`], and a log that starts after 1 must be anchored by a
/// checkpoint signed more than the retention period ago: deleting the head
/// up to a recent checkpoint is not expiry. The signed time is the
/// token's when a `verifier` checks it, else the row's.
pub fn verify_retained(
    entries: &[Entry],
    checkpoints: &[Checkpoint],
    verifier: Option<&Verifier>,
    retention: Retention,
) -> Verification {
    let mut verdict = verify(entries, checkpoints, verifier);
    let Some(first) = verdict.first_seq.filter(|first| *first > 1) else {
        return verdict;
    };
    let Some(anchor) = checkpoints.iter().find(|c| c.seq == first - 1) else {
        // Unanchored: reported already.
        return verdict;
    };
    let signed_at = match verifier {
        Some(v) => v.claims(anchor).ok().map(|c| c.iat),
        None => {
            time::OffsetDateTime::parse(&anchor.at, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp())
        }
    };
    let cutoff = (retention.now - time::Duration::days(i64::from(retention.days))).unix_timestamp();
    if signed_at.is_none_or(|t| t >= cutoff)
        && verdict.broken.as_ref().is_none_or(|b| b.seq > first)
    {
        verdict.broken = Some(Broken {
            seq: first,
            problem: Problem::EarlyExpiry {
                anchored_at: anchor.at.clone(),
                retention_days: retention.days,
            },
        });
    }
    verdict
}

/// Chains `entries` from `prev_hash`, numbering them from `first_seq`:
/// what a store does on append, here for tests and fixtures.
pub fn chain_all(entries: &mut [Entry], first_seq: i64, prev_hash: &str) {
    let mut prev = prev_hash.to_owned();
    for (i, e) in entries.iter_mut().enumerate() {
        e.chain(first_seq + i as i64, &prev);
        prev = e.hash.clone();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A chained log of `n` entries, for tests here and in `witness`.
    pub(crate) fn log(n: usize) -> Vec<Entry> {
        let mut entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                at: format!("2026-11-29T10:00:{i:02}Z"),
                caller: "coordinator".into(),
                action: "aggregate".into(),
                decision: "answered".into(),
                ..Entry::default()
            })
            .collect();
        chain_all(&mut entries, 1, GENESIS);
        entries
    }

    fn broken(entries: &[Entry]) -> Option<Broken> {
        verify(entries, &[], None).broken
    }

    #[test]
    fn an_intact_log_verifies() {
        let v = verify(&log(10), &[], None);
        assert!(v.is_intact(), "{:?}", v.broken);
        assert_eq!((v.entries, v.unsigned_tail), (10, 10));
        assert!(verify(&[], &[], None).is_intact());
    }

    #[test]
    fn each_kind_of_tampering_names_its_entry() {
        let mut edited = log(10);
        edited[4].reason = "nothing happened".into();
        assert_eq!(
            broken(&edited),
            Some(Broken {
                seq: 5,
                problem: Problem::Edited
            })
        );

        let mut deleted = log(10);
        deleted.remove(4);
        assert_eq!(
            broken(&deleted),
            Some(Broken {
                seq: 5,
                problem: Problem::Missing { next: 6 }
            })
        );

        // Reordered: entries 4 and 5 swap places (and numbers).
        let mut reordered = log(10);
        reordered.swap(3, 4);
        reordered[3].seq = 4;
        reordered[4].seq = 5;
        assert_eq!(broken(&reordered).map(|b| b.seq), Some(4));

        // Inserted with a correct hash of its own, renumbering the rest.
        let mut inserted = log(10);
        let mut extra = inserted[2].clone();
        extra.action = "injected".into();
        extra.chain(4, &inserted[2].hash);
        inserted.insert(3, extra);
        for (i, e) in inserted.iter_mut().enumerate().skip(4) {
            e.seq = i as i64 + 1;
        }
        assert_eq!(
            broken(&inserted),
            Some(Broken {
                seq: 5,
                problem: Problem::Edited
            })
        );
    }

    #[test]
    fn a_rechained_log_is_caught_by_its_checkpoints_only() {
        let original = log(10);
        let cp = Checkpoint {
            seq: 8,
            hash: original[7].hash.clone(),
            at: String::new(),
            token: String::new(),
        };
        // Whoever can write the database rebuilds the chain after an edit.
        let mut rewritten = original.clone();
        rewritten[2].decision = "refused".into();
        chain_all(&mut rewritten, 1, GENESIS);
        assert!(broken(&rewritten).is_none());
        let v = verify(&rewritten, std::slice::from_ref(&cp), None);
        assert_eq!(
            v.broken,
            Some(Broken {
                seq: 8,
                problem: Problem::Rewritten
            })
        );

        // The tail deleted past a checkpoint.
        let truncated = &original[..6];
        assert_eq!(
            verify(truncated, std::slice::from_ref(&cp), None).broken,
            Some(Broken {
                seq: 7,
                problem: Problem::Truncated { signed_through: 8 }
            })
        );
    }

    #[test]
    fn expiry_up_to_a_checkpoint_keeps_the_chain_verifiable() {
        let original = log(10);
        let cp = Checkpoint {
            seq: 4,
            hash: original[3].hash.clone(),
            at: String::new(),
            token: String::new(),
        };
        let kept = &original[4..];
        let v = verify(kept, std::slice::from_ref(&cp), None);
        assert!(v.is_intact(), "{:?}", v.broken);
        assert_eq!(v.first_seq, Some(5));
        assert_eq!(
            verify(&original[5..], std::slice::from_ref(&cp), None).broken,
            Some(Broken {
                seq: 6,
                problem: Problem::Unanchored
            })
        );
    }
}

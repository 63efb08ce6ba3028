//! Comparing a keeper's log with the signed heads of it that other keepers
//! hold: the coordinator keeps each node's, each node the coordinator's.
//! Whoever can write the keeper's database can delete its tail together
//! with the checkpoints above it, or rewrite and rechain it; they cannot
//! reach the heads the other side already holds.
//!
//! Key decision: a witness stores, it never vouches. A head counts only
//! once its signature verifies with the keeper's certificate (and, for an
//! export, was signed before the export was made); one that does not is
//! skipped, never a break, since a bad token held elsewhere is not the
//! keeper's doing. A head that counts and that the log lacks or contradicts
//! breaks the log at that entry.

use crate::Entry;
use crate::checkpoint::{Checkpoint, Verifier, peek};
use crate::verify::{Broken, Problem, Verification};

/// A keeper's signed head as another keeper (`by`) holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    pub by: String,
    pub checkpoint: Checkpoint,
}

/// What the witnesses said of a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Witnessed {
    /// Heads compared with the log.
    pub compared: usize,
    /// Heads not compared because their signature does not verify with
    /// the keeper's certificate (forged, or a key since rotated).
    pub unverified: usize,
    /// Heads not compared because they were signed after the log was read.
    pub later: usize,
    /// The highest entry a compared head covers, and who holds that head.
    pub through: Option<(i64, String)>,
    /// Entries after it, which no witness has seen yet.
    pub unwitnessed_tail: usize,
}

/// Compares `entries`, already verified as `verdict`, with `witnesses`.
/// Only heads signed before `signed_before` (unix milliseconds: when the
/// log was read or exported) count; without a `verifier` a head's claims are
/// read unchecked, as the log's own checkpoints then are. The first
/// problem by entry, the log's own or a witness's, is the verdict's.
pub fn compare(
    mut verdict: Verification,
    entries: &[Entry],
    witnesses: &[Witness],
    verifier: Option<&Verifier>,
    signed_before: Option<i64>,
) -> Verification {
    let mut summary = Witnessed::default();
    let mut problems: Vec<Broken> = Vec::new();
    let mut beyond: Option<&Witness> = None;
    for w in witnesses {
        let iat = match verifier {
            Some(v) => v.claims(&w.checkpoint).ok().map(|c| c.signed_ms()),
            None => peek(&w.checkpoint.token)
                .filter(|c| c.seq == w.checkpoint.seq && c.hash == w.checkpoint.hash)
                .map(|c| c.signed_ms()),
        };
        let Some(signed) = iat else {
            summary.unverified += 1;
            continue;
        };
        if signed_before.is_some_and(|t| signed >= t) {
            summary.later += 1;
            continue;
        }
        summary.compared += 1;
        let seq = w.checkpoint.seq;
        if summary.through.as_ref().is_none_or(|(s, _)| seq > *s) {
            summary.through = Some((seq, w.by.clone()));
        }
        match verdict.last_seq {
            Some(last) if seq > last => {
                if beyond.is_none_or(|b| seq > b.checkpoint.seq) {
                    beyond = Some(w);
                }
            }
            None if seq > 0 => {
                if beyond.is_none_or(|b| seq > b.checkpoint.seq) {
                    beyond = Some(w);
                }
            }
            // Within the log: the entry must be the one signed. Before its
            // first entry: expired, and the anchor's age decides
            // (`verify_retained`). In a gap: reported as missing already.
            _ => {
                if let Some(entry) = entries.iter().find(|e| e.seq == seq)
                    && entry.hash != w.checkpoint.hash
                {
                    problems.push(Broken {
                        seq,
                        problem: Problem::WitnessDiffers { by: w.by.clone() },
                    });
                }
            }
        }
    }
    if let Some(w) = beyond {
        problems.push(Broken {
            seq: verdict.last_seq.map_or(1, |last| last + 1),
            problem: Problem::EndsBeforeWitness {
                witnessed_through: w.checkpoint.seq,
                by: w.by.clone(),
            },
        });
    }
    summary.unwitnessed_tail = match &summary.through {
        Some((s, _)) => entries.iter().filter(|e| e.seq > *s).count(),
        None => entries.len(),
    };
    problems.sort_by_key(|b| b.seq);
    if let Some(first) = problems.into_iter().next()
        && verdict.broken.as_ref().is_none_or(|b| first.seq < b.seq)
    {
        verdict.broken = Some(first);
    }
    verdict.witnessed = Some(summary);
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Signer;
    use crate::verify::tests::log;
    use crate::verify::{chain_all, verify};
    use crate::{Entry, GENESIS};

    fn keeper(name: &str) -> (Signer, Verifier) {
        let (key, cert) = crate::checkpoint::tests::keeper_cert(name);
        (
            Signer::from_pem(name, &key).unwrap(),
            Verifier::from_certificate_pem(&cert).unwrap(),
        )
    }

    fn head(signer: &Signer, entries: &[Entry], seq: i64) -> Witness {
        let e = &entries[usize::try_from(seq - 1).unwrap()];
        Witness {
            by: "coordinator".into(),
            checkpoint: signer.sign(seq, &e.hash).unwrap(),
        }
    }

    fn check(entries: &[Entry], witnesses: &[Witness], v: &Verifier) -> Verification {
        compare(
            verify(entries, &[], Some(v)),
            entries,
            witnesses,
            Some(v),
            None,
        )
    }

    #[test]
    fn a_deleted_tail_ends_before_the_witnessed_head() {
        let (signer, verifier) = keeper("chosun");
        let original = log(6);
        let witnesses = [head(&signer, &original, 3), head(&signer, &original, 5)];
        let whole = check(&original, &witnesses, &verifier);
        assert!(whole.is_intact(), "{:?}", whole.broken);
        let seen = whole.witnessed.unwrap();
        assert_eq!(
            (seen.compared, seen.through, seen.unwitnessed_tail),
            (2, Some((5, "coordinator".to_owned())), 1)
        );

        // Cut after 2: alone it verifies; against the witness it does not.
        assert!(verify(&original[..2], &[], Some(&verifier)).is_intact());
        assert_eq!(
            check(&original[..2], &witnesses, &verifier).broken,
            Some(Broken {
                seq: 3,
                problem: Problem::EndsBeforeWitness {
                    witnessed_through: 5,
                    by: "coordinator".into()
                }
            })
        );
        assert_eq!(
            check(&[], &witnesses, &verifier).broken.map(|b| b.seq),
            Some(1)
        );
    }

    #[test]
    fn a_rechained_tail_differs_from_the_witnessed_head() {
        let (signer, verifier) = keeper("chosun");
        let original = log(6);
        let witnesses = [head(&signer, &original, 5)];
        let mut rewritten = original.clone();
        rewritten[3].decision = "refused".into();
        chain_all(&mut rewritten, 1, GENESIS);
        assert!(verify(&rewritten, &[], Some(&verifier)).is_intact());
        assert_eq!(
            check(&rewritten, &witnesses, &verifier).broken,
            Some(Broken {
                seq: 5,
                problem: Problem::WitnessDiffers {
                    by: "coordinator".into()
                }
            })
        );
    }

    #[test]
    fn heads_that_do_not_verify_or_came_later_are_skipped_not_broken() {
        let (signer, verifier) = keeper("chosun");
        let (impostor, _) = keeper("chosun");
        let original = log(4);
        // Signed by another key, over a seq the log lacks.
        let forged = Witness {
            by: "coordinator".into(),
            checkpoint: impostor.sign(9, &"a".repeat(64)).unwrap(),
        };
        let v = check(&original, std::slice::from_ref(&forged), &verifier);
        assert!(v.is_intact(), "{:?}", v.broken);
        assert_eq!(v.witnessed.as_ref().map(|w| w.unverified), Some(1));

        // A genuine head signed after the log was read does not count.
        let later = head(&signer, &original, 4);
        let before = crate::checkpoint::peek(&later.checkpoint.token)
            .unwrap()
            .signed_ms();
        let v = compare(
            verify(&original[..3], &[], Some(&verifier)),
            &original[..3],
            std::slice::from_ref(&later),
            Some(&verifier),
            Some(before),
        );
        assert!(v.is_intact(), "{:?}", v.broken);
        assert_eq!(v.witnessed.as_ref().map(|w| w.later), Some(1));
        let v = compare(
            verify(&original[..3], &[], Some(&verifier)),
            &original[..3],
            &[later],
            Some(&verifier),
            Some(before + 1),
        );
        assert_eq!(v.broken.map(|b| b.seq), Some(4));
    }
}

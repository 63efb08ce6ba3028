//! Differencing detection: a requester who learns the counts of two cohorts
//! that differ by a handful of patients learns about those patients. So a
//! cohort whose membership differs from one already released to the same
//! organisation by at least one but fewer than the minimum cell size patients
//! is refused, whatever the queries' grouping.
//!
//! Cohorts are kept as sorted 64-bit hashes of patient ids (never the ids,
//! and never outside the node), and only earlier cohorts whose size is
//! within the threshold are compared, since the symmetric difference of two
//! sets is at least the difference of their sizes. An identical cohort is
//! allowed: it reveals nothing new. Each distinct cohort is stored once per
//! organisation (by the digest of its print), so asking the same query again
//! does not make later checks read more.
//!
//! Whole cohorts are one check; [`cells`] compares every set of patients an
//! exact table releases numbers of, and [`bounds`] fixes each variable's
//! clip range and bins, so that one cohort analysed two ways singles no
//! one out either.

pub(crate) mod bounds;
pub(crate) mod cells;

use crate::classify::{Classify, Code};
use sha2::{Digest, Sha256};

use crate::store::{self, Store};

/// A cohort too close to one already released.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message says that a comparison refused it, never by how much
    /// the cohorts differ: a distance would tell the requester how many
    /// patients the difference singles out.
    #[error(
        "refused by differencing control: set beside what was already released to {organisation}, this release could single out patients"
    )]
    TooClose { organisation: String },
    /// An exact analysis of a variable under other bounds than the ones
    /// fixed for the organisation: the bounds are the query's, not data.
    #[error(
        "refused: exact {analysis} of {variable} released to {organisation} use {fixed}; ask with the same (two {what} of one variable give, by difference, what the patients between them hold)"
    )]
    BoundsFixed {
        analysis: &'static str,
        what: &'static str,
        variable: String,
        organisation: String,
        fixed: String,
    },
    #[error(
        "refused: exact summaries and histograms of a view column are not released (a view computes its column, so no clip range bounds it); ask with noise"
    )]
    ExactView,
    /// A record of what was released does not read back: nothing more is
    /// released until it is looked at.
    #[error(
        "a differencing record of this node does not read back; nothing is released until it is repaired"
    )]
    CorruptRecord,
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::TooClose { .. } | Error::BoundsFixed { .. } | Error::ExactView => {
                Code::PermissionDenied
            }
            Error::CorruptRecord | Error::Store(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::TooClose { .. } => "differencing",
            Error::BoundsFixed { .. } | Error::ExactView => "bounds",
            Error::CorruptRecord | Error::Store(_) => "internal",
        }
    }
}

/// A cohort in the form it is compared and stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortPrint(Vec<u64>);

/// A patient's 64-bit hash in cohort prints: the first eight bytes of the
/// SHA-256 of its id. Consent decisions store it per patient
/// ([`crate::store::Member::print`]), so a query does not hash ids.
pub fn patient_hash(patient_id: &str) -> u64 {
    let digest = Sha256::digest(patient_id.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl CohortPrint {
    pub fn of(patient_ids: &[String]) -> Self {
        Self::of_hashes(patient_ids.iter().map(|id| patient_hash(id)).collect())
    }

    /// The print of a cohort whose members' hashes ([`patient_hash`]) are
    /// known.
    pub fn of_hashes(mut hashes: Vec<u64>) -> Self {
        hashes.sort_unstable();
        hashes.dedup();
        CohortPrint(hashes)
    }

    /// The print of cohort members as the engine returns them.
    pub fn of_members(members: &[crate::store::Member]) -> Self {
        // Stored as the same 64 bits in a signed column.
        Self::of_hashes(members.iter().map(|m| m.print as u64).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|h| h.to_le_bytes()).collect()
    }

    /// The digest under which the print is stored: equal prints, equal
    /// digests.
    fn digest(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        CohortPrint(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    }

    /// The members of `self` not in `other`.
    pub fn minus(&self, other: &CohortPrint) -> CohortPrint {
        let (a, b) = (&self.0, &other.0);
        let mut out = Vec::with_capacity(a.len());
        let mut j = 0;
        for x in a {
            while j < b.len() && b[j] < *x {
                j += 1;
            }
            if j >= b.len() || b[j] != *x {
                out.push(*x);
            }
        }
        CohortPrint(out)
    }

    /// Whether `other` differs from this print by 1 to `threshold - 1`
    /// patients: what differencing refuses.
    pub fn close_to(&self, other: &CohortPrint, threshold: u32) -> bool {
        let d = self.difference(other, threshold as usize);
        d > 0 && d < threshold as usize
    }

    /// The print as it is stored: its size, its bytes and their digest.
    fn stored(&self) -> (i64, Vec<u8>, String) {
        let bytes = self.to_bytes();
        let digest = Self::digest(&bytes);
        (i64::try_from(self.len()).unwrap_or(i64::MAX), bytes, digest)
    }

    /// Size of the symmetric difference, counting no further than `limit`.
    pub fn difference(&self, other: &CohortPrint, limit: usize) -> usize {
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j, mut d) = (0, 0, 0);
        while i < a.len() && j < b.len() && d < limit {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    d += 1;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    d += 1;
                    j += 1;
                }
            }
        }
        (d + (a.len() - i) + (b.len() - j)).min(limit.max(d))
    }
}

/// Refuses `cohort` if it differs from a cohort already released to
/// `organisation` by 1 to `threshold - 1` patients.
pub fn check(
    store: &Store,
    organisation: &str,
    cohort: &CohortPrint,
    threshold: u32,
) -> Result<(), Error> {
    let radius = i64::from(threshold);
    let size = i64::try_from(cohort.len()).unwrap_or(i64::MAX);
    let digest = CohortPrint::digest(&cohort.to_bytes());
    for earlier in store.cohorts_near(organisation, size, radius, &digest)? {
        if cohort.close_to(&CohortPrint::from_bytes(&earlier), threshold) {
            return Err(Error::TooClose {
                organisation: organisation.to_owned(),
            });
        }
    }
    Ok(())
}

/// Records a cohort whose aggregates were released.
pub fn record(
    store: &Store,
    organisation: &str,
    study_id: &str,
    query_sha256: &str,
    cohort: &CohortPrint,
) -> Result<(), Error> {
    let (size, bytes, digest) = cohort.stored();
    store.record_cohort(organisation, study_id, query_sha256, size, &bytes, &digest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("p{i}")).collect()
    }

    #[test]
    fn symmetric_difference_counts_both_sides_and_stops_at_the_limit() {
        let a = CohortPrint::of(&ids(0..100));
        let b = CohortPrint::of(&ids(3..102));
        assert_eq!(a.difference(&b, 1000), 5);
        assert_eq!(b.difference(&a, 1000), 5);
        assert_eq!(a.difference(&a, 1000), 0);
        assert!(a.difference(&CohortPrint::of(&ids(500..600)), 10) >= 10);
        let round_trip = CohortPrint::from_bytes(&a.to_bytes());
        assert_eq!(round_trip, a);
    }

    proptest::proptest! {
        #[test]
        fn difference_matches_a_set_computation(
            xs in proptest::collection::btree_set(0u32..200, 0..80),
            ys in proptest::collection::btree_set(0u32..200, 0..80),
        ) {
            let name = |v: &std::collections::BTreeSet<u32>| v.iter().map(|i| format!("p{i}")).collect::<Vec<_>>();
            let expected = xs.symmetric_difference(&ys).count();
            let got = CohortPrint::of(&name(&xs)).difference(&CohortPrint::of(&name(&ys)), 1000);
            proptest::prop_assert_eq!(got, expected);
            let minus = CohortPrint::of(&name(&xs)).minus(&CohortPrint::of(&name(&ys)));
            let only: std::collections::BTreeSet<u32> = xs.difference(&ys).copied().collect();
            proptest::prop_assert_eq!(minus, CohortPrint::of(&name(&only)));
        }
    }
}

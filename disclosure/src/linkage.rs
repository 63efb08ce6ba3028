//! Counting each patient once across hospitals: linkage tokens, per-query
//! slots, and the union of the hospitals' bitmaps read by linear counting.
//!
//! At import a node keeps, for a patient whose resident registration number
//! (RRN) it was sent, only `HMAC-SHA256(link key, RRN)` ([`LinkKey::token`]):
//! the key is shared by the hospitals and never given to the coordinator.
//! For one pooled query the nodes derive a query key from it and the
//! session ([`QueryKey::derive`]) and place each patient of a cell at slot
//! `HMAC(query key, token) mod m` of that cell's bitmap, a fresh random
//! non-zero 64-bit number there. The bitmaps are summed under secure
//! aggregation: a slot is non-zero when any hospital put a patient there
//! (a sum of random numbers is zero with chance 2^-64), and its value says
//! nothing of how many did. The coordinator counts the occupied slots and
//! estimates the union (Whang, Vander-Zanden & Taylor 1990: `-m ln(V/m)`
//! for `V` empty slots; standard error `sqrt(m (e^t - t - 1))` patients at
//! load `t`, [`standard_error`]). Slots move with every query key, so what
//! the coordinator sees of one query cannot be matched to another's.
//!
//! Noise: each node also occupies a number of random slots (phantoms)
//! drawn as `shift + Z`, `Z` its discrete Gaussian share, so the occupied
//! count carries the calibrated noise before the coordinator reads it; the
//! coordinator subtracts the known shifts. Patients without a token are
//! placed by a slot of the hospital's own (counted once per hospital that
//! has them) and counted apart, that count noised like any other.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Phantoms a node adds to a bitmap beyond its noise draw, in units of the
/// draw's scale: a draw below minus this many scales (chance under 1e-15)
/// is cut at zero phantoms.
pub const PHANTOM_SHIFT_SCALES: f64 = 8.0;

/// Why a link key could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("a link key file holds 64 hexadecimal characters (32 bytes); {0}")]
    Format(String),
}

/// The federation's link key, shared by the hospitals and never by the
/// coordinator.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkKey({})", self.fingerprint())
    }
}

impl LinkKey {
    /// The key from a file's text: 64 hexadecimal characters.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(Error::Format(format!(
                "this one has {} characters",
                text.len()
            )));
        }
        let bytes = hex::decode(text).map_err(|_| {
            Error::Format("this one has a character that is not hexadecimal".into())
        })?;
        Ok(LinkKey(
            bytes.try_into().expect("64 hex characters are 32 bytes"),
        ))
    }

    /// A fresh random key, as a file's text.
    pub fn generate() -> String {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        hex::encode(bytes)
    }

    /// A patient's linkage token: the keyed hash of their RRN's 13 digits,
    /// after the key's fingerprint (so tokens of a rotated key are told
    /// apart, [`LinkKey::made`]).
    pub fn token(&self, rrn_digits: &str) -> String {
        format!(
            "{}:{}",
            self.fingerprint(),
            hex::encode(self.mac(&[b"ghx link token v1\0", rrn_digits.as_bytes()]))
        )
    }

    /// Whether `token` was made under this key (tokens of another key
    /// would match no other hospital's, so they are not used).
    pub fn made(&self, token: &str) -> bool {
        token
            .split_once(':')
            .is_some_and(|(fingerprint, _)| fingerprint == self.fingerprint())
    }

    /// Names the key without revealing it (in logs and configuration
    /// checks): the first 8 bytes of a keyed hash of a fixed label.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.mac(&[b"ghx link key fingerprint v1"])[..8])
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

/// The key of one query's slots: the link key expanded with the session,
/// the capability and the query, so that every query places every patient
/// elsewhere.
pub struct QueryKey([u8; 32]);

impl QueryKey {
    /// The key for one pooled session: its name, the capability (its
    /// token's digest: single-use at every node and carrying its expiry,
    /// so no key is derived twice by a node, whatever session name the
    /// coordinator sends) and the query's digest.
    pub fn derive(link: &LinkKey, session: &str, capability: &str, query_sha256: &str) -> Self {
        // Each part with its length: no two different triples give one salt.
        let mut salt = Vec::new();
        for part in [session, capability, query_sha256] {
            salt.extend_from_slice(&(part.len() as u64).to_le_bytes());
            salt.extend_from_slice(part.as_bytes());
        }
        let hk = Hkdf::<Sha256>::new(Some(&salt), &link.0);
        let mut okm = [0u8; 32];
        hk.expand(b"ghx linkage slots v1", &mut okm)
            .expect("32 bytes is a valid HKDF length");
        QueryKey(okm)
    }

    /// Where a linked patient goes in bitmap `bitmap` of the table: 64
    /// bits of `HMAC(query key, bitmap, token)`. Each bitmap places
    /// patients anew, so the bitmaps of one table cannot be laid over each
    /// other (a rate's events are its population's: with one placement,
    /// event slots outside the population bitmap would be phantoms).
    pub fn linked(&self, token: &str, bitmap: usize) -> u64 {
        self.hash(&[
            b"linked\0",
            &(bitmap as u64).to_le_bytes(),
            token.as_bytes(),
        ])
    }

    /// Where a patient without a token goes in bitmap `bitmap`: a slot of
    /// `node`'s own, so that they count once per hospital that has them.
    pub fn local(&self, node: &str, patient: i64, bitmap: usize) -> u64 {
        self.hash(&[
            b"local\0",
            &(bitmap as u64).to_le_bytes(),
            node.as_bytes(),
            b"\0",
            &patient.to_le_bytes(),
        ])
    }

    /// What every node binds its masks to, so that nodes holding different
    /// link keys produce a sum that does not cancel (and is refused as
    /// saturated) rather than a wrong count.
    pub fn check(&self) -> String {
        hex::encode(&self.mac(&[b"check"])[..16])
    }

    fn hash(&self, parts: &[&[u8]]) -> u64 {
        let d = self.mac(parts);
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

/// Sets `slots`' entry of `bitmap` for each hash (its low bits) to a random
/// non-zero number, once per slot.
pub(crate) fn occupy(bitmap: &mut [i64], hashes: impl IntoIterator<Item = u64>) {
    let mask = bitmap.len() as u64 - 1;
    let mut rng = rand::thread_rng();
    for h in hashes {
        let slot = &mut bitmap[(h & mask) as usize];
        if *slot == 0 {
            *slot = nonzero(&mut rng);
        }
    }
}

/// Adds `n` phantoms at uniformly random slots of `bitmap` (as random
/// non-zero numbers, so a phantom on an occupied slot leaves it occupied).
pub(crate) fn phantoms(bitmap: &mut [i64], n: u64) {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..n {
        let at = rng.gen_range(0..bitmap.len());
        bitmap[at] = bitmap[at].wrapping_add(nonzero(&mut rng));
    }
}

fn nonzero(rng: &mut impl rand::Rng) -> i64 {
    loop {
        let v: i64 = rng.r#gen();
        if v != 0 {
            return v;
        }
    }
}

/// The union a summed bitmap shows: linear counting over its occupied
/// slots; `None` when every slot is occupied (the estimate is unbounded:
/// too few slots, or sums that did not cancel).
pub fn union_estimate(bitmap: &[i64]) -> Option<f64> {
    let m = bitmap.len() as f64;
    let empty = bitmap.iter().filter(|v| **v == 0).count() as f64;
    (empty > 0.0).then(|| -m * (empty / m).ln())
}

/// Linear counting's standard error, in patients, for an estimate of `n`
/// over `m` slots (Whang et al. 1990): `sqrt(m (e^t - t - 1))`, `t = n/m`.
pub fn standard_error(n: f64, m: usize) -> f64 {
    let m = m as f64;
    let t = n / m;
    (m * (t.exp() - t - 1.0)).max(0.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LinkKey {
        LinkKey::parse(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn keys_parse_from_hex_and_name_the_problem_otherwise() {
        assert!(LinkKey::parse(&format!("{}\n", "0f".repeat(32))).is_ok());
        let short = LinkKey::parse("abcd").unwrap_err().to_string();
        assert!(short.contains("4 characters"), "{short}");
        let odd = LinkKey::parse(&"zz".repeat(32)).unwrap_err().to_string();
        assert!(odd.contains("not hexadecimal"), "{odd}");
        assert_eq!(LinkKey::parse(&LinkKey::generate()).map(|_| ()), Ok(()));
        // The debug form never shows the key.
        assert!(!format!("{:?}", key()).contains("abab"));
    }

    #[test]
    fn slots_depend_on_the_key_and_the_session() {
        let token = key().token("9001011234568");
        assert_eq!(token, key().token("9001011234568"));
        let other = LinkKey::parse(&"cd".repeat(32)).unwrap();
        assert_ne!(token, other.token("9001011234568"));
        assert!(key().made(&token) && !other.made(&token));
        let derive = |k: &LinkKey, session: &str, jti: &str| QueryKey::derive(k, session, jti, "q");
        let a = derive(&key(), "s/q/pooled/1", "j1");
        assert_eq!(
            a.linked(&token, 0),
            derive(&key(), "s/q/pooled/1", "j1").linked(&token, 0)
        );
        // Another session, another capability, another bitmap: elsewhere.
        assert_ne!(
            a.linked(&token, 0),
            derive(&key(), "s/q/pooled/2", "j1").linked(&token, 0)
        );
        assert_ne!(
            a.linked(&token, 0),
            derive(&key(), "s/q/pooled/1", "j2").linked(&token, 0)
        );
        assert_ne!(a.linked(&token, 0), a.linked(&token, 1));
        assert_ne!(a.local("chonnam", 7, 0), a.local("chosun", 7, 0));
        assert_ne!(a.check(), derive(&other, "s/q/pooled/1", "j1").check());
    }

    #[test]
    fn the_union_of_overlapping_bitmaps_is_estimated_within_its_error() {
        let q = QueryKey::derive(&key(), "s", "j", "q");
        let m = 4096;
        // 3,000 residents; hospital h has those with i % 3 != h or i < 600:
        // overlaps of two and three hospitals.
        let tokens: Vec<String> = (0..3000)
            .map(|i| key().token(&format!("{i:013}")))
            .collect();
        let mut sum = vec![0i64; m];
        for h in 0..3 {
            let mut bitmap = vec![0i64; m];
            occupy(
                &mut bitmap,
                tokens
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 3 != h || *i < 600)
                    .map(|(_, t)| q.linked(t, 0)),
            );
            for (s, b) in sum.iter_mut().zip(bitmap) {
                *s = s.wrapping_add(b);
            }
        }
        let estimate = union_estimate(&sum).unwrap();
        let se = standard_error(estimate, m);
        assert!((estimate - 3000.0).abs() < 4.0 * se, "{estimate} ± {se}");
        // Phantoms add about their number.
        let mut noisy = sum.clone();
        phantoms(&mut noisy, 500);
        let more = union_estimate(&noisy).unwrap() - estimate;
        assert!(
            (more - 500.0).abs() < 4.0 * standard_error(3500.0, m),
            "{more}"
        );
        // Every slot occupied: no estimate.
        assert_eq!(union_estimate(&[1, -3, 5, 9]), None);
    }
}

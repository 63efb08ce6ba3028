//! Discrete noise for counts: the two-sided geometric mechanism, the
//! discrete Laplace (Ghosh, Roughgarden & Sundararajan 2009). Adding it to
//! each count of a vector whose L1 sensitivity is 1 makes the vector
//! epsilon-DP, with integer outputs (no floating-point Laplace weaknesses).

use rand::Rng;
use rand_distr::{Distribution, Geometric};

/// Noise `k` with `P(k)` proportional to `exp(-epsilon |k|)`: the
/// difference of two geometric draws of success probability
/// `1 - exp(-epsilon)`.
///
/// # Panics
/// Unless `1 - exp(-epsilon)` is strictly between 0 and 1 in floating
/// point (an epsilon far below 1e-10 rounds it to 0, whose draws would all
/// be equal: no noise at all); callers validate epsilon well above that.
pub fn two_sided_geometric(epsilon: f64, rng: &mut impl Rng) -> i64 {
    let p = -(-epsilon).exp_m1();
    assert!(
        p > 1e-9 && p < 1.0,
        "epsilon {epsilon} is outside what discrete noise can be drawn at"
    );
    let g = Geometric::new(p).expect("0 < p < 1");
    g.sample(rng) as i64 - g.sample(rng) as i64
}

/// The variance of [`two_sided_geometric`] at `epsilon`: `2a / (1 - a)^2`
/// with `a = exp(-epsilon)`.
pub fn two_sided_geometric_variance(epsilon: f64) -> f64 {
    let a = (-epsilon).exp();
    2.0 * a / ((1.0 - a) * (1.0 - a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_noise_is_centred_with_the_stated_variance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for epsilon in [0.25, 1.0] {
            let n = 200_000;
            let draws: Vec<f64> = (0..n)
                .map(|_| two_sided_geometric(epsilon, &mut rng) as f64)
                .collect();
            let mean = draws.iter().sum::<f64>() / n as f64;
            let variance = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let expected = two_sided_geometric_variance(epsilon);
            assert!(mean.abs() < 0.05, "{epsilon}: mean {mean}");
            assert!(
                (variance / expected - 1.0).abs() < 0.03,
                "{epsilon}: variance {variance} vs {expected}"
            );
            // P(0) / P(1) = exp(epsilon).
            let zeros = draws.iter().filter(|x| **x == 0.0).count() as f64;
            let ones = draws.iter().filter(|x| **x == 1.0).count() as f64;
            assert!(((zeros / ones).ln() - epsilon).abs() < 0.05, "{epsilon}");
        }
        // A vanishing epsilon is refused rather than drawn as no noise.
        let tiny = std::panic::catch_unwind(|| {
            two_sided_geometric(1e-20, &mut rand::rngs::StdRng::seed_from_u64(1))
        });
        assert!(tiny.is_err());
        // sd 5.6 per node at 0.25: the figure LINEAGE.md pools.
        assert!((two_sided_geometric_variance(0.25).sqrt() - 5.64).abs() < 0.01);
    }
}

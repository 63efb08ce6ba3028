//! Calibrated noise for differential privacy, added to raw cells before
//! disclosure control sees them (so suppression decides on noisy values and
//! is post-processing).
//!
//! Every patient is in exactly one cell of a query (the cells partition the
//! cohort), so each cell can spend the whole epsilon (parallel composition);
//! inside a cell the epsilon is split evenly between the numbers released:
//! one for a count, two for a rate (events, population), three for a summary
//! (n, sum, sum of squares of the clipped values). Counts get discrete noise
//! (two-sided geometric for Laplace; rounded Gaussian), which avoids the
//! floating-point weaknesses of continuous Laplace on integers.

use ghx_study::query::{Analysis, Mechanism, Noise, QuerySpec};
use ghx_study::result::{Moments, NoiseStatement, RateCounts};
use rand::Rng;
use rand_distr::{Distribution, Exp1, StandardNormal};

use crate::engine::{Raw, RawCell};
use crate::release::Candidate;

/// Noise of one mechanism at one privacy level for numbers of a given
/// sensitivity.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    mechanism: Mechanism,
    epsilon: f64,
    delta: f64,
}

impl Calibration {
    /// The noise scale for a number of sensitivity `sensitivity`: Laplace
    /// `b = Δ/ε`; Gaussian `σ = Δ·sqrt(2 ln(1.25/δ))/ε` (valid for ε < 1).
    fn scale(&self, sensitivity: f64) -> f64 {
        match self.mechanism {
            Mechanism::Laplace => sensitivity / self.epsilon,
            Mechanism::Gaussian => {
                sensitivity * (2.0 * (1.25 / self.delta).ln()).sqrt() / self.epsilon
            }
        }
    }

    /// A noisy count (sensitivity 1), never below zero.
    fn count(&self, n: u64, rng: &mut impl Rng) -> u64 {
        let noise = match self.mechanism {
            // Two-sided geometric: P(k) ∝ exp(-ε|k|).
            Mechanism::Laplace => ghx_learn::noise::two_sided_geometric(self.epsilon, rng),
            Mechanism::Gaussian => {
                let z: f64 = StandardNormal.sample(rng);
                (z * self.scale(1.0)).round() as i64
            }
        };
        (n as i64).saturating_add(noise).max(0) as u64
    }

    /// A noisy real number of sensitivity `sensitivity`.
    fn real(&self, x: f64, sensitivity: f64, rng: &mut impl Rng) -> f64 {
        let scale = self.scale(sensitivity);
        match self.mechanism {
            Mechanism::Laplace => {
                let a: f64 = Exp1.sample(rng);
                let b: f64 = Exp1.sample(rng);
                x + scale * (a - b)
            }
            Mechanism::Gaussian => {
                let z: f64 = StandardNormal.sample(rng);
                x + scale * z
            }
        }
    }

    fn split(&self, parts: u32) -> Calibration {
        Calibration {
            mechanism: self.mechanism,
            epsilon: self.epsilon / f64::from(parts),
            delta: self.delta / f64::from(parts),
        }
    }
}

/// Perturbs every raw cell of a query and says how.
pub(crate) fn perturb(
    spec: &QuerySpec,
    noise: &Noise,
    raw: &[RawCell],
    rng: &mut impl Rng,
) -> (Vec<Candidate>, NoiseStatement) {
    let whole = Calibration {
        mechanism: noise.mechanism,
        epsilon: noise.epsilon,
        delta: noise.delta,
    };
    let describe = |what: &str, c: &Calibration, sensitivity: f64| match c.mechanism {
        Mechanism::Laplace => format!(
            "{what}: sensitivity {sensitivity}, epsilon {:.4}, Laplace scale {:.4}",
            c.epsilon,
            c.scale(sensitivity)
        ),
        Mechanism::Gaussian => format!(
            "{what}: sensitivity {sensitivity}, epsilon {:.4}, delta {:.2e}, Gaussian sigma {:.4}",
            c.epsilon,
            c.delta,
            c.scale(sensitivity)
        ),
    };
    let (candidates, parts): (Vec<Candidate>, Vec<String>) = match &spec.analysis {
        Analysis::Count { .. } | Analysis::Histogram { .. } => (
            raw.iter()
                .map(|c| Candidate::Count(whole.count(c.value.patients(), rng)))
                .collect(),
            vec![describe("each count", &whole, 1.0)],
        ),
        Analysis::Rate { .. } => {
            let half = whole.split(2);
            (
                raw.iter()
                    .map(|c| {
                        let Raw::Rate { events, population } = c.value else {
                            unreachable!("a rate analysis yields rate cells")
                        };
                        let population = half.count(population, rng);
                        let events = half.count(events, rng).min(population);
                        Candidate::Rate(RateCounts { events, population })
                    })
                    .collect(),
                vec![describe("events and population of each cell", &half, 1.0)],
            )
        }
        Analysis::Summary { clip, .. } => {
            let clip = clip.expect("validation requires a clip range with noise");
            let bound = clip.min.abs().max(clip.max.abs());
            let third = whole.split(3);
            (
                raw.iter()
                    .map(|c| {
                        let Raw::Values(values) = &c.value else {
                            unreachable!("a summary analysis yields value cells")
                        };
                        let n = third.count(values.len() as u64, rng);
                        let sum = third.real(values.iter().sum(), bound, rng);
                        let sum_sq =
                            third.real(values.iter().map(|v| v * v).sum(), bound * bound, rng);
                        Candidate::Summary(
                            if n == 0 {
                                Moments::EMPTY
                            } else {
                                let mean = (sum / n as f64).clamp(clip.min, clip.max);
                                Moments {
                                    n,
                                    mean,
                                    m2: (sum_sq - n as f64 * mean * mean).max(0.0),
                                    min: None,
                                    max: None,
                                }
                            },
                            None,
                        )
                    })
                    .collect(),
                vec![
                    describe("n", &third, 1.0),
                    describe(
                        &format!("sum of values clipped to [{}, {}]", clip.min, clip.max),
                        &third,
                        bound,
                    ),
                    describe("sum of squares", &third, bound * bound),
                ],
            )
        }
    };
    let statement = NoiseStatement {
        mechanism: noise.mechanism.name().to_owned(),
        epsilon: noise.epsilon,
        delta: noise.delta,
        detail: format!(
            "every cell of the full table (empty ones too) is noised; each patient is in one cell; {}",
            parts.join("; ")
        ),
    };
    (candidates, statement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn calibration(mechanism: Mechanism, epsilon: f64, delta: f64) -> Calibration {
        Calibration {
            mechanism,
            epsilon,
            delta,
        }
    }

    /// The empirical variance of noisy counts matches the mechanism's: a
    /// wrong scale (say epsilon used as the scale) would be far off.
    #[test]
    fn count_noise_has_the_calibrated_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples = 40_000;
        for (c, expected_variance) in [
            // Two-sided geometric: 2a / (1 - a)^2 with a = exp(-epsilon).
            (calibration(Mechanism::Laplace, 0.5, 0.0), {
                let a = (-0.5f64).exp();
                2.0 * a / (1.0 - a).powi(2)
            }),
            (calibration(Mechanism::Gaussian, 0.5, 1e-5), {
                let s = (2.0 * (1.25f64 / 1e-5).ln()).sqrt() / 0.5;
                s * s + 1.0 / 12.0
            }),
        ] {
            let xs: Vec<f64> = (0..samples)
                .map(|_| c.count(1_000_000, &mut rng) as f64 - 1_000_000.0)
                .collect();
            let mean = xs.iter().sum::<f64>() / samples as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / samples as f64;
            assert!(mean.abs() < 0.1 * expected_variance.sqrt(), "{mean}");
            assert!(
                (var / expected_variance - 1.0).abs() < 0.05,
                "{:?}: variance {var}, expected {expected_variance}",
                c.mechanism
            );
        }
    }

    #[test]
    fn real_noise_scales_with_sensitivity_over_epsilon() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let c = calibration(Mechanism::Laplace, 0.25, 0.0);
        let samples = 40_000;
        let xs: Vec<f64> = (0..samples).map(|_| c.real(0.0, 10.0, &mut rng)).collect();
        let var = xs.iter().map(|x| x * x).sum::<f64>() / samples as f64;
        // Laplace(b) has variance 2b^2, b = 10 / 0.25 = 40.
        assert!((var / 3200.0 - 1.0).abs() < 0.05, "{var}");
        // Negative noisy counts are clamped to zero: an empty cell is zero
        // at least half the time, and otherwise small.
        let zeros = (0..1000).filter(|_| c.count(0, &mut rng) == 0).count();
        assert!((500..700).contains(&zeros), "{zeros}");
    }
}

//! What one node contributes to a federated training or evaluation round,
//! and how the coordinator reads the federation's sum.
//!
//! Every vector here is a sum over a node's patients, laid out the same way
//! at every node, so it can be summed by secure aggregation and read back
//! only as the federation's total:
//!
//! - a *moments* round: [`Standardiser::local_sums`] of the training rows;
//! - a *training* round: the locally trained model weighted by its training
//!   rows ([`Model::weighted`]), and nothing else;
//! - an *evaluation* round: [`EvaluationSums`] alone.
//!
//! A training round carries no loss and no evaluation of the model it
//! starts from. That model is the coordinator's to choose, and a loss sums
//! a term per patient whose weight the model sets: one scoring everyone
//! 0.5 but a single patient 0.99 makes every other term log 2 whatever the
//! label, so the summed loss gives that patient's label. An evaluation is
//! a round of its own, which nodes count per study and release under the
//! cell size ([`EvaluationSums::disclosed`], `crate::evaluation`).

use rand::Rng;

pub use crate::evaluation::{CALIBRATION_BINS, EvaluationSums, Metrics, SCORE_BINS};
use crate::{Dataset, Error, Model, Standardiser, TrainConfig};

/// What a round sums: the wire names a phase by [`Phase::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Feature moments, for standardisation.
    Moments,
    /// A local training step from the global model.
    Train,
    /// The evaluation of a model on held-out rows.
    Evaluate,
}

impl Phase {
    /// The phase named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "moments" => Some(Phase::Moments),
            "train" => Some(Phase::Train),
            "evaluate" => Some(Phase::Evaluate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Moments => "moments",
            Phase::Train => "train",
            Phase::Evaluate => "evaluate",
        }
    }

    /// Length of the summed vector for `dim` features and a model of
    /// `params` parameters ([`Model::param_count`]).
    pub fn len(self, dim: usize, params: usize) -> usize {
        match self {
            Phase::Moments => 1 + 2 * dim,
            Phase::Train => training_len(params),
            Phase::Evaluate => EvaluationSums::LEN,
        }
    }
}

/// Length of every round of a run's session when the moments are its
/// round 0 (`learn/LINEAGE.md` 2.2): the longer of the moments and the
/// training vectors, so one session's masks serve both.
pub fn session_len(dim: usize, params: usize) -> usize {
    Phase::Moments
        .len(dim, params)
        .max(Phase::Train.len(dim, params))
}

/// `values` padded with zeros to `len` (a phase's vector in a session of
/// [`session_len`]); a phase's sum is read back from its first
/// [`Phase::len`] values.
pub fn padded(values: &[f64], len: usize) -> Vec<f64> {
    let mut out = values.to_vec();
    out.resize(len.max(values.len()), 0.0);
    out
}

/// What a node sends in a moments round.
pub fn moments_contribution(train: &Dataset) -> Vec<f64> {
    Standardiser::local_sums(train)
}

/// Length of a training round's vector for a model of `params`
/// parameters: the parameters, then the row count.
pub fn training_len(params: usize) -> usize {
    params + 1
}

/// What a node sends in a training round: trains from `global` on its
/// (standardised) training rows and weights the result by their number.
pub fn training_contribution(
    global: &Model,
    train: &Dataset,
    config: &TrainConfig,
    rng: &mut impl Rng,
) -> Result<Vec<f64>, Error> {
    Ok(global.train(train, config, rng)?.weighted(train.len()))
}

/// What a node sends in a noised training round (DP-FedSGD, see
/// `ghx_study::training::TrainingPrivacy`): the sum over its training rows
/// of each row's log-loss gradient at `global` (in [`Model::params`]
/// order), clipped to L2 norm `clip`, and the row count, each with
/// Gaussian noise of standard deviation `noise_std`. Same layout as
/// [`training_contribution`]; read with [`read_private_training_sum`].
pub fn private_training_contribution(
    global: &Model,
    train: &Dataset,
    clip: f64,
    noise_std: f64,
    rng: &mut impl Rng,
) -> Result<Vec<f64>, Error> {
    let noise = rand_distr::Normal::new(0.0, noise_std).map_err(|_| Error::BadSetting {
        setting: "noise standard deviation",
        value: noise_std,
        expected: "expected a finite number, 0 or more",
    })?;
    let mut out = global.clipped_gradient_sum(train, clip)?;
    out.push(train.len() as f64);
    for v in &mut out {
        *v += rng.sample(noise);
    }
    Ok(out)
}

/// Reads the sum of every contributor's [`private_training_contribution`]:
/// one gradient step from `global` with the mean of the noisy gradient sum
/// over the noisy count, plus the L2 penalty's own (data-free) gradient.
pub fn read_private_training_sum(
    sum: &[f64],
    global: &Model,
    learning_rate: f64,
    l2: f64,
) -> Result<RoundTotals, Error> {
    let params = global.param_count();
    let gradient = checked_training_sum(sum, params)?;
    let train_rows = gradient[params];
    // A noisy count near zero would blow the step up: one row at least.
    let n = train_rows.max(1.0);
    let mean: Vec<f64> = gradient[..params].iter().map(|g| g / n).collect();
    Ok(RoundTotals {
        model: global.step(&mean, learning_rate, l2)?,
        train_rows,
    })
}

/// The federation's total of a training round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTotals {
    /// FedAvg (or FedProx) of the nodes' local models, or for a noised
    /// round the global model after one step with the summed gradients.
    pub model: Model,
    /// Training rows that took part.
    pub train_rows: f64,
}

/// Reads the sum of every contributor's [`training_contribution`] from
/// `global` (which gives the model's shape).
pub fn read_training_sum(sum: &[f64], global: &Model) -> Result<RoundTotals, Error> {
    let params = global.param_count();
    let weighted = checked_training_sum(sum, params)?;
    Ok(RoundTotals {
        model: global.average_of(weighted)?,
        train_rows: weighted[params],
    })
}

/// A training round's sum, in either layout, once its length is checked.
fn checked_training_sum(sum: &[f64], params: usize) -> Result<&[f64], Error> {
    if sum.len() != training_len(params) {
        return Err(Error::WrongSumLength {
            what: "a training round",
            got: sum.len(),
            dim: params,
        });
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_fits_both_phases_and_padding_reads_back() {
        // Logistic over 5 features: moments 11 values, training 7.
        assert_eq!(session_len(5, 6), 11);
        // An 8-unit MLP: training 58 values, moments 11.
        assert_eq!(session_len(5, 57), 58);
        let moments = vec![1.0; Phase::Moments.len(5, 57)];
        let padded = padded(&moments, session_len(5, 57));
        assert_eq!(padded.len(), 58);
        assert_eq!(&padded[..11], moments.as_slice());
        assert!(padded[11..].iter().all(|v| *v == 0.0));
    }
    use crate::evaluation::tests::data;

    #[test]
    fn private_rounds_clip_each_rows_gradient_and_step_from_the_global_model() {
        // At the zero model every prediction is 0.5. Row 1 (label 0) has
        // gradient 0.5 * (3, 4, 1), norm 0.5 * sqrt(26) > 1: scaled to
        // norm 1. Row 2 (label 1) has -0.5 * (0.1, 0, 1), norm
        // 0.5 * sqrt(1.01) < 1: kept.
        let a = data(&[(&[3.0, 4.0], false), (&[0.1, 0.0], true)]);
        let global = Model::zeros(2);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let v = private_training_contribution(&global, &a, 1.0, 0.0, &mut rng).unwrap();
        assert_eq!(v.len(), training_len(3));
        let k = 1.0 / 26f64.sqrt();
        let expected = [3.0 * k - 0.05, 4.0 * k, k - 0.5, 2.0];
        for (got, want) in v.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{v:?}");
        }
        // The coordinator's step: w - lr * (g / n + l2 * w).
        let totals = read_private_training_sum(&v, &global, 0.5, 0.0).unwrap();
        assert!((totals.model.weights[0] + 0.5 * expected[0] / 2.0).abs() < 1e-12);
        assert!((totals.model.bias + 0.5 * expected[2] / 2.0).abs() < 1e-12);
        assert_eq!(totals.train_rows, 2.0);
        // With noise, every value moves.
        let noisy = private_training_contribution(&global, &a, 1.0, 5.0, &mut rng).unwrap();
        assert!(noisy.iter().zip(&v).all(|(x, y)| x != y));
        assert!(read_private_training_sum(&v[1..], &global, 0.5, 0.0).is_err());
    }

    #[test]
    fn a_training_round_is_the_weighted_local_model_and_nothing_else() {
        // No loss, no evaluation of the model the coordinator sent: the
        // parameters after local training, times the rows, and the rows.
        let rows: Vec<(Vec<f64>, bool)> = (0..300)
            .map(|i| {
                let x = f64::from(i) / 100.0 - 1.5;
                (vec![x, (x * 3.0).sin()], (i * 7) % 5 < 2)
            })
            .collect();
        let rows: Vec<(&[f64], bool)> = rows.iter().map(|(r, y)| (r.as_slice(), *y)).collect();
        let train = data(&rows);
        let global = Model {
            hidden: None,
            weights: vec![0.3, -0.8],
            bias: 0.1,
        };
        let config = TrainConfig {
            epochs: 2,
            batch_size: 16,
            learning_rate: 0.2,
            proximal_mu: 0.0,
            l2: 0.0,
        };
        let seeded = || <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let v = training_contribution(&global, &train, &config, &mut seeded()).unwrap();
        assert_eq!(v.len(), training_len(global.param_count()));
        assert_eq!(v.len(), global.param_count() + 1);
        let local = global.train(&train, &config, &mut seeded()).unwrap();
        assert_eq!(v, local.weighted(train.len()));
        assert_eq!(v[global.param_count()], 300.0);
    }

    #[test]
    fn a_training_sum_reads_back_as_the_weighted_average() {
        let a = data(&[(&[0.1, 1.0], false), (&[2.0, 0.0], true)]);
        let global = Model::zeros(2);
        let config = TrainConfig {
            epochs: 1,
            batch_size: 1,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            l2: 0.0,
        };
        let mut rng = rand::rngs::mock::StepRng::new(0, 1);
        let v = training_contribution(&global, &a, &config, &mut rng).unwrap();
        assert_eq!(v.len(), training_len(3));
        let totals = read_training_sum(&v, &global).unwrap();
        assert_eq!(totals.train_rows, 2.0);
        assert!(read_training_sum(&v[1..], &global).is_err());
    }
}

//! Models, local training and evaluation for federated learning: what a
//! node runs on its own patients in a training round, and what the
//! coordinator does with the (securely summed) results.
//!
//! Everything a node sends is a sum over its patients, so that it can go
//! through secure aggregation (`ghx-secagg`) and the coordinator sees only
//! the federation's total: feature moments for standardisation
//! ([`Standardiser::local_sums`]), sample-weighted model parameters for
//! FedAvg and FedProx ([`Logistic::weighted`], [`Logistic::average_of`]).
//!
//! Logistic regression is trained by mini-batch SGD on the mean log loss
//! with optional L2 and, for FedProx, the proximal term
//! `mu / 2 * ||w - w_global||^2` that keeps local steps near the global
//! model when hospitals' data differ.

pub mod federated;
pub mod metrics;

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// Why training or combining could not proceed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("row {row} has {got} features, the model has {expected}")]
    WrongWidth {
        row: usize,
        got: usize,
        expected: usize,
    },
    #[error("feature {index} is not a finite number in row {row}")]
    NotFinite { row: usize, index: usize },
    #[error("a summed vector of {got} values cannot hold {what} of {dim} features")]
    WrongSumLength {
        what: &'static str,
        got: usize,
        dim: usize,
    },
    #[error("the summed weight is {0}; no samples took part")]
    NoSamples(f64),
    #[error("training setting {setting} is {value}; {expected}")]
    BadSetting {
        setting: &'static str,
        value: f64,
        expected: &'static str,
    },
}

/// Labelled rows: features row-major, labels 0 or 1.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    dim: usize,
    features: Vec<f64>,
    labels: Vec<f64>,
}

impl Dataset {
    pub fn new(dim: usize) -> Self {
        Dataset {
            dim,
            features: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Adds a row; refuses the wrong width and non-finite values.
    pub fn push(&mut self, row: &[f64], label: bool) -> Result<(), Error> {
        let at = self.len();
        if row.len() != self.dim {
            return Err(Error::WrongWidth {
                row: at,
                got: row.len(),
                expected: self.dim,
            });
        }
        if let Some(index) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::NotFinite { row: at, index });
        }
        self.features.extend_from_slice(row);
        self.labels.push(if label { 1.0 } else { 0.0 });
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    pub fn label(&self, i: usize) -> f64 {
        self.labels[i]
    }

    pub fn labels(&self) -> &[f64] {
        &self.labels
    }

    /// Rows with index `i % k == part`, and the others: a deterministic
    /// split for held-out evaluation.
    pub fn split(&self, k: usize, part: usize) -> (Dataset, Dataset) {
        let mut held = Dataset::new(self.dim);
        let mut kept = Dataset::new(self.dim);
        for i in 0..self.len() {
            let target = if i % k == part { &mut held } else { &mut kept };
            target.features.extend_from_slice(self.row(i));
            target.labels.push(self.labels[i]);
        }
        (kept, held)
    }
}

/// Per-feature centring and scaling, fitted on the federation's pooled
/// moments so every node scales identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardiser {
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
}

impl Standardiser {
    /// What a node contributes: `[n, sum x_j..., sum x_j^2...]`.
    pub fn local_sums(data: &Dataset) -> Vec<f64> {
        let d = data.dim;
        let mut out = vec![0.0; 1 + 2 * d];
        out[0] = data.len() as f64;
        for i in 0..data.len() {
            for (j, x) in data.row(i).iter().enumerate() {
                out[1 + j] += x;
                out[1 + d + j] += x * x;
            }
        }
        out
    }

    /// From the sum of every node's [`Self::local_sums`]. A constant
    /// feature gets sd 1 (it is only centred).
    pub fn from_sums(sums: &[f64]) -> Result<Self, Error> {
        let d = sums.len().saturating_sub(1) / 2;
        if sums.len() != 1 + 2 * d {
            return Err(Error::WrongSumLength {
                what: "feature moments",
                got: sums.len(),
                dim: d,
            });
        }
        let n = sums[0];
        if n < 1.0 {
            return Err(Error::NoSamples(n));
        }
        let mean: Vec<f64> = (0..d).map(|j| sums[1 + j] / n).collect();
        let sd = (0..d)
            .map(|j| {
                let var = (sums[1 + d + j] / n - mean[j] * mean[j]).max(0.0);
                if var > 1e-12 { var.sqrt() } else { 1.0 }
            })
            .collect();
        Ok(Standardiser { mean, sd })
    }

    pub fn apply(&self, data: &mut Dataset) {
        let d = data.dim;
        for row in data.features.chunks_mut(d) {
            for (j, x) in row.iter_mut().enumerate() {
                *x = (*x - self.mean[j]) / self.sd[j];
            }
        }
    }
}

/// Local optimiser settings of a training round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// FedProx's mu; 0 is FedAvg.
    #[serde(default)]
    pub proximal_mu: f64,
    /// L2 penalty on the weights (not the bias).
    #[serde(default)]
    pub l2: f64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |setting, value: f64, expected| {
            Err(Error::BadSetting {
                setting,
                value,
                expected,
            })
        };
        if self.epochs == 0 || self.epochs > 1000 {
            return bad("epochs", f64::from(self.epochs), "expected 1 to 1000");
        }
        if self.batch_size == 0 {
            return bad("batch_size", 0.0, "expected at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 10.0) {
            return bad("learning_rate", self.learning_rate, "expected in (0, 10]");
        }
        if !(self.proximal_mu >= 0.0 && self.proximal_mu.is_finite()) {
            return bad("proximal_mu", self.proximal_mu, "expected 0 or more");
        }
        if !(self.l2 >= 0.0 && self.l2.is_finite()) {
            return bad("l2", self.l2, "expected 0 or more");
        }
        Ok(())
    }
}

/// A logistic regression model on standardised features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub weights: Vec<f64>,
    pub bias: f64,
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Logistic {
    pub fn zeros(dim: usize) -> Self {
        Logistic {
            weights: vec![0.0; dim],
            bias: 0.0,
        }
    }

    /// The predicted probability of the label for one row.
    pub fn predict(&self, row: &[f64]) -> f64 {
        sigmoid(self.logit(row))
    }

    fn logit(&self, row: &[f64]) -> f64 {
        self.bias
            + self
                .weights
                .iter()
                .zip(row)
                .map(|(w, x)| w * x)
                .sum::<f64>()
    }

    /// Predictions for every row.
    pub fn predict_all(&self, data: &Dataset) -> Vec<f64> {
        (0..data.len()).map(|i| self.predict(data.row(i))).collect()
    }

    /// Mean log loss over `data` (0 for no rows).
    pub fn log_loss(&self, data: &Dataset) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let total: f64 = (0..data.len())
            .map(|i| {
                let z = self.logit(data.row(i));
                // log(1 + e^z) - y z, computed without overflow.
                let softplus = if z > 0.0 {
                    z + (-z).exp().ln_1p()
                } else {
                    z.exp().ln_1p()
                };
                softplus - data.label(i) * z
            })
            .sum();
        total / data.len() as f64
    }

    /// Mini-batch SGD from this (global) model on local `data`; returns the
    /// local model. Rows are reshuffled every epoch.
    pub fn train(
        &self,
        data: &Dataset,
        config: &TrainConfig,
        rng: &mut impl Rng,
    ) -> Result<Logistic, Error> {
        config.validate()?;
        if data.dim != self.weights.len() {
            return Err(Error::WrongWidth {
                row: 0,
                got: data.dim,
                expected: self.weights.len(),
            });
        }
        let mut model = self.clone();
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut gradient = vec![0.0; self.weights.len()];
        for _ in 0..config.epochs {
            order.shuffle(rng);
            for batch in order.chunks(config.batch_size) {
                gradient.iter_mut().for_each(|g| *g = 0.0);
                let mut gradient_bias = 0.0;
                for &i in batch {
                    let row = data.row(i);
                    let error = model.predict(row) - data.label(i);
                    for (g, x) in gradient.iter_mut().zip(row) {
                        *g += error * x;
                    }
                    gradient_bias += error;
                }
                let scale = 1.0 / batch.len() as f64;
                for (j, w) in model.weights.iter_mut().enumerate() {
                    let g = gradient[j] * scale
                        + config.l2 * *w
                        + config.proximal_mu * (*w - self.weights[j]);
                    *w -= config.learning_rate * g;
                }
                let g = gradient_bias * scale + config.proximal_mu * (model.bias - self.bias);
                model.bias -= config.learning_rate * g;
            }
        }
        Ok(model)
    }

    /// What a node contributes to FedAvg: `[n w..., n b, n]`.
    pub fn weighted(&self, samples: usize) -> Vec<f64> {
        let n = samples as f64;
        let mut out: Vec<f64> = self.weights.iter().map(|w| w * n).collect();
        out.push(self.bias * n);
        out.push(n);
        out
    }

    /// The sample-weighted average from the sum of nodes' [`Self::weighted`].
    pub fn average_of(sum: &[f64]) -> Result<Logistic, Error> {
        if sum.len() < 2 {
            return Err(Error::WrongSumLength {
                what: "a weighted model",
                got: sum.len(),
                dim: 0,
            });
        }
        let (params, n) = sum.split_at(sum.len() - 1);
        let n = n[0];
        if n < 1.0 {
            return Err(Error::NoSamples(n));
        }
        let (weights, bias) = params.split_at(params.len() - 1);
        Ok(Logistic {
            weights: weights.iter().map(|w| w / n).collect(),
            bias: bias[0] / n,
        })
    }
}

//! Models, local training and evaluation for federated learning: what a
//! node runs on its own patients in a training round, and what the
//! coordinator does with the (securely summed) results.
//!
//! Everything a node sends is a sum over its patients, so that it can go
//! through secure aggregation (`ghx-secagg`) and the coordinator sees only
//! the federation's total: feature moments for standardisation
//! ([`Standardiser::local_sums`]), sample-weighted model parameters for
//! FedAvg and FedProx ([`Model::weighted`], [`Model::average_of`]).
//!
//! A [`Model`] is logistic regression or a small MLP (one tanh hidden
//! layer, sigmoid output), trained by mini-batch SGD on the mean log loss
//! with optional L2 and, for FedProx, the proximal term
//! `mu / 2 * ||w - w_global||^2` that keeps local steps near the global
//! model when hospitals' data differ.

pub mod evaluation;
pub mod federated;
pub mod metrics;
pub mod noise;

use rand::Rng;
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

/// The hidden layer of a small multilayer perceptron: `units` tanh units,
/// each a weighted sum of the (standardised) features plus a bias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hidden {
    /// Row-major, one row of `dim` weights per unit.
    pub weights: Vec<f64>,
    /// One per unit.
    pub bias: Vec<f64>,
}

impl Hidden {
    pub fn units(&self) -> usize {
        self.bias.len()
    }
}

/// Most hidden units a model may have.
pub const MAX_HIDDEN_UNITS: usize = 64;

/// A model on standardised features with a sigmoid output: logistic
/// regression (no hidden layer), or a small MLP with one tanh hidden layer
/// whose units the output weighs.
///
/// Its parameters flatten as the hidden weights (row by row), the hidden
/// biases, the output weights and the output bias ([`Self::params`]); a
/// logistic model is just the output part. That flat vector is what nodes
/// weight, sum and average.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// None for logistic regression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Hidden>,
    /// Output weights: one per feature, or per hidden unit.
    pub weights: Vec<f64>,
    pub bias: f64,
}

#[inline]
fn sigmoid(z: f64) -> f64 {
    // exp of minus |z| never overflows; no branch on the sign, which is
    // as likely either way.
    sigmoid_from(z, (-z.abs()).exp())
}

/// `log(1 + e^z) - y z`, the log loss at logit `z`, without overflow: the
/// per-row reference [`LogLossSum`] is tested against.
#[cfg(test)]
fn log_loss_at(z: f64, y: f64) -> f64 {
    let softplus = z.max(0.0) + (-z.abs()).exp().ln_1p();
    softplus - y * z
}

/// Rows whose `1 + e^-|z|` factors [`LogLossSum`] multiplies before taking
/// one logarithm: each factor is in (1, 2], so a product stays below
/// 2^1000, inside f64's range.
const LOG_CHUNK: u32 = 1000;

/// The sum of many rows' log losses `softplus(z) - y z`, where
/// `softplus(z) = max(z, 0) + ln(1 + e^-|z|)`, without overflow. The
/// logarithms are taken of products of up to [`LOG_CHUNK`] factors, one
/// `ln` per chunk instead of one `ln_1p` per row (which cost a quarter of
/// a training round's computation); a product's rounding error, about
/// 1e-13 relative, is far below what a mean loss is read to, and a factor
/// `1 + e` that rounds to 1 drops an `e` below 1e-16.
struct LogLossSum {
    linear: f64,
    logs: f64,
    product: f64,
    pending: u32,
}

impl LogLossSum {
    fn new() -> Self {
        LogLossSum {
            linear: 0.0,
            logs: 0.0,
            product: 1.0,
            pending: 0,
        }
    }

    /// Adds the loss at logit `z` with label `y`, given `e = exp(-|z|)`.
    #[inline]
    fn add(&mut self, z: f64, y: f64, e: f64) {
        self.linear += z.max(0.0) - y * z;
        self.product *= 1.0 + e;
        self.pending += 1;
        if self.pending == LOG_CHUNK {
            self.logs += self.product.ln();
            self.product = 1.0;
            self.pending = 0;
        }
    }

    fn total(&self) -> f64 {
        self.linear + self.logs + self.product.ln()
    }
}

/// [`sigmoid`] of a logit from its `e = exp(-|z|)`.
#[inline]
fn sigmoid_from(z: f64, e: f64) -> f64 {
    let r = 1.0 / (1.0 + e);
    if z >= 0.0 { r } else { e * r }
}

/// Fisher-Yates shuffle of row indices with Lemire's multiply-shift
/// bounded integers: unbiased (a draw whose low half falls in the short
/// zone is redrawn, at these bounds about once in 10^5 draws), and 3.7x
/// faster here than `rand` 0.8's `SliceRandom::shuffle` (61 vs 225 us on
/// 31k rows), which was a fifth of a logistic training round.
fn shuffle_rows(order: &mut [u32], rng: &mut impl Rng) {
    for i in (1..order.len()).rev() {
        // order.len() fits in u32, so does i + 1.
        let bound = (i + 1) as u32;
        let mut m = u64::from(rng.next_u32()) * u64::from(bound);
        if (m as u32) < bound {
            let short = bound.wrapping_neg() % bound;
            while (m as u32) < short {
                m = u64::from(rng.next_u32()) * u64::from(bound);
            }
        }
        order.swap(i, (m >> 32) as usize);
    }
}

/// `0..rows` as the u32 indices [`shuffle_rows`] moves (half the memory
/// of usize); more rows than u32 holds are refused.
fn row_order(rows: usize) -> Result<Vec<u32>, Error> {
    let n = u32::try_from(rows).map_err(|_| Error::BadSetting {
        setting: "training rows",
        value: rows as f64,
        expected: "expected at most 4294967295",
    })?;
    Ok((0..n).collect())
}

/// The layout of a model's flat parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    dim: usize,
    /// 0 for logistic regression.
    units: usize,
}

/// How many parameters a model on `dim` features has with `units` hidden
/// units (0: logistic regression).
pub fn param_count(dim: usize, units: usize) -> usize {
    if units == 0 {
        dim + 1
    } else {
        units * (dim + 2) + 1
    }
}

impl Shape {
    fn len(self) -> usize {
        param_count(self.dim, self.units)
    }

    /// Where the output weights start.
    fn output(self) -> usize {
        self.units * (self.dim + 1)
    }

    /// Whether parameter `i` is a weight (penalised by L2), not a bias.
    fn is_weight(self, i: usize) -> bool {
        let hidden_weights = self.units * self.dim;
        i < hidden_weights || (i >= self.output() && i < self.len() - 1)
    }

    /// The logit of `row` under parameters `p`; the hidden activations go
    /// to `act` (length `units`).
    #[inline]
    fn logit(self, p: &[f64], row: &[f64], act: &mut [f64]) -> f64 {
        let d = self.dim;
        if self.units == 0 {
            return p[d] + p[..d].iter().zip(row).map(|(w, x)| w * x).sum::<f64>();
        }
        let out = self.output();
        let biases = &p[self.units * d..out];
        for (k, a) in act.iter_mut().enumerate() {
            let w = &p[k * d..(k + 1) * d];
            *a = (biases[k] + w.iter().zip(row).map(|(w, x)| w * x).sum::<f64>()).tanh();
        }
        p[self.len() - 1]
            + p[out..out + self.units]
                .iter()
                .zip(act.iter())
                .map(|(w, a)| w * a)
                .sum::<f64>()
    }

    /// Adds `error` times the gradient of the logit at `row` (activations
    /// `act` from [`Self::logit`]) to `g`: `error` is the prediction minus
    /// the label, so this is the log loss's gradient.
    fn add_gradient(self, p: &[f64], row: &[f64], act: &[f64], error: f64, g: &mut [f64]) {
        let d = self.dim;
        let last = self.len() - 1;
        g[last] += error;
        if self.units == 0 {
            for (g, x) in g[..d].iter_mut().zip(row) {
                *g += error * x;
            }
            return;
        }
        let out = self.output();
        for k in 0..self.units {
            g[out + k] += error * act[k];
            let delta = error * p[out + k] * (1.0 - act[k] * act[k]);
            g[self.units * d + k] += delta;
            for (g, x) in g[k * d..(k + 1) * d].iter_mut().zip(row) {
                *g += delta * x;
            }
        }
    }
}

impl Model {
    /// Logistic regression with every weight 0.
    pub fn zeros(dim: usize) -> Self {
        Model {
            hidden: None,
            weights: vec![0.0; dim],
            bias: 0.0,
        }
    }

    /// A small MLP on `dim` features with `units` hidden units, weights
    /// drawn uniformly at the Glorot scale (biases 0) so units differ.
    pub fn mlp(dim: usize, units: usize, rng: &mut impl Rng) -> Result<Self, Error> {
        if units == 0 || units > MAX_HIDDEN_UNITS {
            return Err(Error::BadSetting {
                setting: "hidden units",
                value: units as f64,
                expected: "expected 1 to 64",
            });
        }
        let hidden_scale = (6.0 / (dim + units) as f64).sqrt();
        let output_scale = (6.0 / (units + 1) as f64).sqrt();
        Ok(Model {
            hidden: Some(Hidden {
                weights: (0..units * dim)
                    .map(|_| rng.gen_range(-hidden_scale..hidden_scale))
                    .collect(),
                bias: vec![0.0; units],
            }),
            weights: (0..units)
                .map(|_| rng.gen_range(-output_scale..output_scale))
                .collect(),
            bias: 0.0,
        })
    }

    /// How many features the model reads.
    pub fn dim(&self) -> usize {
        match &self.hidden {
            Some(h) if h.units() > 0 => h.weights.len() / h.units(),
            Some(_) => 0,
            None => self.weights.len(),
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            dim: self.dim(),
            units: self.hidden.as_ref().map_or(0, Hidden::units),
        }
    }

    /// How many parameters [`Self::params`] holds.
    pub fn param_count(&self) -> usize {
        self.shape().len()
    }

    /// The flat parameters: hidden weights and biases, output weights, bias.
    pub fn params(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.param_count());
        if let Some(h) = &self.hidden {
            out.extend(&h.weights);
            out.extend(&h.bias);
        }
        out.extend(&self.weights);
        out.push(self.bias);
        out
    }

    /// A model of this one's shape with parameters `p`.
    pub fn with_params(&self, p: &[f64]) -> Result<Model, Error> {
        let shape = self.shape();
        if p.len() != shape.len() {
            return Err(Error::WrongSumLength {
                what: "a model's parameters",
                got: p.len(),
                dim: shape.dim,
            });
        }
        let out = shape.output();
        Ok(Model {
            hidden: self.hidden.as_ref().map(|_| Hidden {
                weights: p[..shape.units * shape.dim].to_vec(),
                bias: p[shape.units * shape.dim..out].to_vec(),
            }),
            weights: p[out..p.len() - 1].to_vec(),
            bias: p[p.len() - 1],
        })
    }

    /// Predictions for every row.
    pub fn predict_all(&self, data: &Dataset) -> Vec<f64> {
        let shape = self.shape();
        let p = self.params();
        let mut act = vec![0.0; shape.units];
        (0..data.len())
            .map(|i| sigmoid(shape.logit(&p, data.row(i), &mut act)))
            .collect()
    }

    /// Predictions for every row and the mean log loss (0 for no rows),
    /// in one pass: [`Model::predict_all`] and [`Model::log_loss`] alike.
    pub fn predict_all_with_log_loss(&self, data: &Dataset) -> (Vec<f64>, f64) {
        let shape = self.shape();
        let p = self.params();
        let mut act = vec![0.0; shape.units];
        let mut scores = Vec::with_capacity(data.len());
        let mut losses = LogLossSum::new();
        for i in 0..data.len() {
            let z = shape.logit(&p, data.row(i), &mut act);
            let e = (-z.abs()).exp();
            scores.push(sigmoid_from(z, e));
            losses.add(z, data.label(i), e);
        }
        let mean = if data.is_empty() {
            0.0
        } else {
            losses.total() / data.len() as f64
        };
        (scores, mean)
    }

    /// Mean log loss over `data` (0 for no rows).
    pub fn log_loss(&self, data: &Dataset) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let shape = self.shape();
        let p = self.params();
        let mut act = vec![0.0; shape.units];
        let mut losses = LogLossSum::new();
        for i in 0..data.len() {
            let z = shape.logit(&p, data.row(i), &mut act);
            losses.add(z, data.label(i), (-z.abs()).exp());
        }
        losses.total() / data.len() as f64
    }

    fn check_width(&self, data: &Dataset) -> Result<(), Error> {
        if data.dim != self.dim() {
            return Err(Error::WrongWidth {
                row: 0,
                got: data.dim,
                expected: self.dim(),
            });
        }
        Ok(())
    }

    /// Mini-batch SGD from this (global) model on local `data`; returns the
    /// local model. Rows are reshuffled every epoch.
    pub fn train(
        &self,
        data: &Dataset,
        config: &TrainConfig,
        rng: &mut impl Rng,
    ) -> Result<Model, Error> {
        config.validate()?;
        self.check_width(data)?;
        // The order rows are visited in needs no cryptographic generator
        // (noise, where one is used, is drawn from `rng`): a fast one,
        // seeded from `rng`, shuffles several times faster.
        let mut shuffler = {
            use rand::SeedableRng;
            rand::rngs::SmallRng::seed_from_u64(rng.r#gen())
        };
        let order = row_order(data.len())?;
        let p = if self.hidden.is_none() {
            self.sgd_logistic(data, config, order, &mut shuffler)
        } else {
            self.sgd_any(data, config, order, &mut shuffler)
        };
        self.with_params(&p)
    }

    /// [`Self::train`]'s SGD for any shape.
    fn sgd_any(
        &self,
        data: &Dataset,
        config: &TrainConfig,
        mut order: Vec<u32>,
        shuffler: &mut impl Rng,
    ) -> Vec<f64> {
        let shape = self.shape();
        let start = self.params();
        let mut p = start.clone();
        let mut gradient = vec![0.0; p.len()];
        let mut act = vec![0.0; shape.units];
        for _ in 0..config.epochs {
            shuffle_rows(&mut order, shuffler);
            for batch in order.chunks(config.batch_size) {
                gradient.iter_mut().for_each(|g| *g = 0.0);
                for &i in batch {
                    let i = i as usize;
                    let row = data.row(i);
                    let error = sigmoid(shape.logit(&p, row, &mut act)) - data.label(i);
                    shape.add_gradient(&p, row, &act, error, &mut gradient);
                }
                let scale = 1.0 / batch.len() as f64;
                for (j, w) in p.iter_mut().enumerate() {
                    let l2 = if shape.is_weight(j) {
                        config.l2 * *w
                    } else {
                        0.0
                    };
                    let g = gradient[j] * scale + l2 + config.proximal_mu * (*w - start[j]);
                    *w -= config.learning_rate * g;
                }
            }
        }
        p
    }

    /// [`Self::sgd_any`] for logistic regression, the same arithmetic in
    /// the same order (so the same model, bit for bit), written on the
    /// weights and bias directly: no hidden-layer branches or activation
    /// buffer per row.
    fn sgd_logistic(
        &self,
        data: &Dataset,
        config: &TrainConfig,
        mut order: Vec<u32>,
        shuffler: &mut impl Rng,
    ) -> Vec<f64> {
        let d = self.weights.len();
        let start = self.params();
        let (start_w, start_b) = (&start[..d], start[d]);
        let mut w = self.weights.clone();
        let mut b = self.bias;
        let mut gradient = vec![0.0; d];
        let mut errors = Vec::with_capacity(config.batch_size.min(data.len()));
        for _ in 0..config.epochs {
            shuffle_rows(&mut order, shuffler);
            for batch in order.chunks(config.batch_size) {
                gradient.iter_mut().for_each(|g| *g = 0.0);
                let mut gradient_b = 0.0;
                // Every row's logit first: the rows' loads do not wait on
                // one another's exp, and are in cache for the gradient.
                errors.clear();
                errors.extend(batch.iter().map(|&i| {
                    let i = i as usize;
                    let row = &data.features[i * d..(i + 1) * d];
                    b + w.iter().zip(row).map(|(w, x)| w * x).sum::<f64>()
                }));
                for (z, &i) in errors.iter_mut().zip(batch) {
                    *z = sigmoid(*z) - data.labels[i as usize];
                }
                for (&error, &i) in errors.iter().zip(batch) {
                    let i = i as usize;
                    let row = &data.features[i * d..(i + 1) * d];
                    gradient_b += error;
                    for (g, x) in gradient.iter_mut().zip(row) {
                        *g += error * x;
                    }
                }
                let scale = 1.0 / batch.len() as f64;
                for ((w, g), s) in w.iter_mut().zip(&gradient).zip(start_w) {
                    let g = g * scale + config.l2 * *w + config.proximal_mu * (*w - s);
                    *w -= config.learning_rate * g;
                }
                let g = gradient_b * scale + 0.0 + config.proximal_mu * (b - start_b);
                b -= config.learning_rate * g;
            }
        }
        w.push(b);
        w
    }

    /// The sum over `data` of each row's log-loss gradient at this model,
    /// each clipped to L2 norm `clip` (DP-SGD's per-row clipping).
    pub fn clipped_gradient_sum(&self, data: &Dataset, clip: f64) -> Result<Vec<f64>, Error> {
        self.check_width(data)?;
        let shape = self.shape();
        let p = self.params();
        let mut act = vec![0.0; shape.units];
        let mut row_gradient = vec![0.0; p.len()];
        let mut out = vec![0.0; p.len()];
        for i in 0..data.len() {
            let row = data.row(i);
            let error = sigmoid(shape.logit(&p, row, &mut act)) - data.label(i);
            row_gradient.iter_mut().for_each(|g| *g = 0.0);
            shape.add_gradient(&p, row, &act, error, &mut row_gradient);
            let norm = row_gradient.iter().map(|g| g * g).sum::<f64>().sqrt();
            let scale = if norm > clip { clip / norm } else { 1.0 };
            for (o, g) in out.iter_mut().zip(&row_gradient) {
                *o += scale * g;
            }
        }
        Ok(out)
    }

    /// One gradient step from this model: `p - lr * (g + l2 * w)`, the L2
    /// penalty on weights only.
    pub fn step(&self, gradient: &[f64], learning_rate: f64, l2: f64) -> Result<Model, Error> {
        let shape = self.shape();
        let p: Vec<f64> = self
            .params()
            .iter()
            .zip(gradient)
            .enumerate()
            .map(|(j, (w, g))| {
                let penalty = if shape.is_weight(j) { l2 * w } else { 0.0 };
                w - learning_rate * (g + penalty)
            })
            .collect();
        self.with_params(&p)
    }

    /// What a node contributes to FedAvg: `[n p..., n]` over [`Self::params`].
    pub fn weighted(&self, samples: usize) -> Vec<f64> {
        let n = samples as f64;
        let mut out: Vec<f64> = self.params().iter().map(|w| w * n).collect();
        out.push(n);
        out
    }

    /// The sample-weighted average, shaped like this model, from the sum of
    /// nodes' [`Self::weighted`].
    pub fn average_of(&self, sum: &[f64]) -> Result<Model, Error> {
        if sum.len() != self.param_count() + 1 {
            return Err(Error::WrongSumLength {
                what: "a weighted model",
                got: sum.len(),
                dim: self.dim(),
            });
        }
        let (params, n) = sum.split_at(sum.len() - 1);
        let n = n[0];
        if n < 1.0 {
            return Err(Error::NoSamples(n));
        }
        let averaged: Vec<f64> = params.iter().map(|w| w / n).collect();
        self.with_params(&averaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// XOR of two signs: no linear model separates it.
    fn xor(n: usize, rng: &mut StdRng) -> Dataset {
        let mut d = Dataset::new(2);
        for _ in 0..n {
            let (a, b): (f64, f64) = (rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0));
            d.push(&[a, b], (a > 0.0) != (b > 0.0)).unwrap();
        }
        d
    }

    fn auc(model: &Model, data: &Dataset) -> f64 {
        metrics::auc(&model.predict_all(data), data.labels()).unwrap()
    }

    #[test]
    fn sigmoid_and_log_loss_stay_finite_at_extreme_logits() {
        // Both are written on exp(-|z|), which never overflows.
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) + sigmoid(-2.0) - 1.0).abs() < 1e-15);
        assert_eq!(log_loss_at(1000.0, 0.0), 1000.0);
        assert_eq!(log_loss_at(-1000.0, 1.0), 1000.0);
        assert_eq!(log_loss_at(1000.0, 1.0), 0.0);
        assert_eq!(log_loss_at(-1000.0, 0.0), 0.0);
        assert!((log_loss_at(0.0, 1.0) - std::f64::consts::LN_2).abs() < 1e-15);
        for z in [-1000.0, -30.0, -2.5, -1e-9, 0.0, 1e-9, 0.7, 40.0, 1000.0] {
            for y in [0.0, 1.0] {
                let mut one = LogLossSum::new();
                one.add(z, y, (-z.abs()).exp());
                let reference = log_loss_at(z, y);
                assert!(
                    (one.total() - reference).abs() <= 1e-15 * reference.max(1.0),
                    "{z} {y}"
                );
            }
        }
    }

    #[test]
    fn chunked_log_loss_sums_match_per_row_logarithms() {
        // Many chunks, logits from far negative to far positive: a product
        // of factors near 2 (z near 0) must neither overflow nor drift.
        let mut rng = StdRng::seed_from_u64(5);
        for spread in [1e-6, 1.0, 8.0, 60.0] {
            let mut sum = LogLossSum::new();
            let mut reference = 0.0;
            for _ in 0..(3 * LOG_CHUNK as usize + 17) {
                let z = rng.gen_range(-spread..spread);
                let y = if rng.gen_bool(0.4) { 1.0 } else { 0.0 };
                sum.add(z, y, (-z.abs()).exp());
                reference += log_loss_at(z, y);
            }
            let total = sum.total();
            assert!(total.is_finite());
            assert!(
                (total - reference).abs() <= 1e-12 * reference,
                "spread {spread}: {total} vs {reference}"
            );
        }
    }

    #[test]
    fn one_pass_scores_and_loss_equal_the_two_passes() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut data = Dataset::new(3);
        for _ in 0..200 {
            let row: Vec<f64> = (0..3).map(|_| rng.gen_range(-4.0..4.0)).collect();
            data.push(&row, rng.gen_bool(0.3)).unwrap();
        }
        let mlp = Model::mlp(3, 5, &mut rng).unwrap();
        let logistic = Model {
            hidden: None,
            weights: vec![1.5, -0.7, 2.0],
            bias: -0.3,
        };
        for model in [&mlp, &logistic] {
            let (scores, loss) = model.predict_all_with_log_loss(&data);
            assert_eq!(scores, model.predict_all(&data));
            assert!(
                (loss - model.log_loss(&data)).abs() <= 1e-15 * loss.abs(),
                "{loss}"
            );
        }
        assert_eq!(
            logistic.predict_all_with_log_loss(&Dataset::new(3)),
            (Vec::new(), 0.0)
        );
    }

    #[test]
    fn mlp_gradients_match_finite_differences_of_the_log_loss() {
        let mut rng = StdRng::seed_from_u64(3);
        let model = Model::mlp(3, 4, &mut rng).unwrap();
        let mut data = Dataset::new(3);
        data.push(&[0.3, -1.2, 0.8], true).unwrap();
        let analytic = model.clipped_gradient_sum(&data, f64::INFINITY).unwrap();
        let p = model.params();
        assert_eq!(p.len(), 4 * 3 + 4 + 4 + 1);
        assert_eq!(analytic.len(), p.len());
        for j in 0..p.len() {
            let h = 1e-6;
            let at = |delta: f64| {
                let mut q = p.clone();
                q[j] += delta;
                model.with_params(&q).unwrap().log_loss(&data)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - analytic[j]).abs() < 1e-6,
                "parameter {j}: {numeric} vs {}",
                analytic[j]
            );
        }
    }

    #[test]
    fn the_logistic_loop_is_the_general_loop_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut data = Dataset::new(4);
        for _ in 0..500 {
            let row: Vec<f64> = (0..4).map(|_| rng.gen_range(-3.0..3.0)).collect();
            data.push(&row, rng.gen_bool(0.35)).unwrap();
        }
        let model = Model {
            hidden: None,
            weights: vec![0.4, -1.1, 0.0, 2.5],
            bias: -0.6,
        };
        // A last batch shorter than the others; L2 and FedProx both on.
        let config = TrainConfig {
            epochs: 3,
            batch_size: 7,
            learning_rate: 0.3,
            proximal_mu: 0.1,
            l2: 0.01,
        };
        let run = |logistic: bool| {
            let mut shuffler = rand::rngs::SmallRng::seed_from_u64(9);
            let order = row_order(data.len()).unwrap();
            if logistic {
                model.sgd_logistic(&data, &config, order, &mut shuffler)
            } else {
                model.sgd_any(&data, &config, order, &mut shuffler)
            }
        };
        let fast = run(true);
        assert_eq!(fast, run(false));
        assert_ne!(fast, model.params(), "training moved the model");
    }

    #[test]
    fn shuffled_rows_are_a_uniform_permutation() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        // Every order of three rows about equally often: 60000 shuffles,
        // 10000 expected each, standard deviation about 91.
        let mut counts = std::collections::HashMap::new();
        for _ in 0..60_000 {
            let mut order = row_order(3).unwrap();
            shuffle_rows(&mut order, &mut rng);
            *counts.entry(order).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 6);
        for (order, n) in &counts {
            assert!((9_500..=10_500).contains(n), "{order:?}: {n}");
        }
        // A long shuffle is still a permutation, and moves rows.
        let mut order = row_order(10_000).unwrap();
        shuffle_rows(&mut order, &mut rng);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, row_order(10_000).unwrap());
        assert!(
            order
                .iter()
                .enumerate()
                .filter(|(i, r)| *i == **r as usize)
                .count()
                < 10
        );
        // Nothing to shuffle is fine.
        shuffle_rows(&mut [], &mut rng);
    }

    #[test]
    fn an_mlp_learns_what_logistic_regression_cannot() {
        let mut rng = StdRng::seed_from_u64(11);
        let train = xor(4000, &mut rng);
        let test = xor(2000, &mut rng);
        let config = TrainConfig {
            epochs: 40,
            batch_size: 32,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            l2: 0.0,
        };
        let linear = Model::zeros(2).train(&train, &config, &mut rng).unwrap();
        let mlp = Model::mlp(2, 8, &mut rng)
            .unwrap()
            .train(&train, &config, &mut rng)
            .unwrap();
        assert!(auc(&linear, &test) < 0.6, "{}", auc(&linear, &test));
        assert!(auc(&mlp, &test) > 0.95, "{}", auc(&mlp, &test));
    }

    #[test]
    fn parameters_flatten_and_average_back_into_the_same_shape() {
        let mut rng = StdRng::seed_from_u64(5);
        let a = Model::mlp(3, 2, &mut rng).unwrap();
        assert_eq!(a.dim(), 3);
        assert_eq!(a.with_params(&a.params()).unwrap(), a);
        let b = a.with_params(&vec![1.0; a.param_count()]).unwrap();
        let sum: Vec<f64> = a
            .weighted(1)
            .iter()
            .zip(b.weighted(3))
            .map(|(x, y)| x + y)
            .collect();
        let mean = a.average_of(&sum).unwrap();
        for ((m, x), y) in mean.params().iter().zip(a.params()).zip(b.params()) {
            assert!((m - (x + 3.0 * y) / 4.0).abs() < 1e-12);
        }
        assert!(a.average_of(&sum[1..]).is_err());
        assert!(a.with_params(&[0.0; 3]).is_err());
        assert!(Model::mlp(3, 0, &mut rng).is_err());
        assert!(Model::mlp(3, MAX_HIDDEN_UNITS + 1, &mut rng).is_err());
        // L2 leaves biases alone.
        let stepped = b.step(&vec![0.0; b.param_count()], 0.5, 1.0).unwrap();
        assert_eq!(stepped.bias, 1.0);
        assert_eq!(stepped.hidden.as_ref().unwrap().bias, vec![1.0, 1.0]);
        assert_eq!(stepped.weights, vec![0.5, 0.5]);
    }
}

//! Federated logistic regression through secure aggregation reaches the
//! discrimination of the same model trained on the pooled data.
//!
//! Three hospitals of different sizes and case mixes (a diabetes-onset risk
//! model on age, sex, BMI, fasting glucose, HbA1c, systolic pressure and
//! LDL). Every value a hospital sends (feature moments, weighted models)
//! goes through a secure aggregation round; the coordinator side only ever
//! decodes sums.

use ghx_learn::{Dataset, Model, Standardiser, TrainConfig, metrics};
use std::collections::BTreeMap;

use ghx_secagg::{RoundParams, decode, encode, sum_in_process};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Bernoulli, Distribution, Normal};

const FEATURES: usize = 7;

/// Synthetic patients of hospital `site` (0..3), with its own case mix.
fn hospital(site: usize, patients: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let shift = site as f64;
    let age = Normal::new(52.0 + 4.0 * shift, 12.0).unwrap();
    let sex = Bernoulli::new(0.45 + 0.05 * shift).unwrap();
    let bmi = Normal::new(24.0 + shift, 3.5).unwrap();
    let noise = Normal::new(0.0, 1.0).unwrap();
    let sbp = Normal::new(125.0 + 3.0 * shift, 15.0).unwrap();
    let ldl = Normal::new(115.0, 30.0).unwrap();
    let onset = Normal::new(0.0, 1.0).unwrap();
    let mut data = Dataset::new(FEATURES);
    for _ in 0..patients {
        let a = age.sample(&mut rng);
        let s = if sex.sample(&mut rng) { 1.0 } else { 0.0 };
        let b = bmi.sample(&mut rng);
        let latent = 0.04 * (a - 55.0) + 0.15 * (b - 25.0) + noise.sample(&mut rng);
        let glucose = 100.0 + 9.0 * latent + 6.0 * noise.sample(&mut rng);
        let hba1c = 5.7 + 0.35 * latent + 0.2 * noise.sample(&mut rng);
        let p = sbp.sample(&mut rng);
        let l = ldl.sample(&mut rng);
        let logit = -1.6
            + 0.025 * (a - 55.0)
            + 0.25 * s
            + 0.09 * (b - 25.0)
            + 0.03 * (glucose - 100.0)
            + 1.1 * (hba1c - 5.7)
            + 0.01 * (p - 125.0)
            + 0.002 * (l - 115.0)
            + 0.5 * onset.sample(&mut rng);
        let label = rng.r#gen::<f64>() < 1.0 / (1.0 + (-logit).exp());
        data.push(&[a, s, b, glucose, hba1c, p, l], label).unwrap();
    }
    data
}

/// One secure aggregation round over the hospitals' vectors: what the
/// coordinator learns is the decoded sum.
fn secure_sum(round: &str, vectors: &[Vec<f64>]) -> Vec<f64> {
    let inputs: BTreeMap<String, Vec<u64>> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("site-{i}"), encode(v).unwrap()))
        .collect();
    let params = RoundParams::new(round, inputs.keys().cloned(), 2, vectors[0].len()).unwrap();
    decode(&sum_in_process(&params, &inputs).unwrap().sum)
}

struct Setup {
    train: Vec<Dataset>,
    test: Dataset,
}

fn setup() -> Setup {
    let sizes = [9000, 6000, 3000];
    let mut train = Vec::new();
    let mut test = Dataset::new(FEATURES);
    for (site, &n) in sizes.iter().enumerate() {
        let (kept, held) = hospital(site, n, 100 + site as u64).split(5, 0);
        for i in 0..held.len() {
            test.push(held.row(i), held.label(i) > 0.5).unwrap();
        }
        train.push(kept);
    }
    // Standardise with the federation's moments, securely summed.
    let sums: Vec<Vec<f64>> = train.iter().map(Standardiser::local_sums).collect();
    let standardiser = Standardiser::from_sums(&secure_sum("moments", &sums)).unwrap();
    for d in &mut train {
        standardiser.apply(d);
    }
    standardiser.apply(&mut test);
    Setup { train, test }
}

fn pooled(train: &[Dataset]) -> Dataset {
    let mut all = Dataset::new(FEATURES);
    for d in train {
        for i in 0..d.len() {
            all.push(d.row(i), d.label(i) > 0.5).unwrap();
        }
    }
    all
}

fn federated(setup: &Setup, config: &TrainConfig, rounds: usize) -> Model {
    federated_from(Model::zeros(FEATURES), setup, config, rounds)
}

fn federated_from(start: Model, setup: &Setup, config: &TrainConfig, rounds: usize) -> Model {
    let mut global = start;
    let mut rngs: Vec<StdRng> = (0..setup.train.len())
        .map(|i| StdRng::seed_from_u64(7 + i as u64))
        .collect();
    for round in 0..rounds {
        let updates: Vec<Vec<f64>> = setup
            .train
            .iter()
            .zip(rngs.iter_mut())
            .map(|(data, rng)| {
                global
                    .train(data, config, rng)
                    .unwrap()
                    .weighted(data.len())
            })
            .collect();
        global = global
            .average_of(&secure_sum(&format!("round-{round}"), &updates))
            .unwrap();
    }
    global
}

/// Each round's local step: one epoch of mini-batch SGD.
fn one_epoch() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 64,
        learning_rate: 0.05,
        proximal_mu: 0.0,
        l2: 0.0,
    }
}

#[test]
fn fedavg_and_fedprox_reach_the_pooled_models_auc_within_0_005() {
    let setup = setup();
    let config = one_epoch();
    // The pooled model: the same optimiser, as many passes over all rows.
    let all = pooled(&setup.train);
    let mut rng = StdRng::seed_from_u64(1);
    let rounds = 30;
    let central = Model::zeros(FEATURES)
        .train(
            &all,
            &TrainConfig {
                epochs: rounds as u32,
                ..config.clone()
            },
            &mut rng,
        )
        .unwrap();
    let labels = setup.test.labels();
    let central_auc = metrics::auc(&central.predict_all(&setup.test), labels).unwrap();
    assert!(
        central_auc > 0.7,
        "the pooled model discriminates: {central_auc}"
    );

    let fedavg = federated(&setup, &config, rounds);
    let fedavg_auc = metrics::auc(&fedavg.predict_all(&setup.test), labels).unwrap();
    assert!(
        (fedavg_auc - central_auc).abs() < 0.005,
        "FedAvg AUC {fedavg_auc} vs pooled {central_auc}"
    );
    let fedprox = federated(
        &setup,
        &TrainConfig {
            proximal_mu: 0.01,
            ..config.clone()
        },
        rounds,
    );
    let fedprox_auc = metrics::auc(&fedprox.predict_all(&setup.test), labels).unwrap();
    assert!(
        (fedprox_auc - central_auc).abs() < 0.005,
        "FedProx AUC {fedprox_auc} vs pooled {central_auc}"
    );
    eprintln!(
        "AUC on {} held-out patients: pooled {central_auc:.4}, FedAvg {fedavg_auc:.4}, FedProx {fedprox_auc:.4}",
        setup.test.len()
    );
    // Training lowered the loss from the untrained model's log 2.
    assert!(fedavg.log_loss(&setup.test) < 0.69 * 0.9);
}

#[test]
fn a_federated_mlp_reaches_the_pooled_mlps_auc() {
    let setup = setup();
    let config = one_epoch();
    let rounds = 20;
    let start = Model::mlp(FEATURES, 8, &mut StdRng::seed_from_u64(21)).unwrap();
    let central = start
        .train(
            &pooled(&setup.train),
            &TrainConfig {
                epochs: rounds as u32,
                ..config.clone()
            },
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
    let labels = setup.test.labels();
    let central_auc = metrics::auc(&central.predict_all(&setup.test), labels).unwrap();
    let fedavg = federated_from(start.clone(), &setup, &config, rounds);
    assert_eq!(fedavg.param_count(), start.param_count());
    let fedavg_auc = metrics::auc(&fedavg.predict_all(&setup.test), labels).unwrap();
    let untrained_auc = metrics::auc(&start.predict_all(&setup.test), labels).unwrap();
    eprintln!(
        "MLP AUC: untrained {untrained_auc:.4}, pooled {central_auc:.4}, FedAvg {fedavg_auc:.4}"
    );
    assert!(
        central_auc > 0.7,
        "the pooled MLP discriminates: {central_auc}"
    );
    assert!(
        (fedavg_auc - central_auc).abs() < 0.005,
        "FedAvg MLP AUC {fedavg_auc} vs pooled {central_auc}"
    );
}

#[test]
fn an_untrained_model_does_not_pass_the_same_bar() {
    // The comparison above can fail: a model trained for one round on one
    // small hospital only is measurably worse than the pooled one.
    let setup = setup();
    let config = TrainConfig {
        epochs: 1,
        batch_size: 512,
        learning_rate: 0.01,
        proximal_mu: 0.0,
        l2: 0.0,
    };
    let mut rng = StdRng::seed_from_u64(3);
    let weak = Model::zeros(FEATURES)
        .train(&setup.train[2], &config, &mut rng)
        .unwrap();
    let all = pooled(&setup.train);
    let strong = Model::zeros(FEATURES)
        .train(
            &all,
            &TrainConfig {
                epochs: 30,
                batch_size: 64,
                learning_rate: 0.05,
                ..config
            },
            &mut rng,
        )
        .unwrap();
    let labels = setup.test.labels();
    let weak_auc = metrics::auc(&weak.predict_all(&setup.test), labels).unwrap();
    let strong_auc = metrics::auc(&strong.predict_all(&setup.test), labels).unwrap();
    assert!(strong_auc - weak_auc > 0.005, "{weak_auc} vs {strong_auc}");
}

#[test]
fn bad_settings_and_rows_are_named() {
    let mut data = Dataset::new(2);
    assert_eq!(
        data.push(&[1.0], true).unwrap_err().to_string(),
        "row 0 has 1 features, the model has 2"
    );
    assert_eq!(
        data.push(&[1.0, f64::INFINITY], true)
            .unwrap_err()
            .to_string(),
        "feature 1 is not a finite number in row 0"
    );
    let config = TrainConfig {
        epochs: 1,
        batch_size: 8,
        learning_rate: -1.0,
        proximal_mu: 0.0,
        l2: 0.0,
    };
    let err = Model::zeros(2)
        .train(&data, &config, &mut StdRng::seed_from_u64(0))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "training setting learning_rate is -1; expected in (0, 10]"
    );
    assert_eq!(
        Model::zeros(1).average_of(&[1.0, 2.0, 0.0]).unwrap_err(),
        ghx_learn::Error::NoSamples(0.0)
    );
}

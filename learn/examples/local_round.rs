//! Times a node's computation in one logistic-regression training round,
//! by part: `cargo run --release -p ghx-learn --example local_round`.
//!
//! The rows are synthetic (uniform features, labels drawn from a known
//! logistic model), sized like one node of `ghx bench-train --patients
//! 50000`: 31,000 training and 7,700 held-out rows of 5 features; SGD
//! with batch 32, one epoch, as the example study trains. Each part is
//! run in 7 blocks of 100 calls and the fastest block's mean is printed,
//! which is what the machine can do when nothing else runs. A training
//! round's contribution is the SGD epoch alone; the loss and the held-out
//! evaluation are timed for comparison (an evaluation is a round of its
//! own).

use std::time::Instant;

use ghx_learn::federated::{self, EvaluationSums};
use ghx_learn::{Dataset, Model, TrainConfig};
use rand::{Rng, SeedableRng};

const DIM: usize = 5;

fn rows(n: usize, rng: &mut impl Rng) -> Dataset {
    let mut data = Dataset::new(DIM);
    for _ in 0..n {
        let row: Vec<f64> = (0..DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let z: f64 = row
            .iter()
            .enumerate()
            .map(|(j, x)| x * (j as f64 - 2.0))
            .sum::<f64>()
            - 1.0;
        let y = rng.r#gen::<f64>() < 1.0 / (1.0 + (-z).exp());
        data.push(&row, y)
            .expect("finite rows of the model's width");
    }
    data
}

/// Fastest mean over 7 blocks of 100 calls, µs.
fn best(mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..100 {
                f();
            }
            started.elapsed().as_secs_f64() / 100.0 * 1e6
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let train = rows(31_000, &mut rng);
    let holdout = rows(7_700, &mut rng);
    let config = TrainConfig {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
        proximal_mu: 0.0,
        l2: 0.0,
    };
    // A model some rounds in, as most rounds start from.
    let mut global = Model::zeros(DIM);
    for _ in 0..20 {
        global = global
            .train(&train, &config, &mut rng)
            .expect("valid settings");
    }
    let mut sink = 0.0;
    let train_us = best(|| {
        sink += global
            .train(&train, &config, &mut rng)
            .expect("valid settings")
            .bias
    });
    let loss_us = best(|| sink += global.log_loss(&train));
    let eval_us = best(|| sink += EvaluationSums::of(&global, &holdout).rows);
    let round_us = best(|| {
        sink += federated::training_contribution(&global, &train, &config, &mut rng)
            .expect("valid settings")[0]
    });
    println!(
        "one node's training round on {} rows ({} held out), best of 7 x 100 calls:",
        train.len(),
        holdout.len()
    );
    println!("  SGD epoch                  {train_us:8.0} us");
    println!("  training loss of the model {loss_us:8.0} us");
    println!("  held-out evaluation        {eval_us:8.0} us");
    println!("  whole contribution         {round_us:8.0} us (the epoch, weighted)");
    std::hint::black_box(sink);
}

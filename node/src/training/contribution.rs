//! One round's contribution from this node's rows: moments, a trained
//! model's weighted update or an evaluation's sums, refused when groups
//! are smaller than the cell size; and the seed a round's noise is drawn
//! from.

pub(super) use ghx_learn::federated::Phase;
use ghx_learn::federated::{self, EvaluationSums, Metrics};
use ghx_study::training::{ModelDocument, TrainingSpec};
use sha2::{Digest, Sha256};

use super::Error;
use super::extract::{Extracted, Standardised, train_config};

/// What step 3 computed.
pub struct Contribution {
    pub values: Vec<f64>,
    /// This node's own metrics, for an evaluation with enough held out.
    pub metrics: Option<Metrics>,
}

/// Refuses rows too few for the cell size: training or held-out rows, or
/// either class of the training rows.
pub fn check_enough(data: &Extracted, min_cell_size: u32) -> Result<(), Error> {
    let min = min_cell_size as usize;
    let positives = data.positives();
    let short: Vec<&'static str> = [
        ("training rows", data.train.len()),
        ("held-out rows", data.holdout.len()),
        ("training rows with the label", positives),
        ("training rows without it", data.train.len() - positives),
    ]
    .into_iter()
    .filter(|(_, n)| *n < min)
    .map(|(what, _)| what)
    .collect();
    if !short.is_empty() {
        return Err(Error::TooFew {
            short,
            min: min_cell_size,
        });
    }
    Ok(())
}

/// Computes this node's contribution to a round from `model` (none for
/// the moments), standardising rows through `standardised` (kept with the
/// round or session). A run's round draws its randomness (the shuffle, a
/// noised round's noise) from `seed` ([`round_seed`]), so a round redone
/// from the same lineage step gives the same contribution and a
/// coordinator that redoes it learns nothing new; other rounds draw from
/// the operating system.
pub fn contribution(
    phase: Phase,
    spec: &TrainingSpec,
    (data, standardised): (&Extracted, &Standardised),
    (model, seed): (Option<&ModelDocument>, Option<[u8; 32]>),
    min_cell_size: u32,
    validation: Option<f64>,
) -> Result<Contribution, Error> {
    // A noised validation needs no floor: a refusal that turned on exact
    // counts would say, near the floor, what the noise hides.
    if validation.is_none() {
        check_enough(data, min_cell_size)?;
    }
    if phase == Phase::Moments {
        return Ok(Contribution {
            values: federated::moments_contribution(&data.train),
            metrics: None,
        });
    }
    let model = model.ok_or(Error::ModelShape)?;
    let global = model.model();
    if phase == Phase::Evaluate {
        let holdout = standardised.holdout(data, model);
        let mut sums = EvaluationSums::of(&global, &holdout);
        // Each count noised here (sensitivity 1), before masking: an
        // external validation's model is the requester's to choose, and a
        // run's is summed in bins the coordinator sees before merging. A
        // run's evaluation draws from the run's seed, so a redo releases
        // the same noised counts (charged once).
        if let Some(epsilon) = validation {
            let mut rng = match seed {
                Some(seed) => {
                    use rand::SeedableRng;
                    rand::rngs::StdRng::from_seed(seed)
                }
                None => os_seeded()?,
            };
            sums = sums.noised(ghx_learn::evaluation::NOISED_SCORE_BINS, || {
                ghx_learn::noise::two_sided_geometric(epsilon, &mut rng) as f64
            });
        }
        // No metrics of this node's own beside the sum: the pooled figures
        // less the other nodes' would be this node's, in bins the pooled
        // merge made for more patients than it holds (a crafted model can
        // line every node's bins up), so a bin of a few of its patients.
        return Ok(Contribution {
            values: sums.to_vec(),
            metrics: None,
        });
    }
    // Nodes sum parameter vectors of the training's shape.
    if !model.is_shaped_for(spec) {
        return Err(Error::ModelShape);
    }
    let train = standardised.train(data, model);
    // One generator per round: a cryptographic generator (ChaCha12) for
    // the noise, and no system call per shuffled row, which drawing from
    // the OS directly cost.
    let mut rng = match seed {
        Some(seed) => {
            use rand::SeedableRng;
            rand::rngs::StdRng::from_seed(seed)
        }
        None => os_seeded()?,
    };
    let values = match &spec.privacy {
        // Clipped, noised gradients; the node charges the round before
        // releasing it.
        Some(privacy) => federated::private_training_contribution(
            &global,
            &train,
            privacy.clip,
            privacy.noise_std(),
            &mut rng,
        )?,
        None => federated::training_contribution(&global, &train, &train_config(spec), &mut rng)?,
    };
    Ok(Contribution {
        values,
        metrics: None,
    })
}

/// The seed of a run's round at this node: a keyed hash of the lineage
/// head the round computes from, its number and the digest of the rows it
/// trains on ([`Extracted::digest`]), under the run's `secret`, drawn here
/// from the operating system and kept in the node's database (not the
/// node's private key, which whoever issued it may hold). The coordinator
/// can neither predict nor vary it: a redo from the same step draws the
/// same, so gives the same sum, across restarts too.
pub fn round_seed(
    secret: &[u8; 32],
    parent: &ghx_study::lineage::Head,
    round: u32,
    rows: &[u8; 32],
) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"ghx-round-seed/v2\0")
        .chain_update(secret)
        .chain_update(parent)
        .chain_update(round.to_be_bytes())
        .chain_update(rows)
        .finalize()
        .into()
}

/// A generator seeded from the operating system: a cryptographic one
/// (ChaCha12), with no system call per draw.
pub(super) fn os_seeded() -> Result<rand::rngs::StdRng, Error> {
    use rand::SeedableRng;
    rand::rngs::StdRng::from_rng(rand::rngs::OsRng).map_err(|e| Error::Random(e.to_string()))
}

//! A training run's record: its status, rounds, model and evaluation
//! (aggregates only), saved after every round.

use super::timing::{AnswerSplit, StepTimes};
use std::collections::BTreeMap;

use ghx_learn::federated::Metrics;
use ghx_study::lineage;
use ghx_study::result::NodeFailure;
use ghx_study::training::{ModelDocument, TrainingSpec};
use serde::{Deserialize, Serialize};

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
        }
    }
}

/// One completed training round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 1-based.
    pub round: u32,
    pub contributors: Vec<String>,
    /// Nodes left out of this round, and why.
    pub failures: Vec<NodeFailure>,
    pub train_rows: u64,
    /// Mean training log loss of the model the round started from, in
    /// records from before rounds stopped carrying it: a loss summed over
    /// patients lets whoever chooses the model read one patient's label
    /// (`ghx_learn::federated`). The run's evaluation is a round of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// The model the round started from, on the pooled held-out rows; in
    /// records from before, as `train_loss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<Metrics>,
    /// Wall time of the round on the run's critical path: from the end of
    /// the step before (its state then saved) to this round's model.
    pub seconds: f64,
    /// The slowest node's local computation.
    pub local_seconds: f64,
    /// Time in the round during which at least one node was computing: the
    /// union of the nodes' computations on the coordinator's time line (see
    /// [`Computation`]). At least `local_seconds`; more when the nodes
    /// computed at different times (or shared cores and waited). 0 in
    /// records from before it was kept.
    #[serde(default)]
    pub busy_seconds: f64,
    /// Wall time at the coordinator, ms, of: opening the run's session on
    /// the round's path (0 when it was opened while the step before
    /// computed, or was already open; otherwise after a restart, a dropped
    /// node or an expiring capability), the masked input (the nodes' local
    /// computation included; with any redone attempt), unmasking (none in a
    /// session) and the rest of the round's time (the state of the round
    /// before read for saving, the study's check started, waiting for
    /// what is prepared ahead, the sum read into the new model).
    #[serde(default)]
    pub steps_ms: StepTimes,
    /// Where the answer that ended the round (the last node's) spent its
    /// time, ms (see [`AnswerTimes`]). Zeros in records from before it was
    /// kept, and for rounds outside a session: those end with an unmasking
    /// step, whose answers carry no such times.
    #[serde(default)]
    pub last_answer_ms: AnswerSplit,
    /// Whether the round found its session open (keys agreed off the
    /// round's path).
    #[serde(default)]
    pub keys_ahead: bool,
    /// The global logistic model after the round (standardised features).
    /// Empty for an MLP: the record is saved whole after every round, and
    /// keeping every round's MLP would grow it by a whole model each round
    /// (up to 64 x 66 + 1 parameters); the run's `model` is the latest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<f64>,
    #[serde(default)]
    pub bias: f64,
}

/// A model's evaluation, pooled and per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The pooled metrics as released to the requester ([`EvaluationSums::disclosed`]
    /// at the study's largest cell size); none when the pooled held-out
    /// positives or negatives are fewer.
    pub pooled: Option<Metrics>,
    /// Each node's own metrics on its held-out rows, in records from
    /// before nodes stopped releasing them beside the pooled ones (the
    /// pooled less the others' were one node's, in bins of a few of its
    /// patients); empty now.
    pub per_node: BTreeMap<String, Metrics>,
    pub contributors: Vec<String>,
    pub failures: Vec<NodeFailure>,
    /// How the nodes noised it; none: exact (records from before every
    /// evaluation was noised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<EvaluationNoise>,
}

/// The noise of an evaluation, as the requester should read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationNoise {
    /// Charged at each node that contributed.
    pub epsilon: f64,
    /// Bins of predicted probability the nodes counted in.
    pub bins: usize,
    /// Standard deviation of the noise on each pooled count (every node
    /// adds its own).
    pub pooled_sd: f64,
}

/// A run's whole state: aggregates only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub run_id: String,
    pub study_id: String,
    pub training: String,
    pub status: RunStatus,
    pub detail: String,
    pub rounds_total: u32,
    pub started_at: String,
    /// The global model so far (after the moments round: the initial one).
    pub model: Option<ModelDocument>,
    /// Feature rows the moments round pooled.
    pub moments_rows: u64,
    pub rounds: Vec<RoundRecord>,
    pub evaluation: Option<Evaluation>,
    /// How many times a coordinator restart resumed this run.
    pub resumed: u32,
    /// The evidence of the run's last summed round (the members' signed
    /// masked inputs), sent with the next round: each node moves its own
    /// lineage by it and never takes a model from the coordinator. None
    /// before the moments, and in records from before nodes kept lineage
    /// (such runs cannot resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<lineage::Evidence>,
}

impl TrainingRecord {
    pub fn new(run_id: &str, study_id: &str, spec: &TrainingSpec, started_at: &str) -> Self {
        TrainingRecord {
            run_id: run_id.to_owned(),
            study_id: study_id.to_owned(),
            training: spec.name.clone(),
            status: RunStatus::Running,
            detail: String::new(),
            rounds_total: spec.rounds,
            started_at: started_at.to_owned(),
            model: None,
            moments_rows: 0,
            rounds: Vec::new(),
            evaluation: None,
            resumed: 0,
            lineage: None,
        }
    }

    /// What a step may change in this record, as it is now: a step whose
    /// outcome may not be kept is undone with [`Self::undo_step`].
    pub fn before_step(&self) -> BeforeStep {
        BeforeStep {
            status: self.status,
            model: self.model.clone(),
            moments_rows: self.moments_rows,
            rounds: self.rounds.len(),
            evaluation: self.evaluation.clone(),
            lineage: self.lineage.clone(),
        }
    }

    /// Puts back what a step changed ([`advance`] adds a round, replaces
    /// the model, sets the moments rows or the evaluation and status).
    pub fn undo_step(&mut self, before: BeforeStep) {
        self.status = before.status;
        self.model = before.model;
        self.moments_rows = before.moments_rows;
        self.rounds.truncate(before.rounds);
        self.evaluation = before.evaluation;
        self.lineage = before.lineage;
    }
}

/// A [`TrainingRecord`]'s parts that a step changes, as they were before it.
pub struct BeforeStep {
    status: RunStatus,
    model: Option<ModelDocument>,
    moments_rows: u64,
    rounds: usize,
    evaluation: Option<Evaluation>,
    lineage: Option<lineage::Evidence>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghx_learn::federated::EvaluationSums;
    use ghx_study::manifest::StudyManifest;

    #[test]
    fn an_undone_step_leaves_the_record_as_it_was() {
        use rand::SeedableRng;
        let manifest = StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let n = spec.features.len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let model = |mean: f64, rng: &mut rand::rngs::StdRng| {
            let initial = spec.initial_model(rng).unwrap();
            ModelDocument::new(spec, &vec![mean; n], &vec![1.0; n], &initial)
        };
        let metrics = EvaluationSums::from_vec(&vec![1.0; EvaluationSums::LEN])
            .unwrap()
            .metrics();
        let round = |number: u32| RoundRecord {
            round: number,
            contributors: vec!["a".to_owned(), "b".to_owned()],
            failures: Vec::new(),
            train_rows: 100,
            train_loss: None,
            holdout: None,
            seconds: 0.003,
            local_seconds: 0.002,
            busy_seconds: 0.002,
            steps_ms: StepTimes {
                open_ms: 0.0,
                masked_ms: 2.5,
                unmask_ms: 0.0,
                rest_ms: 0.5,
            },
            last_answer_ms: AnswerSplit {
                outside_ms: 0.2,
                before_ms: 0.1,
                after_ms: 0.2,
            },
            keys_ahead: true,
            weights: vec![0.1; n],
            bias: 0.0,
        };
        let mut record = TrainingRecord::new("run-1", "study-1", spec, "2026-12-04T00:00:00Z");
        // Undoing the moments step takes the initial model away again.
        let before = record.before_step();
        record.model = Some(model(0.0, &mut rng));
        record.moments_rows = 100;
        record.undo_step(before);
        assert_eq!(
            record,
            TrainingRecord::new("run-1", "study-1", spec, "2026-12-04T00:00:00Z")
        );
        // A training round and the evaluation: their round, model,
        // evaluation and status go.
        record.model = Some(model(0.0, &mut rng));
        record.moments_rows = 100;
        record.rounds.push(round(1));
        let kept = record.clone();
        let before = record.before_step();
        record.rounds.push(round(2));
        record.model = Some(model(0.5, &mut rng));
        record.evaluation = Some(Evaluation {
            pooled: Some(metrics.clone()),
            per_node: BTreeMap::new(),
            contributors: vec!["a".to_owned()],
            failures: Vec::new(),
            noise: None,
        });
        record.status = RunStatus::Completed;
        record.undo_step(before);
        assert_eq!(record, kept);
    }
}

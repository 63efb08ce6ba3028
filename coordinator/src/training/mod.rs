//! Federated training runs: the coordinator drives rounds of secure
//! aggregation across the nodes and keeps the run's state.
//!
//! A run is one secure-aggregation session ([`session`]): its round
//! 0 is the moments (pooled feature means and standard deviations for
//! standardisation), its rounds 1 to R the training's (each node trains
//! from the model its own lineage reached; the coordinator receives only
//! the sum of the sample-weighted local models and averages it); then an
//! evaluation round of the final model, noised at each node, when the
//! training declares `validation.epsilon`. The coordinator learns only
//! sums.
//!
//! The evaluation rounds (a run's and external validations) are one-off
//! secure-aggregation rounds: the coordinator relays keys and encrypted
//! shares and learns only the sum of the contributions of the nodes that
//! completed it. A round's first two steps (keys, [`agree_keys`]) need no
//! model, so they run while the step before computes; its last two
//! ([`complete_round`]) carry the model and return the sum. Such a round
//! needs the training's quorum of nodes at every step and is unmasked
//! only with every node it was keyed with (nodes refuse less,
//! `ghx_node::participants`); a node that is down, refuses or misses a
//! step's deadline is named, and the round is redone among the nodes left
//! ([`Error::Dropped`]), which the nodes accept only if that set is the
//! study's (with three hospitals and the default minimum, the run stops).
//!
//! The session's rounds take one message per node per round, on the
//! node's stream for the session, the critical path of a round being the
//! slowest node's local step and one trip. A member missing from a session
//! round is named, and the round is redone in a new session among the
//! members that answered (again, if the nodes accept that set); a session missing registered nodes invites them
//! again every [`REJOIN_EVERY`] rounds. A step that fails is retried; after [`ATTEMPTS`] failures the
//! run fails with the reason. Nodes sign the keys they advertise and check
//! each other's signatures, so the coordinator can only relay them.
//!
//! The run's state ([`TrainingRecord`]: aggregates only) is saved after
//! every completed round (each round its own row, so a save does not grow
//! with the rounds before it), so a coordinator that restarts resumes a
//! running run from its last completed round.

pub mod driver;
mod protocol;
mod record;
mod run;
mod session;
mod timing;

pub use protocol::{ATTEMPTS, Error, Federation};
pub use record::{BeforeStep, Evaluation, EvaluationNoise, RoundRecord, RunStatus, TrainingRecord};
pub use run::{Pipeline, advance, validate};
pub use timing::{AnswerSplit, AnswerTimes, Computation, StepTimes};

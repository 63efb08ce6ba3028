//! The services' metrics. Instruments come from the global meter provider,
//! which [`crate::Telemetry::install`] sets when exporting; otherwise they
//! record nothing. Attributes are kinds and outcomes, never identifiers of
//! patients.

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

fn meter() -> Meter {
    opentelemetry::global::meter("ghx")
}

/// A node answered or refused a request of `kind` (`aggregate`,
/// `training`, `revoke`) in `seconds`; a refusal names its `reason` kind
/// (`capability`, `policy`, `budget`, ...).
pub fn node_request(kind: &str, refusal: Option<&str>, seconds: f64) {
    let meter = meter();
    let decision = if refusal.is_some() {
        "refused"
    } else {
        "answered"
    };
    let attributes = [
        KeyValue::new("kind", kind.to_owned()),
        KeyValue::new("decision", decision),
    ];
    meter
        .u64_counter("ghx.node.requests")
        .with_description("Requests a node decided, by kind and decision")
        .build()
        .add(1, &attributes);
    meter
        .f64_histogram("ghx.node.request.duration")
        .with_unit("s")
        .with_description("Time a node took to decide and answer a request")
        .build()
        .record(seconds, &attributes);
    if let Some(reason) = refusal {
        refusal_counted("node", kind, reason);
    }
}

/// The coordinator ran a study query over the federation: `outcome` is
/// `complete` (every node answered), `partial` or `failed`.
pub fn federated_query(outcome: &'static str, seconds: f64) {
    meter()
        .f64_histogram("ghx.coordinator.query.duration")
        .with_unit("s")
        .with_description("Time from a requester's RunStudy to the combined result")
        .build()
        .record(seconds, &[KeyValue::new("outcome", outcome)]);
}

/// The coordinator refused a request of `kind` for `reason` (a kind, such
/// as `not_approved`, never free text).
pub fn coordinator_refusal(kind: &str, reason: &str) {
    refusal_counted("coordinator", kind, reason);
}

/// A training round ended: `outcome` is `completed` or `failed`.
pub fn training_round(phase: &'static str, outcome: &'static str, seconds: f64) {
    let meter = meter();
    let attributes = [
        KeyValue::new("phase", phase),
        KeyValue::new("outcome", outcome),
    ];
    meter
        .u64_counter("ghx.training.rounds")
        .with_description("Training rounds the coordinator ran, by phase and outcome")
        .build()
        .add(1, &attributes);
    meter
        .f64_histogram("ghx.training.round.duration")
        .with_unit("s")
        .with_description("Wall time of one secure-aggregation round")
        .build()
        .record(seconds, &attributes);
}

fn refusal_counted(service: &'static str, kind: &str, reason: &str) {
    meter()
        .u64_counter("ghx.refusals")
        .with_description("Requests refused, by service, request kind and reason kind")
        .build()
        .add(
            1,
            &[
                KeyValue::new("service", service),
                KeyValue::new("kind", kind.to_owned()),
                KeyValue::new("reason", reason.to_owned()),
            ],
        );
}

//! Audit entries as FHIR R4 AuditEvent resources, one JSON object per line
//! (NDJSON), for hospitals' and the city's own audit repositories.
//!
//! Every event is checked against the fhir-model R4 AuditEvent type before it
//! is written, so an export never carries a resource a FHIR server would
//! reject. The chain hash rides along in `entity.detail`, so an exported event
//! can be matched back to the log it came from.

use fhir_model::r4b::resources::AuditEvent;
use serde_json::{Value, json};

use crate::Entry;

/// Errors exporting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("entry {seq} does not make a valid FHIR R4 AuditEvent: {reason}")]
    Invalid { seq: i64, reason: String },
}

/// DICOM audit event types (DCM) that fit ghx actions.
fn event_type(action: &str) -> (&'static str, &'static str) {
    if crate::action::is_query(action) {
        ("110112", "Query")
    } else {
        ("110100", "Application Activity")
    }
}

/// AuditEvent.outcome: 0 success, 4 minor failure (refused), 8 serious failure.
fn outcome(decision: &str) -> &'static str {
    match crate::Decision::parse(decision) {
        Some(crate::Decision::Refused) => "4",
        Some(crate::Decision::Failed) => "8",
        // An unknown decision is a failure to say what happened.
        None => "8",
        Some(crate::Decision::Answered | crate::Decision::Done | crate::Decision::Revoked) => "0",
    }
}

/// One entry as an AuditEvent of `keeper`'s log.
pub fn audit_event(keeper: &str, entry: &Entry) -> Result<Value, Error> {
    let (code, display) = event_type(&entry.action);
    let mut agents = vec![json!({
        "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
            "code": "humanuser",
            "display": "human user"
        }]},
        "who": {"identifier": {"system": "urn:ghx:certificate-cn", "value": entry.caller}},
        "name": format!("{} ({})", entry.caller, entry.caller_role),
        "requestor": entry.requester.is_empty(),
    })];
    if !entry.caller_org.is_empty() {
        agents[0]["who"]["display"] = json!(entry.caller_org);
    }
    if !entry.source.is_empty() {
        agents[0]["network"] = json!({"address": entry.source, "type": "2"});
    }
    if !entry.requester.is_empty() {
        agents.push(json!({
            "who": {
                "identifier": {"system": "urn:ghx:certificate-cn", "value": entry.requester},
                "display": entry.requester_org
            },
            "requestor": true,
        }));
    }
    if !entry.peer.is_empty() {
        agents.push(json!({
            "who": {"identifier": {"system": "urn:ghx:node", "value": entry.peer}},
            "name": "node the request was sent to",
            "requestor": false,
        }));
    }
    let mut details = vec![
        json!({"type": "seq", "valueString": entry.seq.to_string()}),
        json!({"type": "hash", "valueString": entry.hash}),
        json!({"type": "prev-hash", "valueString": entry.prev_hash}),
    ];
    let mut detail = |name: &str, value: &str| {
        if !value.is_empty() {
            details.push(json!({"type": name, "valueString": value}));
        }
    };
    detail("capability", &entry.capability_id);
    detail("query-sha256", &entry.query_sha256);
    detail("result-sha256", &entry.result_sha256);
    detail("policy", &entry.policy_reasons);
    if entry.result_cells > 0 {
        detail("result-cells", &entry.result_cells.to_string());
    }
    if entry.consent_excluded > 0 {
        detail("consent-excluded", &entry.consent_excluded.to_string());
    }
    if entry.epsilon > 0.0 {
        detail("epsilon", &entry.epsilon.to_string());
    }
    let mut study = json!({
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object"
        },
        "name": format!("ghx {}", entry.action),
        "detail": details,
    });
    if !entry.study_id.is_empty() {
        study["what"] = json!({"identifier": {"system": "urn:ghx:study", "value": entry.study_id}});
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("{}-{}", sanitise_id(keeper), entry.seq),
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display},
        "subtype": [{"system": "urn:ghx:audit-action", "code": entry.action}],
        "action": "E",
        "recorded": entry.at,
        "outcome": outcome(&entry.decision),
        "agent": agents,
        "source": {
            "observer": {"identifier": {"system": "urn:ghx:keeper", "value": keeper}, "display": keeper},
            "type": [{
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server"
            }]
        },
        "entity": [study],
    });
    let description = match entry.reason.as_str() {
        "" => entry.decision.clone(),
        reason => format!("{}: {reason}", entry.decision),
    };
    if !description.is_empty() {
        event["outcomeDesc"] = json!(description);
    }
    if !entry.purpose.is_empty() {
        event["purposeOfEvent"] = json!([{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
            "code": entry.purpose
        }]}]);
    }
    serde_json::from_value::<AuditEvent>(event.clone()).map_err(|e| Error::Invalid {
        seq: entry.seq,
        reason: e.to_string(),
    })?;
    Ok(event)
}

/// FHIR ids allow letters, digits, `-` and `.`.
fn sanitise_id(keeper: &str) -> String {
    keeper
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The entries recorded in `[from, to)` (RFC 3339 strings compared as
/// instants), as NDJSON lines.
pub fn export_ndjson(
    keeper: &str,
    entries: &[Entry],
    from: Option<time::OffsetDateTime>,
    to: Option<time::OffsetDateTime>,
) -> Result<(String, usize), Error> {
    let mut out = String::new();
    let mut count = 0;
    for entry in entries {
        if !in_period(&entry.at, from, to) {
            continue;
        }
        let event = audit_event(keeper, entry)?;
        out.push_str(&event.to_string());
        out.push('\n');
        count += 1;
    }
    Ok((out, count))
}

/// Whether `at` falls in `[from, to)`; an unreadable time is always included
/// (it is the verifier's job to flag it, not the exporter's to hide it).
pub fn in_period(
    at: &str,
    from: Option<time::OffsetDateTime>,
    to: Option<time::OffsetDateTime>,
) -> bool {
    let Ok(at) = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
    else {
        return true;
    };
    from.is_none_or(|f| at >= f) && to.is_none_or(|t| at < t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_valid_audit_events() {
        let mut entry = Entry {
            at: "2026-11-29T10:00:00Z".into(),
            caller: "coordinator".into(),
            caller_role: "coordinator".into(),
            caller_org: "G-Health".into(),
            source: "127.0.0.1:50000".into(),
            requester: "alice".into(),
            requester_org: "Gwangju Health Startup".into(),
            study_id: "s-1".into(),
            capability_id: "cap-1".into(),
            action: "aggregate".into(),
            decision: "answered".into(),
            reason: "0 cells suppressed".into(),
            purpose: "HRESCH".into(),
            query_sha256: "ab".repeat(32),
            result_cells: 4,
            consent_excluded: 2,
            ..Entry::default()
        };
        entry.chain(1, crate::GENESIS);
        let event = audit_event("chonnam", &entry).unwrap();
        assert_eq!(event["id"], "chonnam-1");
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["agent"][1]["who"]["identifier"]["value"], "alice");
        assert_eq!(event["purposeOfEvent"][0]["coding"][0]["code"], "HRESCH");
        let (ndjson, n) = export_ndjson("chonnam", &[entry.clone()], None, None).unwrap();
        assert_eq!((n, ndjson.lines().count()), (1, 1));

        let refused = Entry {
            decision: "refused".into(),
            ..entry
        };
        assert_eq!(audit_event("chonnam", &refused).unwrap()["outcome"], "4");
    }

    #[test]
    fn the_period_is_half_open() {
        let t = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let (from, to) = (
            Some(t("2026-11-01T00:00:00Z")),
            Some(t("2026-12-01T00:00:00Z")),
        );
        assert!(in_period("2026-11-01T00:00:00Z", from, to));
        assert!(!in_period("2026-12-01T00:00:00Z", from, to));
        assert!(!in_period("2026-10-31T23:59:59Z", from, to));
    }
}

//! The gate: decides whether a request may reach the engine at all.
//!
//! A request passes only when the caller's certificate says it is the
//! coordinator, the capability verifies against the coordinator's pinned key
//! for this node and exactly these query bytes, and the query is valid.

use ghx_pki::{PeerIdentity, Role};
use ghx_study::{capability, query};

/// Why the gate refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("caller `{name}` has role {role}; only the coordinator may run queries")]
    NotCoordinator { name: String, role: Role },
    #[error(transparent)]
    Capability(#[from] capability::Error),
    #[error(transparent)]
    Query(#[from] query::Error),
}

/// What the gate let through.
#[derive(Debug)]
pub struct Admitted {
    pub claims: capability::Claims,
    pub spec: query::QuerySpec,
}

/// Checks caller, capability and query, in that order.
pub fn admit(
    verifier: &capability::Verifier,
    caller: &PeerIdentity,
    token: &str,
    query_json: &[u8],
) -> Result<Admitted, Error> {
    if caller.role != Role::Coordinator {
        return Err(Error::NotCoordinator {
            name: caller.name.clone(),
            role: caller.role,
        });
    }
    let claims = verifier.verify(token, query_json)?;
    let spec = query::QuerySpec::parse(query_json)?;
    Ok(Admitted { claims, spec })
}

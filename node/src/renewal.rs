//! Keeps the node's own short-lived certificate renewed, so that nothing is
//! copied by hand: when less than a third of the certificate's life is left,
//! the node sends the coordinator a signing request for its current key
//! (`RenewCertificate`, over mTLS with the certificate it still has), checks
//! what comes back (the federation CA issued it, it names this node, it is
//! for this node's key), writes it over the certificate file atomically and
//! presents it from the next connection on.
//!
//! The key pair stays the same, so the audit checkpoints this node signed
//! stay verifiable with the renewed certificate.

use std::path::PathBuf;
use std::time::Duration;

use ghx_pki::transport::{LiveIdentity, Transport};
use ghx_proto::v1 as pb;
use ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tonic::transport::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate: {0}")]
    Pki(#[from] ghx_pki::Error),
    #[error("coordinator address `{0}` must be https://host:port")]
    Address(String),
    #[error("reaching the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the coordinator refused to renew: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the renewed certificate names `{got}`, not this node `{expected}`")]
    WrongHolder { got: String, expected: String },
}

/// Where and how often renewal looks.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub node_id: String,
    /// The coordinator's gRPC address, `https://host:port`.
    pub coordinator: String,
    /// The name the coordinator's certificate carries.
    pub server_name: String,
    /// The certificate file the node was configured with.
    pub cert_path: PathBuf,
    pub every: Duration,
}

/// Whether a certificate valid from `not_before` to `not_after` is due for
/// renewal at `now`: in the last third of its life.
pub fn due(
    (not_before, not_after): (time::OffsetDateTime, time::OffsetDateTime),
    now: time::OffsetDateTime,
) -> bool {
    not_after - now < (not_after - not_before) / 3
}

/// Looks every `renewal.every` and renews when due; runs until aborted.
pub async fn keep_renewed(renewal: Renewal, transport: Transport) {
    let mut every = tokio::time::interval(renewal.every);
    loop {
        every.tick().await;
        let current = transport.identity().current_pem();
        let Ok(validity) = ghx_pki::readiness::validity(&current.cert_pem) else {
            continue;
        };
        if !due(validity, time::OffsetDateTime::now_utc()) {
            continue;
        }
        match renew(&renewal, &transport).await {
            Ok(expires) => tracing::info!(%expires, "renewed this node's certificate"),
            Err(e) => tracing::warn!(
                error = %e,
                expires = %validity.1,
                "could not renew this node's certificate; trying again"
            ),
        }
    }
}

/// Renews once, now. Returns the new expiry.
pub async fn renew(
    renewal: &Renewal,
    transport: &Transport,
) -> Result<time::OffsetDateTime, Error> {
    let current = transport.identity().current_pem();
    let request = ghx_pki::signing_request(&renewal.node_id, &current.key_pem)?;
    let address = renewal
        .coordinator
        .strip_prefix("https://")
        .ok_or_else(|| Error::Address(renewal.coordinator.clone()))?;
    // TLS is the connector's; tonic sees plain HTTP/2.
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|_| Error::Address(renewal.coordinator.clone()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect_with_connector(transport.connector(&renewal.server_name))
        .await?;
    let cert_pem = CoordinatorServiceClient::new(channel)
        .renew_certificate(pb::RenewCertificateRequest { csr_pem: request })
        .await?
        .into_inner()
        .cert_pem;
    // Usable with this node's key, issued by the federation CA, for us.
    let renewed = ghx_pki::CertifiedKey {
        cert_pem,
        key_pem: current.key_pem,
    };
    LiveIdentity::fixed(transport.identity().ca_pem(), renewed.clone())?;
    let holder = ghx_pki::verify_member(transport.identity().ca_pem(), &renewed.cert_pem)?;
    if holder.name != renewal.node_id {
        return Err(Error::WrongHolder {
            got: holder.name,
            expected: renewal.node_id.clone(),
        });
    }
    ghx_pki::replace_file(&renewal.cert_path, &renewed.cert_pem, 0o644)?;
    transport.identity().reload()?;
    Ok(ghx_pki::readiness::expires_at(&renewed.cert_pem)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_in_the_last_third_of_a_certificate_s_life() {
        let start = time::OffsetDateTime::now_utc();
        let end = start + time::Duration::days(6);
        assert!(!due((start, end), start + time::Duration::days(3)));
        assert!(!due((start, end), start + time::Duration::hours(95)));
        assert!(due((start, end), start + time::Duration::hours(97)));
        assert!(due((start, end), end + time::Duration::hours(1)));
    }
}

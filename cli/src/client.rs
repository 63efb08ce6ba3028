//! The connection every client command makes: to the coordinator, over
//! mTLS with a member's certificate.

use ghx_pki::{TlsFiles, TlsMaterial};
use ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] ghx_pki::Error),
    #[error("connecting to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// Connects to a coordinator at `endpoint` (an https URL) with a member's
/// certificate, checking the coordinator's against the federation CA.
pub async fn connect_coordinator(
    endpoint: &str,
    files: &TlsFiles,
) -> Result<CoordinatorServiceClient<Channel>, Error> {
    let tls = TlsMaterial::load(files)?;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .tls_config(tls.client_config("coordinator"))?
        .connect()
        .await?;
    Ok(CoordinatorServiceClient::new(channel))
}

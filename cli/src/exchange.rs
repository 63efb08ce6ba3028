//! The recipient service's library call: relay a resident's signed
//! request through the coordinator, open and check every hospital's
//! transfer as its frames arrive, and merge what arrived whole into one
//! record (`ghx_exchange::merge`). `ghx exchange fetch` is this and a
//! file write.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ghx_exchange::keys::{RecipientKey, SignedKey};
use ghx_exchange::merge::{self, Report};
use ghx_exchange::receive::{Received, Transfers};
use ghx_proto::v1 as pb;
use ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the request: {0}")]
    Request(#[from] ghx_exchange::request::Error),
    #[error("the recipient key: {0}")]
    Key(#[from] ghx_exchange::keys::Error),
    #[error("the coordinator: {}", .0.message())]
    Relay(#[from] tonic::Status),
}

/// The recipient service: its name (its certificate's), HPKE key and the
/// statement binding that key to its certificate.
pub struct Recipient {
    pub key: RecipientKey,
    pub signed: SignedKey,
    /// The federation CA (PEM), to check the hospitals' certificates.
    pub ca_pem: String,
    /// Hospitals' certificate key pins (`ghx pki pin`), when known: their
    /// parts are taken only under those keys.
    pub hospital_pins: BTreeMap<String, String>,
}

impl Recipient {
    /// The recipient `name`, with its certificate and certificate key
    /// (PEM) signing the statement of `key`.
    pub fn new(
        name: &str,
        key: RecipientKey,
        cert_pem: &str,
        cert_key_pem: &str,
        ca_pem: &str,
    ) -> Result<Self, Error> {
        let signed = SignedKey::sign(name, &key, cert_pem, cert_key_pem)?;
        Ok(Recipient {
            key,
            signed,
            ca_pem: ca_pem.to_owned(),
            hospital_pins: BTreeMap::new(),
        })
    }

    /// Pins the hospitals' certificate keys.
    pub fn with_hospital_pins(mut self, pins: BTreeMap<String, String>) -> Self {
        self.hospital_pins = pins;
        self
    }

    /// Every hospital's transfer of request `jti`, checked as this
    /// recipient checks.
    pub fn transfers(&self, jti: &str) -> Transfers<'_> {
        Transfers::new(&self.key, jti, &self.ca_pem).pinned(self.hospital_pins.clone())
    }

    /// The recipient's HPKE public key (hex), as the platform registers it
    /// and names it in requests.
    pub fn public_key(&self) -> String {
        self.key.public_hex()
    }

    /// The wire request for a signed request token.
    pub fn request(&self, token: &str) -> pb::ExchangeRequest {
        pb::ExchangeRequest {
            request: token.to_owned(),
            key_statement: self.signed.statement.clone(),
            key_signature: self.signed.signature.clone(),
            recipient_certificate_pem: self.signed.certificate_pem.clone(),
        }
    }
}

/// What a fetch gave.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Hospitals' transfers received whole.
    pub received: Vec<Received>,
    /// Hospitals that refused, failed, or whose transfer was discarded.
    pub failed: BTreeMap<String, String>,
    /// The merged record (a Bundle of type collection).
    pub bundle: Value,
    pub report: Report,
    /// Bytes of ciphertext relayed.
    pub relayed_bytes: u64,
    /// From the request's sending to the last frame's arrival.
    pub transfer: Duration,
}

/// Relays `token` and receives, checks and merges every hospital's answer.
pub async fn fetch(
    client: &mut CoordinatorServiceClient<Channel>,
    recipient: &Recipient,
    token: &str,
) -> Result<Fetched, Error> {
    let claims = ghx_exchange::request::unverified_claims(token)?;
    let started = Instant::now();
    let mut stream = client
        .relay_exchange(recipient.request(token))
        .await?
        .into_inner();
    let mut transfers = recipient.transfers(&claims.jti);
    let mut relayed_bytes = 0u64;
    let mut heard = std::collections::BTreeSet::new();
    while let Some(frame) = stream.next().await {
        let frame = frame?;
        heard.insert(frame.node_id.clone());
        accept(&mut transfers, &frame, &mut relayed_bytes);
    }
    let transfer = started.elapsed();
    let mut outcomes = transfers.finish();
    for hospital in &claims.aud {
        if !heard.contains(hospital) {
            outcomes
                .failed
                .insert(hospital.clone(), "no answer was relayed".to_owned());
        }
    }
    outcomes.received.sort_by(|a, b| {
        claims
            .aud
            .iter()
            .position(|h| *h == a.hospital)
            .cmp(&claims.aud.iter().position(|h| *h == b.hospital))
    });
    let (bundle, report) = merge::merge(&outcomes.received, &ghx_audit::now_rfc3339());
    Ok(Fetched {
        received: outcomes.received,
        failed: outcomes.failed,
        bundle,
        report,
        relayed_bytes,
        transfer,
    })
}

/// One relayed frame into the transfers.
pub fn accept(transfers: &mut Transfers<'_>, frame: &pb::RelayedFrame, bytes: &mut u64) {
    match &frame.frame {
        Some(f) => {
            *bytes += (f.ciphertext.len() + f.encapsulated_key.len()) as u64;
            transfers.frame(&frame.node_id, &f.encapsulated_key, &f.ciphertext);
        }
        None => transfers.refused(&frame.node_id, &frame.refusal),
    }
}

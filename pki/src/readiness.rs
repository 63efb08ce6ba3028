//! grpc.health.v1 for a federation service: serving while its own checks
//! pass (the database answers, its certificate is valid), with warnings in
//! the log as the certificate nears expiry.
//!
//! Key decision: health is served on the service's own mTLS port, so a
//! monitor needs a federation certificate (any role) to ask; nothing about
//! a hospital is visible to an unauthenticated scanner.

use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Warn this long before the certificate expires.
pub const EXPIRY_WARNING: time::Duration = time::Duration::days(14);

/// How often readiness is re-checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// When `cert_pem` stops being valid.
pub fn expires_at(cert_pem: &str) -> Result<time::OffsetDateTime, crate::Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| crate::Error::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| crate::Error::Parse(e.to_string()))?;
    time::OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| crate::Error::Parse(e.to_string()))
}

/// What one readiness check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Serving, but the certificate expires within [`EXPIRY_WARNING`].
    Expiring {
        days_left: i64,
    },
    NotReady(String),
}

/// Checks the certificate's validity at `now` and the service's own
/// `check` (e.g. that its database answers).
pub fn assess(
    expires: time::OffsetDateTime,
    now: time::OffsetDateTime,
    check: &dyn Fn() -> Result<(), String>,
) -> Readiness {
    if now >= expires {
        return Readiness::NotReady(format!("the certificate expired at {expires}"));
    }
    if let Err(why) = check() {
        return Readiness::NotReady(why);
    }
    let left = expires - now;
    if left < EXPIRY_WARNING {
        Readiness::Expiring {
            days_left: left.whole_days(),
        }
    } else {
        Readiness::Ready
    }
}

/// Keeps `service` (and the overall "" status) SERVING while `assess`
/// finds it ready, NOT_SERVING otherwise; re-checks every [`CHECK_EVERY`].
pub fn spawn(
    reporter: HealthReporter,
    service: &'static str,
    cert_pem: String,
    check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let check = std::sync::Arc::new(check);
    tokio::spawn(async move {
        let expires = expires_at(&cert_pem).ok();
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            every.tick().await;
            let check = check.clone();
            let now = time::OffsetDateTime::now_utc();
            let readiness = match expires {
                None => Readiness::NotReady("the certificate cannot be read".to_owned()),
                Some(expires) => tokio::task::spawn_blocking(move || assess(expires, now, &*check))
                    .await
                    .unwrap_or_else(|e| Readiness::NotReady(e.to_string())),
            };
            let status = match &readiness {
                Readiness::Ready => ServingStatus::Serving,
                Readiness::Expiring { days_left } => {
                    tracing::warn!(
                        days_left,
                        "this service's certificate expires soon; issue a new one"
                    );
                    ServingStatus::Serving
                }
                Readiness::NotReady(why) => {
                    tracing::error!(reason = %why, "not ready");
                    ServingStatus::NotServing
                }
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(service, status).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_certificate_and_the_check() {
        let now = time::OffsetDateTime::now_utc();
        let ok = || Ok(());
        let down = || Err("database unreachable".to_owned());
        assert_eq!(
            assess(now + time::Duration::days(60), now, &ok),
            Readiness::Ready
        );
        assert_eq!(
            assess(now + time::Duration::days(3), now, &ok),
            Readiness::Expiring { days_left: 3 }
        );
        assert!(matches!(
            assess(now - time::Duration::days(1), now, &ok),
            Readiness::NotReady(why) if why.contains("expired")
        ));
        assert_eq!(
            assess(now + time::Duration::days(60), now, &down),
            Readiness::NotReady("database unreachable".to_owned())
        );
    }

    #[test]
    fn issued_certificates_have_an_expiry() {
        let ca = crate::CertificateAuthority::create("G-Health").unwrap();
        let issued = ca
            .issue(&crate::CertificateRequest::new(
                "chosun",
                crate::Role::Node,
                "x",
            ))
            .unwrap();
        assert!(expires_at(&issued.cert_pem).unwrap() > time::OffsetDateTime::now_utc());
    }
}

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
    validity(cert_pem).map(|(_, not_after)| not_after)
}

/// When `cert_pem` starts and stops being valid.
pub fn validity(
    cert_pem: &str,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), crate::Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| crate::Error::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| crate::Error::Parse(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        time::OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|e| crate::Error::Parse(e.to_string()))
    };
    Ok((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

/// How long before expiry to warn: [`EXPIRY_WARNING`], or a third of the
/// certificate's lifetime for a short-lived one (which is renewed often
/// and should only warn when a renewal was missed).
pub fn warn_within(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> time::Duration {
    EXPIRY_WARNING.min((not_after - not_before) / 3)
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
    (not_before, expires): (time::OffsetDateTime, time::OffsetDateTime),
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
    if left < warn_within(not_before, expires) {
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
    identity: std::sync::Arc<crate::transport::LiveIdentity>,
    check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let check = std::sync::Arc::new(check);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            every.tick().await;
            // The certificate in use now: it may have been renewed.
            let expires = validity(&identity.current_pem().cert_pem).ok();
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
                        "this service's certificate expires soon; renew it (ghx pki renew)"
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
        let year_ago = now - time::Duration::days(365);
        assert_eq!(
            assess((year_ago, now + time::Duration::days(60)), now, &ok),
            Readiness::Ready
        );
        assert_eq!(
            assess((year_ago, now + time::Duration::days(3)), now, &ok),
            Readiness::Expiring { days_left: 3 }
        );
        assert!(matches!(
            assess((year_ago, now - time::Duration::days(1)), now, &ok),
            Readiness::NotReady(why) if why.contains("expired")
        ));
        assert_eq!(
            assess((year_ago, now + time::Duration::days(60)), now, &down),
            Readiness::NotReady("database unreachable".to_owned())
        );
    }

    #[test]
    fn short_lived_certificates_warn_only_late_in_their_life() {
        let now = time::OffsetDateTime::now_utc();
        let ok = || Ok(());
        let issued = now - time::Duration::days(4);
        // Seven days' validity: 3 days left is fine; of five days', 1 left
        // is within the last third.
        assert_eq!(
            assess((issued, issued + time::Duration::days(7)), now, &ok),
            Readiness::Ready
        );
        assert_eq!(
            assess((issued, issued + time::Duration::days(5)), now, &ok),
            Readiness::Expiring { days_left: 1 }
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

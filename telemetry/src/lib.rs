//! Logs, traces and metrics for the ghx services.
//!
//! Every process logs to stderr through `tracing` (filtered by `GHX_LOG`).
//! When the service's `[telemetry]` table names an OTLP endpoint, the same
//! spans also go to that collector as OpenTelemetry traces, and the
//! instruments in [`metrics`] are exported every `metrics_interval_secs`;
//! without an endpoint nothing is exported and the instruments cost nothing.
//!
//! A trace crosses from coordinator to node in W3C `traceparent` gRPC
//! metadata: clients add [`propagation::Propagate`] as their interceptor,
//! servers open their request span with [`propagation::server_span`]. Span
//! and metric attributes carry identifiers and outcomes only, never a value
//! from a patient's record.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod metrics;
pub mod propagation;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "telemetry.otlp_endpoint `{endpoint}` must be an http:// or https:// URL of an OTLP/gRPC collector (for example http://127.0.0.1:4317)"
    )]
    Endpoint { endpoint: String },
    #[error("telemetry.sample_ratio {0} must be between 0 and 1")]
    SampleRatio(f64),
    #[error("telemetry.metrics_interval_secs must be at least 1")]
    Interval,
    #[error("starting the OTLP {signal} exporter to `{endpoint}`: {message}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("logging was already set up in this process: {0}")]
    AlreadyInstalled(String),
    #[error("flushing telemetry at shutdown: {0}")]
    Flush(String),
}

/// The `[telemetry]` table of a node's or the coordinator's configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// An OTLP/gRPC collector (`http://host:4317`); none: nothing is
    /// exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of traces kept when this service starts one (a request that
    /// arrives with a sampled trace is always kept).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// How often metrics are exported.
    #[serde(default = "default_metrics_interval")]
    pub metrics_interval_secs: u64,
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_metrics_interval() -> u64 {
    30
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            otlp_endpoint: None,
            sample_ratio: default_sample_ratio(),
            metrics_interval_secs: default_metrics_interval(),
        }
    }
}

impl Settings {
    /// Checks the settings without starting anything.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            let host_ok = endpoint
                .split_once("://")
                .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
            if !scheme_ok || !host_ok || endpoint.parse::<tonic::codegen::http::Uri>().is_err() {
                return Err(Error::Endpoint {
                    endpoint: endpoint.clone(),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(Error::SampleRatio(self.sample_ratio));
        }
        if self.metrics_interval_secs == 0 {
            return Err(Error::Interval);
        }
        Ok(())
    }
}

/// Who is reporting: the service name and this instance's id (a node id,
/// or the coordinator's name).
#[derive(Debug, Clone)]
pub struct Service<'a> {
    pub name: &'a str,
    pub instance: &'a str,
}

/// The process's installed telemetry; [`Telemetry::shutdown`] flushes what
/// is still buffered.
#[must_use = "shut telemetry down to flush what is buffered"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting())
            .finish()
    }
}

impl Telemetry {
    /// Sets up logging to stderr (filter from `GHX_LOG`, else
    /// `default_level`), and OTLP export of traces and metrics when
    /// `settings` name an endpoint. Exporting needs a Tokio runtime: call
    /// from inside one, and shut down before it ends.
    pub fn install(
        service: Service<'_>,
        settings: &Settings,
        default_level: &str,
    ) -> Result<Telemetry, Error> {
        settings.validate()?;
        let filter = tracing_subscriber::EnvFilter::try_from_env("GHX_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let Some(endpoint) = &settings.otlp_endpoint else {
            tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .try_init()
                .map_err(|e| Error::AlreadyInstalled(e.to_string()))?;
            return Ok(Telemetry {
                traces: None,
                metrics: None,
            });
        };
        let resource = Resource::builder()
            .with_service_name(service.name.to_owned())
            .with_attributes([
                KeyValue::new("service.instance.id", service.instance.to_owned()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let exporter_error = |signal: &'static str| {
            move |e: opentelemetry_otlp::ExporterBuildError| Error::Exporter {
                signal,
                endpoint: endpoint.clone(),
                message: e.to_string(),
            }
        };
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(exporter_error("trace"))?;
        let traces = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_batch_exporter(spans)
            .build();
        let measurements = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(exporter_error("metrics"))?;
        let reader = PeriodicReader::builder(measurements)
            .with_interval(Duration::from_secs(settings.metrics_interval_secs))
            .build();
        let metrics = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build();
        use opentelemetry::trace::TracerProvider as _;
        let layer = tracing_opentelemetry::layer().with_tracer(traces.tracer("ghx"));
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(layer)
            .try_init()
            .map_err(|e| Error::AlreadyInstalled(e.to_string()))?;
        opentelemetry::global::set_meter_provider(metrics.clone());
        tracing::info!(%endpoint, "exporting traces and metrics over OTLP");
        Ok(Telemetry {
            traces: Some(traces),
            metrics: Some(metrics),
        })
    }

    /// Logging to stderr only, for the commands that are not services.
    pub fn logs_only(default_level: &str) -> Result<(), Error> {
        let plain = Service {
            name: "ghx",
            instance: "cli",
        };
        Telemetry::install(plain, &Settings::default(), default_level).map(drop)
    }

    /// Whether traces and metrics leave the process.
    pub fn exporting(&self) -> bool {
        self.traces.is_some()
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(self) -> Result<(), Error> {
        let mut failures = Vec::new();
        if let Some(traces) = self.traces {
            if let Err(e) = traces.force_flush() {
                failures.push(format!("traces: {e}"));
            }
            if let Err(e) = traces.shutdown() {
                failures.push(format!("traces: {e}"));
            }
        }
        if let Some(metrics) = self.metrics {
            if let Err(e) = metrics.force_flush() {
                failures.push(format!("metrics: {e}"));
            }
            if let Err(e) = metrics.shutdown() {
                failures.push(format!("metrics: {e}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Flush(failures.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_export_nothing() {
        let settings: Settings = toml::from_str("").unwrap();
        assert_eq!(settings, Settings::default());
        assert!(settings.otlp_endpoint.is_none());
        settings.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, expected) in [
            (
                "otlp_endpoint = \"collector:4317\"",
                "telemetry.otlp_endpoint `collector:4317`",
            ),
            (
                "otlp_endpoint = \"http://\"",
                "telemetry.otlp_endpoint `http://`",
            ),
            ("sample_ratio = 1.5", "telemetry.sample_ratio 1.5"),
            ("metrics_interval_secs = 0", "metrics_interval_secs"),
        ] {
            let settings: Settings = toml::from_str(text).unwrap();
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let unknown = toml::from_str::<Settings>("endpoint = \"http://x:4317\"").unwrap_err();
        assert!(unknown.to_string().contains("unknown field `endpoint`"));
        let good: Settings = toml::from_str("otlp_endpoint = \"http://127.0.0.1:4317\"").unwrap();
        good.validate().unwrap();
    }
}

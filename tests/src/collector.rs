//! A stand-in OpenTelemetry collector: an OTLP/gRPC server on loopback that
//! keeps every trace and metrics export it receives, for tests that check
//! what the services export.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub struct SeenSpan {
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
}

/// One data point of a counter or histogram: its attributes and its value
/// (a counter's sum, or a histogram's count of recordings).
#[derive(Debug, Clone)]
pub struct SeenPoint {
    pub metric: String,
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().traces.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// A running collector; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    sink: Sink,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink::default();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .add_service(MetricsServiceServer::new(sink.clone()));
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Collector { addr, sink, server }
    }

    /// The OTLP endpoint to configure.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SeenSpan> {
        let received = self.sink.0.lock().unwrap();
        let mut spans = Vec::new();
        for export in &received.traces {
            for resource in &export.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .map(|r| attributes(&r.attributes))
                    .and_then(|a| a.get("service.name").cloned())
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push(SeenSpan {
                            service: service.clone(),
                            name: span.name.clone(),
                            trace_id: span.trace_id.clone(),
                            span_id: span.span_id.clone(),
                            parent_span_id: span.parent_span_id.clone(),
                            attributes: attributes(&span.attributes),
                        });
                    }
                }
            }
        }
        spans
    }

    /// The latest data point of every time series of `metric` (exports are
    /// cumulative, so the last one received holds the totals).
    pub fn points(&self, metric: &str) -> Vec<SeenPoint> {
        let received = self.sink.0.lock().unwrap();
        let mut latest: BTreeMap<Vec<(String, String)>, SeenPoint> = BTreeMap::new();
        for export in &received.metrics {
            for resource in &export.resource_metrics {
                for scope in &resource.scope_metrics {
                    for m in scope.metrics.iter().filter(|m| m.name == metric) {
                        let points: Vec<(BTreeMap<String, String>, f64)> = match &m.data {
                            Some(Data::Sum(sum)) => sum
                                .data_points
                                .iter()
                                .map(|p| {
                                    let value = match p.value {
                                        Some(number_data_point::Value::AsDouble(v)) => v,
                                        Some(number_data_point::Value::AsInt(v)) => v as f64,
                                        None => 0.0,
                                    };
                                    (attributes(&p.attributes), value)
                                })
                                .collect(),
                            Some(Data::Histogram(h)) => h
                                .data_points
                                .iter()
                                .map(|p| (attributes(&p.attributes), p.count as f64))
                                .collect(),
                            _ => Vec::new(),
                        };
                        for (attributes, value) in points {
                            let key = attributes.clone().into_iter().collect();
                            latest.insert(
                                key,
                                SeenPoint {
                                    metric: metric.to_owned(),
                                    attributes,
                                    value,
                                },
                            );
                        }
                    }
                }
            }
        }
        latest.into_values().collect()
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

//! The OTLP exporter, set up from the standard OpenTelemetry environment variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) switches it
//! on; `OTEL_EXPORTER_OTLP_PROTOCOL` (or `…_TRACES_PROTOCOL`) picks `http/protobuf` (the
//! default) or `grpc`; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the
//! service (`keel` when unset); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! keep it off; `OTEL_BSP_*` tune the batching. The exporters are the opentelemetry-otlp
//! crate's (HTTP over hyper, gRPC over tonic).

use std::sync::Arc;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names something other than `grpc` or `http/protobuf`.
    #[error("unsupported OTLP protocol {0:?}: use \"grpc\" or \"http/protobuf\"")]
    Protocol(String),
    /// `init_from_env` was called outside a Tokio runtime (the exporters need one).
    #[error("the OTLP exporter must be set up inside a Tokio runtime")]
    NoRuntime,
    /// The exporter refused its configuration (a malformed endpoint, for example).
    #[error("setting up the OTLP exporter failed: {0}")]
    Exporter(String),
}

/// The installed tracer provider: dropping it (or [`Telemetry::shutdown`]) exports
/// what is still buffered and switches the runtime's spans off.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the buffered spans and stops exporting.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        super::set_enabled(false);
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "shutting down the OpenTelemetry exporter failed");
        }
    }
}

/// Installs an OTLP span exporter as the global tracer provider and switches the
/// runtime's spans on, when the environment asks for it (see the module doc); `None`
/// when it does not. Call it inside the Tokio runtime the host runs on, and keep the
/// returned value alive as long as spans should be exported.
pub fn init_from_env() -> Result<Option<Telemetry>, TelemetryError> {
    let var = |name: &str| std::env::var(name).ok().map(|value| value.trim().to_string()).filter(|v| !v.is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|value| !value.eq_ignore_ascii_case("otlp"))
    {
        return Ok(None);
    }
    if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")).is_none() {
        return Ok(None);
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".to_string());
    let exporter = match protocol.as_str() {
        "http/protobuf" => {
            opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary).build()
        }
        "grpc" => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
        other => return Err(TelemetryError::Protocol(other.to_string())),
    }
    .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    let mut resource = Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none()
        && !var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| attributes.contains("service.name="))
    {
        resource = resource.with_service_name("keel");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime { exporter: Arc::new(exporter), runtime })
        .with_id_generator(id_generator())
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    super::set_enabled(true);
    Ok(Some(Telemetry { provider }))
}

/// The id generator the runtime's spans need: random ids, except for a span the
/// runtime builds with a chosen id (an orchestration execution's, derived from its
/// execution id). Give it to a tracer provider you build yourself.
pub fn id_generator() -> KeelIdGenerator {
    KeelIdGenerator { random: RandomIdGenerator::default() }
}

/// See [`id_generator`].
#[derive(Debug)]
pub struct KeelIdGenerator {
    random: RandomIdGenerator,
}

impl IdGenerator for KeelIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        super::take_requested_trace_id().unwrap_or_else(|| self.random.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        super::take_requested_span_id().unwrap_or_else(|| self.random.new_span_id())
    }
}

/// Runs an exporter's calls on the host's Tokio runtime: the batch processor exports
/// from a thread of its own, and the HTTP and gRPC clients need a reactor.
#[derive(Debug)]
struct OnRuntime<E> {
    exporter: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = self.exporter.clone();
        let exported = self.runtime.spawn(async move { exporter.export(batch).await });
        exported.await.unwrap_or_else(|error| {
            Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(format!("the export task failed: {error}")))
        })
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, when the provider is built, before any export shares the exporter.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

//! `--tracing`: switches the runtime's spans on for a run. `sink` installs the
//! OpenTelemetry SDK with its batch processor and an exporter that counts the spans and
//! drops them, so the figures show what building and batching spans costs without a
//! network; `otlp` uses `keel::telemetry::init_from_env` (a real collector).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

use crate::Tracing;

/// How many spans the sink has been handed; keeps the provider (or the OTLP exporter)
/// alive for the run.
pub(crate) struct Spans {
    exported: Arc<AtomicU64>,
    _provider: Option<SdkTracerProvider>,
    _telemetry: Option<keel::telemetry::Telemetry>,
}

impl Spans {
    pub(crate) fn count(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
}

/// Sets tracing up as `--tracing` asks; `None` when it is off.
pub(crate) fn install(tracing: Tracing) -> anyhow::Result<Option<Spans>> {
    let exported = Arc::new(AtomicU64::new(0));
    match tracing {
        Tracing::Off => Ok(None),
        Tracing::Sink => {
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(CountingExporter { exported: exported.clone() })
                .with_id_generator(keel::telemetry::id_generator())
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            keel::telemetry::set_enabled(true);
            Ok(Some(Spans { exported, _provider: Some(provider), _telemetry: None }))
        }
        Tracing::Otlp => {
            let telemetry = keel::telemetry::init_from_env()?
                .ok_or_else(|| anyhow::anyhow!("--tracing otlp needs OTEL_EXPORTER_OTLP_ENDPOINT"))?;
            Ok(Some(Spans { exported, _provider: None, _telemetry: Some(telemetry) }))
        }
    }
}

#[derive(Debug)]
struct CountingExporter {
    exported: Arc<AtomicU64>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.exported.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

//! Logs and traces. Logs go to stdout as JSON or human-readable lines (`LOG_FORMAT`), filtered
//! by `RUST_LOG`. Traces use OpenTelemetry: spans always carry W3C trace context (so calls
//! between services join one trace), and are exported over OTLP only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ConfigError, Settings, Source, redact_url};

/// Quiet the chatty transport crates unless asked.
const DEFAULT_FILTER: &str =
    "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,sqlx=warn,opentelemetry=warn";

/// Flushes spans on drop; keep it alive for the life of the process.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("warning: could not flush traces: {err}");
        }
    }
}

/// Installs logging and tracing for `default_service_name` (overridden by `OTEL_SERVICE_NAME`).
pub fn init<S: Source>(
    settings: &Settings<S>,
    default_service_name: &'static str,
) -> Result<TelemetryGuard, ConfigError> {
    let format = settings.choice("LOG_FORMAT", "pretty", &["pretty", "json"])?;
    let filter = match settings.raw("RUST_LOG") {
        Some(raw) => {
            EnvFilter::try_new(&raw).map_err(|err| ConfigError::new("RUST_LOG", &raw, err))?
        }
        None => EnvFilter::new(DEFAULT_FILTER),
    };
    let service_name = settings
        .raw("OTEL_SERVICE_NAME")
        .unwrap_or_else(|| default_service_name.to_owned());

    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = settings.raw("OTEL_EXPORTER_OTLP_ENDPOINT") {
        // The exporter reads OTEL_EXPORTER_OTLP_* itself, and its error quotes the endpoint it
        // used (this one or the traces-only one) whole, so it is shown only when neither holds
        // credentials.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|err| {
                let quoted = [
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                ]
                .map(|key| settings.raw(key).unwrap_or_default());
                let reason = if quoted.iter().all(|url| redact_url(url) == *url) {
                    err.to_string()
                } else {
                    "cannot build the OTLP exporter (its message is withheld: the endpoint holds \
                     credentials)"
                        .to_owned()
                };
                ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    &redact_url(&endpoint),
                    reason,
                )
            })?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(default_service_name));

    let fmt = match format {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        _ => tracing_subscriber::fmt::layer().with_target(true).boxed(),
    };
    // A second init (tests that start two servers in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The caller's trace context from incoming `traceparent` / `tracestate` headers.
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// Writes the current span's trace context into outgoing metadata, so the callee's spans join
/// this trace.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// The W3C trace id of `span`, when it belongs to a trace.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

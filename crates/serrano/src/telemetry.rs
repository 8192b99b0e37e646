//! Logs to stderr, and OpenTelemetry traces over OTLP when an endpoint is given.
//!
//! Request spans are emitted at TRACE level under one target (`serrano_server::trace::TARGET`):
//! the log layer (`RUST_LOG`, default `info`) never sees them, and without an exporter no layer
//! enables them, so `tracing` hands out disabled spans and tracing costs nothing. With an
//! exporter, only that target reaches it (not every log line, not the HTTP client's own spans).

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where traces go. Both fall back to the standard `OTEL_EXPORTER_OTLP_*` variables.
#[derive(Args, Clone, Debug, Default)]
pub struct OtlpArgs {
    /// Export request traces over OTLP to this collector, e.g. http://127.0.0.1:4318 (HTTP)
    /// or http://127.0.0.1:4317 (gRPC). Default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as
    /// given), else $OTEL_EXPORTER_OTLP_ENDPOINT; none: no traces, at no cost.
    /// OTEL_SDK_DISABLED=true turns traces off; OTEL_TRACES_SAMPLER(_ARG) and OTEL_SERVICE_NAME
    /// are honoured.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// `http` (HTTP/protobuf, OTLP's default) or `grpc`. Default: $OTEL_EXPORTER_OTLP_PROTOCOL
    /// (`http/protobuf` or `grpc`), else http.
    #[arg(long, value_enum)]
    pub otlp_protocol: Option<OtlpProtocol>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Http,
    Grpc,
}

impl FromStr for OtlpProtocol {
    type Err = anyhow::Error;
    /// The values `OTEL_EXPORTER_OTLP_PROTOCOL` takes.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "http/protobuf" | "http" => Ok(OtlpProtocol::Http),
            "grpc" => Ok(OtlpProtocol::Grpc),
            other => {
                bail!("OTEL_EXPORTER_OTLP_PROTOCOL={other}: serrano exports http/protobuf or grpc")
            }
        }
    }
}

/// Where spans go, once resolved from the flags and the environment.
#[derive(Debug, PartialEq, Eq)]
struct Destination {
    /// For HTTP, the full URL of the traces route.
    endpoint: String,
    protocol: OtlpProtocol,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn destination(a: &OtlpArgs) -> Result<Option<Destination>> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let protocol = match (
        a.otlp_protocol,
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL")),
    ) {
        (Some(p), _) => p,
        (None, Some(v)) => v.parse()?,
        (None, None) => OtlpProtocol::Http,
    };
    // A traces-specific URL is used as given; a base URL gets the signal's path (the OTLP
    // exporter spec), for HTTP only: gRPC names the service, not a path.
    let (base, exact) = match (&a.otlp_endpoint, env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
        (Some(e), _) => (e.clone(), false),
        (None, Some(e)) => (e, true),
        (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(e) => (e, false),
            None => return Ok(None),
        },
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        bail!("the OTLP endpoint '{base}' must be an http:// or https:// URL");
    }
    let endpoint = match protocol {
        OtlpProtocol::Http if !exact && !base.trim_end_matches('/').ends_with("/v1/traces") => {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
        _ => base,
    };
    Ok(Some(Destination { endpoint, protocol }))
}

/// Keeps the exporter alive; dropping it sends the spans still queued (at most 5 s).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's client runs on a runtime of its own, apart from the server's.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: cannot flush the last traces: {e}");
            }
        }
    }
}

/// Installs the logger (stderr, `RUST_LOG`) and, when `otlp` names a destination, the trace
/// exporter.
pub fn init(otlp: Option<&OtlpArgs>) -> Result<Telemetry> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
    let dest = match otlp {
        Some(a) => destination(a)?,
        None => None,
    };
    let Some(dest) = dest else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry {
            provider: None,
            _runtime: None,
        });
    };
    let (exporter, runtime) = match dest.protocol {
        OtlpProtocol::Http => (
            SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(&dest.endpoint)
                .build()?,
            None,
        ),
        OtlpProtocol::Grpc => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp")
                .enable_all()
                .build()
                .context("cannot start the OTLP exporter's runtime")?;
            let exporter = {
                let _in = rt.enter();
                SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&dest.endpoint)
                    .build()?
            };
            (exporter, Some(rt))
        }
    };
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("serrano");
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The engine's phases are built on the global tracer (they carry their own times).
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Spans carry their own attributes only (not the source line, thread or busy time).
    let traces = tracing_opentelemetry::layer()
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_tracer(provider.tracer("serrano"))
        .with_filter(Targets::new().with_target(serrano_server::trace::TARGET, LevelFilter::TRACE));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    tracing::info!(
        endpoint = %dest.endpoint,
        protocol = ?dest.protocol,
        "exporting traces over OTLP"
    );
    Ok(Telemetry {
        provider: Some(provider),
        _runtime: runtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_base_url_gets_the_traces_path_and_grpc_is_used_as_given() {
        let d = |endpoint: &str, protocol| {
            destination(&OtlpArgs {
                otlp_endpoint: Some(endpoint.into()),
                otlp_protocol: Some(protocol),
            })
            .unwrap()
            .unwrap()
            .endpoint
        };
        assert_eq!(
            d("http://c:4318/", OtlpProtocol::Http),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            d("http://c:4318/v1/traces", OtlpProtocol::Http),
            "http://c:4318/v1/traces"
        );
        assert_eq!(d("http://c:4317", OtlpProtocol::Grpc), "http://c:4317");
        assert!(destination(&OtlpArgs {
            otlp_endpoint: Some("c:4317".into()),
            otlp_protocol: None,
        })
        .is_err());
        assert!("grpc".parse::<OtlpProtocol>().is_ok());
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }
}

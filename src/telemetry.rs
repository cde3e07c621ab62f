//! Remote telemetry: the opt-in export of spans and log records to an OpenTelemetry collector
//! over OTLP/HTTP with protobuf bodies (`[telemetry]`, and the standard `OTEL_*` variables that
//! [`crate::config`] resolves).
//!
//! It owns the exporters, the two layers [`crate::logging`] adds to the subscriber when telemetry
//! is on, the two kinds of span that are exported (one per run, one per request to Bynder or to
//! its token endpoint) and the bounded flush when the process ends. It does not own what is
//! logged: the log records are the crate's ordinary tracing events, the lines stderr shows.
//!
//! Only spans with the target [`SPAN_TARGET`] are exported, and their attributes are chosen for
//! it: run ids, counts, outcomes, HTTP methods, paths and status codes; never a query string, a
//! header or a secret. The stderr log never shows these spans, so its lines are the same with
//! telemetry on or off. A collector that cannot be reached costs one warning per outage, never a
//! run. With telemetry off, no exporter exists and the spans are disabled at their call sites.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::TelemetrySettings;

/// The target of every exported span, and of no event. The log filter lets these spans through
/// whatever `log.level` says when telemetry is on (and disables them when it is off); the stderr
/// layer skips them.
pub const SPAN_TARGET: &str = "bynder_usage_sync::telemetry::span";

/// What identifies this program to the collector unless `OTEL_SERVICE_NAME` (or `service.name`
/// in `OTEL_RESOURCE_ATTRIBUTES`) says otherwise.
const SERVICE_NAME: &str = "bynder-usage-sync";

/// Crates that carry the export itself: their events are never exported, or every export would
/// log about itself and be exported again.
const EXPORT_STACK: [&str; 7] = [
    "opentelemetry",
    "hyper",
    "h2",
    "reqwest",
    "tonic",
    "tower",
    "bynder_usage_sync::telemetry",
];

/// A layer of the process's subscriber.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// The providers to flush at exit.
struct Providers {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
    timeout: Duration,
}

static PROVIDERS: Mutex<Option<Providers>> = Mutex::new(None);

/// Why telemetry could not be started (the process goes on without it).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the {signal} exporter for {endpoint}: {source}")]
pub struct SetupError {
    signal: &'static str,
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The span and log layers for `settings`, exporting in the background from tasks of the
/// current tokio runtime; empty when telemetry is off. Called once, by [`crate::logging::init`].
pub fn layers<S>(settings: &TelemetrySettings) -> Result<Vec<BoxedLayer<S>>, SetupError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let mut layers: Vec<BoxedLayer<S>> = Vec::new();
    if !settings.is_enabled() {
        return Ok(layers);
    }
    let resource = resource();
    let health = Arc::new(Health::default());
    let timeout = settings.timeout;
    let mut providers = Providers {
        tracer: None,
        logger: None,
        timeout,
    };
    if let Some(endpoint) = &settings.traces_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http_client(timeout))
            .with_endpoint(endpoint.as_str())
            .with_timeout(timeout)
            .build()
            .map_err(|source| SetupError {
                signal: "span",
                endpoint: endpoint.to_string(),
                source,
            })?;
        let exporter = Watched::new(exporter, endpoint, health.clone());
        let batches = opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_max_export_timeout(timeout)
            .build();
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer(SERVICE_NAME);
        layers.push(Box::new(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_threads(false)
                .with_location(false)
                .with_filter(filter_fn(|m| m.is_span() && m.target() == SPAN_TARGET)),
        ));
        providers.tracer = Some(provider);
    }
    if let Some(endpoint) = &settings.logs_endpoint {
        let exporter = opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_http_client(http_client(timeout))
            .with_endpoint(endpoint.as_str())
            .with_timeout(timeout)
            .build()
            .map_err(|source| SetupError {
                signal: "log",
                endpoint: endpoint.to_string(),
                source,
            })?;
        let exporter = Watched::new(exporter, endpoint, health);
        let batches = opentelemetry_sdk::logs::BatchConfigBuilder::default()
            .with_max_export_timeout(timeout)
            .build();
        let processor =
            opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .with_batch_config(batches)
            .build();
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(FlushOnShutdown(processor))
            .with_resource(resource)
            .build();
        layers.push(Box::new(
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&provider)
                .with_filter(filter_fn(|m| {
                    m.is_event() && !EXPORT_STACK.iter().any(|t| m.target().starts_with(t))
                })),
        ));
        providers.logger = Some(provider);
    }
    *PROVIDERS.lock().unwrap_or_else(|e| e.into_inner()) = Some(providers);
    Ok(layers)
}

/// The collector's HTTP client: its own, not Bynder's (no gate, no Bynder CA), rustls like every
/// client of the crate, and never following a redirect with the collector's headers.
fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("bynder-usage-sync/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// The resource every span and log record is sent with: what the SDK detects from
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, with this program's name and version
/// where those say nothing.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let unnamed = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|name| name.as_str().starts_with("unknown_service"));
    let versioned = detected
        .get(&opentelemetry::Key::from_static_str("service.version"))
        .is_some();
    let mut builder = Resource::builder();
    if unnamed {
        builder = builder.with_service_name(SERVICE_NAME);
    }
    if !versioned {
        builder =
            builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}

/// Flushes what is still buffered and stops the exporters, waiting at most `telemetry.timeout`:
/// a collector that does not answer never holds the exit up longer. Called once when the
/// process ends (after the daemon stopped on SIGTERM, or a one-off command finished); does
/// nothing when telemetry is off.
pub fn shutdown() {
    let Some(providers) = PROVIDERS.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    // The SDK's shutdown blocks until the export task answers: on threads of their own, so the
    // wait can be bounded here, and in parallel, so both signals share the one bound.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let mut pending = 0;
    if let Some(tracer) = providers.tracer {
        let done = done.clone();
        pending += 1;
        std::thread::spawn(move || {
            let _ = tracer.shutdown();
            let _ = done.send(());
        });
    }
    if let Some(logger) = providers.logger {
        let done = done.clone();
        pending += 1;
        std::thread::spawn(move || {
            let _ = logger.shutdown();
            let _ = done.send(());
        });
    }
    // A little over one export's timeout: the last export may have started just before.
    let deadline = std::time::Instant::now() + providers.timeout + Duration::from_millis(500);
    for _ in 0..pending {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if finished.recv_timeout(left).is_err() {
            tracing::warn!(
                timeout = ?providers.timeout,
                "the telemetry collector did not take the last spans and log records in time; \
                 they were dropped"
            );
            return;
        }
    }
}

/// Whether the collector is failing, shared by the span and the log exporter: the warning is
/// given once per outage, and a line says when it answers again.
#[derive(Debug, Default)]
struct Health {
    failing: AtomicBool,
}

impl Health {
    fn observe(&self, endpoint: &str, result: &OTelSdkResult) {
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the telemetry collector at {endpoint} answers again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot send telemetry to {endpoint} ({error}); runs go on, and spans and \
                         log records are dropped until the collector answers. Fix: check \
                         telemetry.otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) and that the \
                         collector accepts OTLP/HTTP there"
                    );
                }
            }
        }
    }
}

/// An exporter whose failures are reported through [`Health`] instead of failing anything.
#[derive(Debug)]
struct Watched<E> {
    inner: E,
    endpoint: String,
    health: Arc<Health>,
}

impl<E> Watched<E> {
    fn new(inner: E, endpoint: &url::Url, health: Arc<Health>) -> Self {
        Watched {
            inner,
            endpoint: endpoint.to_string(),
            health,
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Watched<E>
{
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.health.observe(&self.endpoint, &result);
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: opentelemetry_sdk::logs::LogExporter> opentelemetry_sdk::logs::LogExporter for Watched<E> {
    async fn export(&self, batch: opentelemetry_sdk::logs::LogBatch<'_>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.health.observe(&self.endpoint, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The tokio log processor with a shutdown that sends what is buffered: the SDK's own answers
/// the provider's `shutdown_with_timeout` with the trait's default, which does nothing, so the
/// last records would be lost at exit.
#[derive(Debug)]
struct FlushOnShutdown<P>(P);

impl<P: opentelemetry_sdk::logs::LogProcessor> opentelemetry_sdk::logs::LogProcessor
    for FlushOnShutdown<P>
{
    fn emit(
        &self,
        record: &mut opentelemetry_sdk::logs::SdkLogRecord,
        scope: &opentelemetry::InstrumentationScope,
    ) {
        self.0.emit(record, scope);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Bounded by the export timeout inside, and by the caller of [`shutdown`].
        self.0.shutdown()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

// ---- the exported spans ---------------------------------------------------------------------

/// The span of one run (a reconcile, a drain of the queue, a drift repair), the root of its own
/// trace. Its counts and outcome are recorded by [`record_run`] when it ends, its id by
/// [`record_run_id`] once the run history gave one (a dry run has none).
pub fn run_span(command: &str, dry_run: bool, verify: bool) -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "run",
        otel.name = %format_args!("run {command}"),
        run.command = command,
        run.dry_run = dry_run,
        run.verify = verify,
        run.id = tracing::field::Empty,
        run.outcome = tracing::field::Empty,
        run.creates = tracing::field::Empty,
        run.updates = tracing::field::Empty,
        run.deletes = tracing::field::Empty,
        run.skipped_rows = tracing::field::Empty,
        run.succeeded = tracing::field::Empty,
        run.failed_attempts = tracing::field::Empty,
        run.dead_letters = tracing::field::Empty,
        run.left_pending = tracing::field::Empty,
        run.requests = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the run history's id on the current run span.
pub fn record_run_id(run_id: i64) {
    Span::current().record("run.id", run_id);
}

/// A count as the signed integer OpenTelemetry attributes hold (an unsigned one would arrive as
/// text).
pub fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The current span when it is a run span, so work spawned onto other tasks stays in the run's
/// trace; otherwise no span at all (telemetry off: the stderr log sees no difference).
pub fn current_run_span() -> Span {
    let current = Span::current();
    if current
        .metadata()
        .is_some_and(|m| m.target() == SPAN_TARGET && m.name() == "run")
    {
        current
    } else {
        Span::none()
    }
}

/// Which kind of endpoint a request goes to.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    /// The asset-usage API (and `GET /api/v4/currentUser/`).
    Api,
    /// The OAuth 2 token endpoint or the OAuth 1.0a handshake.
    Auth,
}

/// The span of one HTTP request: method, host and path (the query string, which may name assets
/// and uris, or carry an OAuth 1.0a signature, is left out), and after [`record_status`] and
/// [`record_outcome`] the status code and what became of it. Nothing about the request's
/// headers or body is recorded.
pub fn request_span(endpoint: Endpoint, method: &reqwest::Method, url: &url::Url) -> Span {
    tracing::info_span!(
        target: SPAN_TARGET,
        "request",
        otel.name = %format_args!("{method} {}", url.path()),
        otel.kind = "client",
        http.request.method = %method,
        url.scheme = url.scheme(),
        url.path = url.path(),
        server.address = url.host_str().unwrap_or_default(),
        server.port = i64::from(url.port_or_known_default().unwrap_or_default()),
        request.endpoint = match endpoint {
            Endpoint::Api => "api",
            Endpoint::Auth => "auth",
        },
        http.response.status_code = tracing::field::Empty,
        request.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the status code of the answer on the current request span (once, when the headers
/// arrived).
pub fn record_status(status: reqwest::StatusCode) {
    Span::current().record("http.response.status_code", i64::from(status.as_u16()));
}

/// How a request ended, for its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// An answer, whatever its status (the status says the rest).
    Answered(reqwest::StatusCode),
    /// No connection could be made.
    ConnectFailed,
    /// No answer in time.
    TimedOut,
    /// The connection broke, or the answer could not be read.
    Broken,
    /// The answer was longer than `bynder.max_response_size`.
    TooLarge,
    /// The portal's certificate is not trusted.
    Untrusted,
}

/// Records on `span` how its request ended (once).
pub fn record_outcome(span: &Span, outcome: RequestOutcome) {
    let (label, error) = match outcome {
        RequestOutcome::Answered(status) => {
            let label = match status.as_u16() {
                200..=299 => "ok",
                300..=399 => "redirect",
                401 => "unauthorized",
                429 => "rate_limited",
                400..=499 => "rejected",
                _ => "server_error",
            };
            (
                label,
                (status.as_u16() >= 400).then(|| status.as_u16().to_string()),
            )
        }
        RequestOutcome::ConnectFailed => ("connect_failed", Some("connect_failed".to_owned())),
        RequestOutcome::TimedOut => ("timeout", Some("timeout".to_owned())),
        RequestOutcome::Broken => ("broken", Some("broken".to_owned())),
        RequestOutcome::TooLarge => ("too_large", Some("too_large".to_owned())),
        RequestOutcome::Untrusted => ("untrusted_certificate", Some("tls".to_owned())),
    };
    span.record("request.outcome", label);
    match error {
        Some(kind) => {
            span.record("error.type", kind.as_str());
            span.record("otel.status_code", "error");
        }
        None => {
            span.record("otel.status_code", "ok");
        }
    }
}

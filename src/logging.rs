//! Logs: human-readable text or JSON lines on stderr, with a filter the daemon can change while
//! it runs (`log.level` on SIGHUP). `RUST_LOG`, when set, wins over `log.level`. Text lines show
//! what came from outside (error bodies) with control characters escaped.
//!
//! With remote telemetry on (`[telemetry]`), the same filter also decides which events become
//! log records for the collector, and [`crate::telemetry`]'s spans pass it whatever the level;
//! stderr shows neither those spans nor anything else new.

use std::sync::OnceLock;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer as _, Registry};

use crate::config::{LogFormat, TelemetrySettings};
use crate::telemetry::SPAN_TARGET;
use crate::text::printable;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
/// Whether the command line chose the level (`-v`, `-q`, `--log-level`): a reload keeps it.
static FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Whether spans are exported: the filter then lets [`SPAN_TARGET`] through at any level.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The filter for `level`, unless `RUST_LOG` is set. The scheduler logs every tick at INFO: it is
/// kept to warnings unless asked for by name.
fn filter(level: &str, forced: bool) -> EnvFilter {
    let from_env = if forced {
        Err(())
    } else {
        EnvFilter::try_from_default_env().map_err(|_| ())
    };
    let filter = from_env
        .or_else(|()| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = if filter.to_string().contains("tokio_cron_scheduler") {
        filter
    } else {
        filter.add_directive(
            "tokio_cron_scheduler=warn"
                .parse()
                .expect("valid directive"),
        )
    };
    // The exported spans are not log lines: on whatever the level while they are exported, off
    // (not even created) otherwise.
    let spans = if EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        "info"
    } else {
        "off"
    };
    filter.add_directive(
        format!("{SPAN_TARGET}={spans}")
            .parse()
            .expect("valid directive"),
    )
}

/// The stderr layer's own filter: everything the process filter lets through but the exported
/// spans, so each line reads the same with telemetry on or off.
fn not_exported_span(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target() == SPAN_TARGET)
}

/// Text logs' fields, every value passed through [`printable`]: an error body quoted in a log
/// line cannot carry terminal escapes into a terminal or a log viewer. (JSON lines escape control
/// characters by themselves.)
fn printable_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        let text = printable(&text);
        match field.name() {
            "message" => write!(writer, "{text}"),
            name => write!(writer, "{name}={text}"),
        }
    })
    .delimited(" ")
}

/// Installs the process's subscriber once; later calls do nothing. `forced`: `level` comes from
/// the command line and wins over `RUST_LOG`. `telemetry`: the remote telemetry to send, if
/// configured; it starts exporting from tasks of the current tokio runtime.
pub fn init(level: &str, format: LogFormat, forced: bool, telemetry: Option<&TelemetrySettings>) {
    if FILTER.get().is_some() {
        return;
    }
    let remote = match telemetry {
        Some(settings) => crate::telemetry::layers(settings),
        None => Ok(Vec::new()),
    };
    let (remote, remote_error) = match remote {
        Ok(layers) => (layers, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    EXPORTING.store(!remote.is_empty(), std::sync::atomic::Ordering::Relaxed);
    let (filter, handle) = reload::Layer::new(filter(level, forced));
    // Colours only on a terminal: journald and container logs would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // `None`, not an empty list, when off: an empty list of layers would say it wants no
    // event at all, and every event would be disabled.
    let remote = (!remote.is_empty()).then_some(remote);
    let base = Registry::default().with(filter).with(remote);
    let installed = match format {
        LogFormat::Json => base
            .with(fmt.json().with_filter(filter_fn(not_exported_span)))
            .try_init(),
        LogFormat::Text => base
            .with(
                fmt.with_target(false)
                    .fmt_fields(printable_fields())
                    .with_filter(filter_fn(not_exported_span)),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
        FORCED.store(forced, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(e) = remote_error {
        tracing::warn!("remote telemetry is off: {e}");
    }
}

/// Replaces the filter with `level`. Says why when it cannot: `RUST_LOG` wins, or the level is
/// not a filter.
pub fn set_level(level: &str) -> Result<(), String> {
    if FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err("the command line's -v, -q or --log-level wins over log.level".to_owned());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and wins over log.level".to_owned());
    }
    EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?} is not a filter ({e})"))?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not set up".to_owned())?;
    handle
        .reload(filter(level, false))
        .map_err(|e| format!("cannot change the log filter: {e}"))
}

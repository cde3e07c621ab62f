//! Logs: human-readable text or JSON lines on stderr, with a filter the daemon can change while
//! it runs (`log.level` on SIGHUP). `RUST_LOG`, when set, wins over `log.level`. Text lines show
//! what came from outside (error bodies) with control characters escaped.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;
use crate::text::printable;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
/// Whether the command line chose the level (`-v`, `-q`, `--log-level`): a reload keeps it.
static FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
    if filter.to_string().contains("tokio_cron_scheduler") {
        filter
    } else {
        filter.add_directive(
            "tokio_cron_scheduler=warn"
                .parse()
                .expect("valid directive"),
        )
    }
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
/// the command line and wins over `RUST_LOG`.
pub fn init(level: &str, format: LogFormat, forced: bool) {
    if FILTER.get().is_some() {
        return;
    }
    let (filter, handle) = reload::Layer::new(filter(level, forced));
    // Colours only on a terminal: journald and container logs would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => Registry::default().with(filter).with(fmt.json()).try_init(),
        LogFormat::Text => Registry::default()
            .with(filter)
            .with(fmt.with_target(false).fmt_fields(printable_fields()))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
        FORCED.store(forced, std::sync::atomic::Ordering::Relaxed);
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

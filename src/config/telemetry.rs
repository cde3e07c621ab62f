//! `[telemetry]`: the opt-in export of spans and log records over OTLP/HTTP, as configured by
//! the file, this crate's environment variables and the standard `OTEL_*` variables it decides
//! on itself (the exporter reads the headers, compression and batch settings on its own). What
//! is sent, and how, is `crate::telemetry`'s.

use std::time::Duration;

use url::Url;

use super::raw::RawTelemetry;
use super::{env_var, ConfigError};

/// Remote telemetry (`[telemetry]`): where spans and log records go over OTLP/HTTP (protobuf
/// bodies), if anywhere. Off unless `telemetry.otlp_endpoint` or one of the standard
/// `OTEL_EXPORTER_OTLP_*ENDPOINT` variables is set. Headers for the collector
/// (`OTEL_EXPORTER_OTLP_HEADERS`, which may carry an API key) are read by the exporter itself and
/// never kept here, so they cannot be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// `telemetry.otlp_endpoint` as configured: the collector's base URL.
    pub otlp_endpoint: Option<Url>,
    /// Where spans are sent (`…/v1/traces`); `None`: no span is exported.
    pub traces_endpoint: Option<Url>,
    /// Where log records are sent (`…/v1/logs`); `None`: no log record is exported.
    pub logs_endpoint: Option<Url>,
    /// Longest wait for the collector: for each export request, and for the last flush at exit.
    pub timeout: Duration,
}

/// Default `telemetry.timeout`.
pub const DEFAULT_TELEMETRY_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            traces_endpoint: None,
            logs_endpoint: None,
            timeout: DEFAULT_TELEMETRY_TIMEOUT,
        }
    }
}

impl TelemetrySettings {
    /// Whether anything is exported at all.
    pub fn is_enabled(&self) -> bool {
        self.traces_endpoint.is_some() || self.logs_endpoint.is_some()
    }
}

/// The standard OpenTelemetry variables this crate decides on itself (the exporter reads the
/// headers, compression and batch settings on its own). Read once, here, like every other part
/// of the environment.
#[derive(Debug, Default)]
pub(super) struct OtelEnv {
    sdk_disabled: Option<String>,
    endpoint: Option<String>,
    traces_endpoint: Option<String>,
    logs_endpoint: Option<String>,
    traces_exporter: Option<String>,
    logs_exporter: Option<String>,
    protocol: Option<String>,
    timeout: Option<String>,
}

impl OtelEnv {
    pub(super) fn from_process() -> OtelEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        OtelEnv {
            sdk_disabled: var("OTEL_SDK_DISABLED"),
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            traces_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            logs_endpoint: var("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"),
            traces_exporter: var("OTEL_TRACES_EXPORTER"),
            logs_exporter: var("OTEL_LOGS_EXPORTER"),
            protocol: var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            timeout: var("OTEL_EXPORTER_OTLP_TIMEOUT"),
        }
    }

    fn disabled(&self) -> bool {
        self.sdk_disabled
            .as_deref()
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    /// Whether `OTEL_<SIGNAL>_EXPORTER` turns the signal off (`none`).
    fn signal_off(value: &Option<String>) -> bool {
        value
            .as_deref()
            .is_some_and(|v| v.split(',').all(|e| e.trim().eq_ignore_ascii_case("none")))
    }

    /// Settings of these variables that this crate does not follow, said once at start-up.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(protocol) = self
            .protocol
            .as_deref()
            .filter(|p| p.trim() != "http/protobuf")
        {
            warnings.push(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL is {protocol:?}, but telemetry is only sent as \
                 OTLP/HTTP with protobuf bodies. Fix: point the endpoint at the collector's \
                 OTLP/HTTP port (4318 by default) and set it to \"http/protobuf\" or unset it"
            ));
        }
        for (name, value) in [
            ("OTEL_TRACES_EXPORTER", &self.traces_exporter),
            ("OTEL_LOGS_EXPORTER", &self.logs_exporter),
        ] {
            if let Some(v) = value.as_deref().filter(|v| {
                v.split(',')
                    .any(|e| !matches!(e.trim().to_ascii_lowercase().as_str(), "otlp" | "none"))
            }) {
                warnings.push(format!(
                    "{name} is {v:?}; only \"otlp\" (the default) and \"none\" are known, so it \
                     is read as \"otlp\". Fix: set it to \"otlp\" or \"none\""
                ));
            }
        }
        warnings
    }
}

/// An OTLP/HTTP endpoint: http or https, no user or password (credentials for a collector
/// belong in `OTEL_EXPORTER_OTLP_HEADERS`), no query.
fn parse_otlp_endpoint(text: &str, name: &str) -> Result<Url, ConfigError> {
    let problem = |why: String| {
        ConfigError::new(format!(
            "{name} {why}. Fix: give the collector's OTLP/HTTP URL, e.g. \"http://collector:4318\"; \
             credentials for it belong in OTEL_EXPORTER_OTLP_HEADERS"
        ))
    };
    let url = Url::parse(text.trim()).map_err(|e| problem(format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(problem(format!("is not an http(s) URL ({})", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(problem(
            "contains a user name or password (`user:password@`), which would be shown wherever \
             the URL is printed"
                .to_owned(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem("has a query or fragment".to_owned()));
    }
    Ok(url)
}

/// `base` with the signal's path appended to its own path, as the OTLP specification says for
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://c:4318` and `http://c:4318/` both give
/// `http://c:4318/v1/traces`; `http://c/otlp` gives `http://c/otlp/v1/traces`).
fn signal_endpoint(base: &Url, signal: &str) -> Url {
    let mut url = base.clone();
    let path = format!("{}/v1/{signal}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

pub(super) fn validate_telemetry(
    raw: RawTelemetry,
    otel: &OtelEnv,
) -> Result<TelemetrySettings, ConfigError> {
    let otlp_endpoint = match raw.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
        None => None,
        Some(text) => Some(parse_otlp_endpoint(
            &text,
            &format!(
                "`telemetry.otlp_endpoint` (env {})",
                env_var("telemetry.otlp_endpoint")
            ),
        )?),
    };
    let generic = otel
        .endpoint
        .as_deref()
        .map(|e| parse_otlp_endpoint(e, "OTEL_EXPORTER_OTLP_ENDPOINT"))
        .transpose()?;
    // The signal's own variable is the endpoint itself; otherwise the signal's path goes on the
    // base URL, this crate's own key before the generic variable.
    let resolve = |own: &Option<String>, own_name: &str, signal: &str, off: bool| {
        if off || otel.disabled() {
            return Ok(None);
        }
        if let Some(text) = own.as_deref() {
            return parse_otlp_endpoint(text, own_name).map(Some);
        }
        Ok(otlp_endpoint
            .as_ref()
            .or(generic.as_ref())
            .map(|base| signal_endpoint(base, signal)))
    };
    let traces_endpoint = resolve(
        &otel.traces_endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "traces",
        OtelEnv::signal_off(&otel.traces_exporter),
    )?;
    let logs_endpoint = resolve(
        &otel.logs_endpoint,
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        "logs",
        OtelEnv::signal_off(&otel.logs_exporter),
    )?;
    let timeout = match (raw.timeout, otel.timeout.as_deref()) {
        (Some(timeout), _) => timeout,
        (None, Some(millis)) => millis
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| {
                ConfigError::new(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT is {millis:?}, not a number of milliseconds. \
                     Fix: write e.g. 5000, or set telemetry.timeout"
                ))
            })?,
        (None, None) => DEFAULT_TELEMETRY_TIMEOUT,
    };
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err(ConfigError::key(
            "telemetry.timeout",
            "must be longer than zero and at most a minute (it also delays the exit when the \
             collector does not answer)",
            format_args!(
                "use the default, \"{}\"",
                humantime::format_duration(DEFAULT_TELEMETRY_TIMEOUT)
            ),
        ));
    }
    Ok(TelemetrySettings {
        otlp_endpoint,
        traces_endpoint,
        logs_endpoint,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{load, GOOD};
    use crate::config::Config;

    fn endpoints(c: &Config) -> (Option<String>, Option<String>) {
        (
            c.telemetry.traces_endpoint.as_ref().map(|u| u.to_string()),
            c.telemetry.logs_endpoint.as_ref().map(|u| u.to_string()),
        )
    }

    #[test]
    fn telemetry_is_off_unless_an_endpoint_is_configured() {
        let c = load(GOOD, &[("OTEL_SERVICE_NAME", "sync-eu")]).unwrap();
        assert!(!c.telemetry.is_enabled());
        assert_eq!(c.telemetry.timeout, DEFAULT_TELEMETRY_TIMEOUT);
        let c = load(
            &format!("{GOOD}[telemetry]\notlp_endpoint = \"http://collector:4318\"\n"),
            &[("OTEL_SDK_DISABLED", "true")],
        )
        .unwrap();
        assert!(!c.telemetry.is_enabled(), "OTEL_SDK_DISABLED wins");
    }

    #[test]
    fn the_otlp_endpoint_gets_the_specification_paths_from_the_file_or_the_environment() {
        let file = format!("{GOOD}[telemetry]\notlp_endpoint = \"http://collector:4318\"\n");
        let c = load(&file, &[]).unwrap();
        assert_eq!(
            endpoints(&c),
            (
                Some("http://collector:4318/v1/traces".to_owned()),
                Some("http://collector:4318/v1/logs".to_owned())
            )
        );
        let c = load(
            &file,
            &[(
                "BYNDER_USAGE_SYNC_TELEMETRY__OTLP_ENDPOINT",
                "https://otel.example/otlp/",
            )],
        )
        .unwrap();
        assert_eq!(
            endpoints(&c).0.as_deref(),
            Some("https://otel.example/otlp/v1/traces")
        );
        // The standard variables: the generic one under this crate's key, the signal's own
        // (a full URL) over it, and `none` turning a signal off.
        let c = load(
            GOOD,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:4318"),
                (
                    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                    "http://logs:4318/custom",
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            endpoints(&c),
            (
                Some("http://agent:4318/v1/traces".to_owned()),
                Some("http://logs:4318/custom".to_owned())
            )
        );
        let c = load(
            &file,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:4318"),
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ],
        )
        .unwrap();
        assert_eq!(
            endpoints(&c),
            (None, Some("http://collector:4318/v1/logs".to_owned()))
        );
        assert_eq!(c.telemetry.timeout, Duration::from_millis(2500));
        let c = load(
            &format!("{file}timeout = \"1s\"\n"),
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")],
        )
        .unwrap();
        assert_eq!(c.telemetry.timeout, Duration::from_secs(1));
    }

    #[test]
    fn a_changed_telemetry_section_waits_for_a_restart() {
        let old = load(GOOD, &[]).unwrap();
        let new = load(
            &format!("{GOOD}[telemetry]\notlp_endpoint = \"http://collector:4318\"\n"),
            &[],
        )
        .unwrap();
        let reload = old.reload(new);
        // (Each load has its own folder, so `[database]` differs too.)
        assert!(
            reload.needs_restart.contains(&"[telemetry]"),
            "{:?}",
            reload.needs_restart
        );
        assert!(reload.applied.is_empty());
        assert!(
            !reload.config.telemetry.is_enabled(),
            "the running value stays"
        );
    }

    #[test]
    fn a_bad_telemetry_setting_names_the_key_or_variable_without_a_password() {
        let err = load(
            &format!(
                "{GOOD}[telemetry]\notlp_endpoint = \"https://user:hunter2@collector:4318\"\n"
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = load(GOOD, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{err}");
        let err = load(&format!("{GOOD}[telemetry]\ntimeout = \"0s\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.timeout"), "{err}");
        let err = load(&format!("{GOOD}[telemetry]\nheaders = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.headers"), "{err}");
        let c = load(GOOD, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("OTEL_EXPORTER_OTLP_PROTOCOL")),
            "{:?}",
            c.warnings
        );
    }
}

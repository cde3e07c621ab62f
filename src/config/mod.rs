//! Configuration: typed settings loaded once at start-up and passed down.
//!
//! Layers, later ones winning: built-in defaults, the TOML file, then environment variables
//! `BYNDER_USAGE_SYNC_<SECTION>__<KEY>` (e.g. `BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN`). Every
//! secret is also accepted as `<key>_file`, a path whose content is the secret (systemd credentials,
//! container secrets). Validation happens here, once; a problem becomes a [`ConfigError`] naming the
//! key, its environment variable and the fix. Nothing else in the crate reads `std::env`.

pub mod show;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::magic::RelativePathBuf;
use figment::Figment;
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

/// Prefix of every environment variable that overrides a config key.
pub const ENV_PREFIX: &str = "BYNDER_USAGE_SYNC_";
/// Where the config file is looked for when neither `--config` nor the env variable names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/bynder-usage-sync/config.toml";
/// Where the state database lives when `database.path` is not set.
pub const DEFAULT_DATABASE_PATH: &str = "/var/lib/bynder-usage-sync/state.db";

/// A configuration problem the user can fix. Exit code 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {message}")]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    fn key(key: &str, problem: impl std::fmt::Display, fix: impl std::fmt::Display) -> Self {
        ConfigError {
            message: format!("`{key}` (env {}) {problem}. Fix: {fix}", env_var(key)),
        }
    }

    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }
}

/// The environment variable that overrides a dotted config key.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub bynder: BynderSettings,
    pub auth: AuthSettings,
    pub database: DatabaseSettings,
    pub sync: SyncSettings,
    pub source: SourceSettings,
    pub limits: LimitSettings,
    pub retry: RetrySettings,
    pub log: LogSettings,
    pub server: ServerSettings,
    pub daemon: DaemonSettings,
    pub runs: RunsSettings,
    pub telemetry: TelemetrySettings,
    /// Problems worth a warning that do not stop start-up; logged once tracing is set up.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct BynderSettings {
    /// The portal root, without a trailing slash, e.g. `https://acme.bynder.com`.
    pub base_url: Url,
    pub integration_id: String,
    pub ca_file: Option<PathBuf>,
    pub allow_insecure_http: bool,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Largest answer body read from the portal (usage API, token endpoint, `raw`).
    pub max_response_bytes: u64,
}

/// How requests are authenticated (`[auth] method = …`). Secrets stay wrapped
/// ([`SecretString`] prints as `[REDACTED]`) until the adapter in `auth` that sends them.
#[derive(Debug, Clone)]
pub enum AuthSettings {
    /// `Authorization: Bearer <permanent token>`.
    PermanentToken { token: SecretString },
    /// OAuth 2 client credentials: the daemon fetches its own access tokens.
    ClientCredentials(OAuth2Settings),
    /// OAuth 2 authorization code + refresh token: `auth login` stores the refresh token in the
    /// state database once; the daemon refreshes on its own afterwards.
    RefreshToken(OAuth2Settings),
    /// Legacy OAuth 1.0a: every request signed with HMAC-SHA1.
    OAuth1(OAuth1Settings),
}

/// Default `auth.scopes` (Bynder's scope names; `offline` is added by `auth login`): the usage
/// scopes only. Bynder's own setup guide registers apps without `current.user:read`, and a token
/// request for a scope the app lacks is refused outright (`invalid_scope`).
pub const DEFAULT_SCOPES: &str = "asset.usage:read asset.usage:write";
/// Default `auth.redirect_uri`: a loopback address `auth login` listens on. Register it with the
/// OAuth app in Bynder, or set your own.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

/// The OAuth 2 app: the same keys serve `client_credentials` and `refresh_token`.
#[derive(Debug, Clone)]
pub struct OAuth2Settings {
    pub client_id: String,
    pub client_secret: SecretString,
    pub scopes: Vec<String>,
    /// `auth.token_url`, by default `{base_url}/v6/authentication/oauth2/token`.
    pub token_url: Url,
    /// `{base_url}/v6/authentication/oauth2/auth` (the browser step of `auth login`).
    pub auth_url: Url,
    pub client_auth: ClientAuth,
    /// Where Bynder sends the browser back to after `auth login`.
    pub redirect_uri: Url,
}

/// How the client authenticates at the token endpoint (Bynder accepts both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (Bynder's own plugins, most SDKs).
    Body,
    /// `Authorization: Basic base64(id:secret)` (the JS SDK).
    Basic,
}

/// A legacy OAuth 1.0a consumer, with a token pair from the config or, when absent, the one
/// `auth oauth1-login` stored in the state database.
#[derive(Debug, Clone)]
pub struct OAuth1Settings {
    pub consumer_key: String,
    pub consumer_secret: SecretString,
    pub token: Option<OAuth1TokenPair>,
}

/// An OAuth 1.0a access token and its secret.
#[derive(Debug, Clone)]
pub struct OAuth1TokenPair {
    pub token: SecretString,
    pub token_secret: SecretString,
}

impl AuthSettings {
    pub fn method_name(&self) -> &'static str {
        match self {
            AuthSettings::PermanentToken { .. } => "permanent_token",
            AuthSettings::ClientCredentials(_) => "client_credentials",
            AuthSettings::RefreshToken(_) => "refresh_token",
            AuthSettings::OAuth1(_) => "oauth1",
        }
    }

    /// Whether the credentials live (partly) in the state database: a refresh token, or an
    /// OAuth 1.0a token pair that the config does not give.
    pub fn needs_store(&self) -> bool {
        match self {
            AuthSettings::RefreshToken(_) => true,
            AuthSettings::OAuth1(s) => s.token.is_none(),
            AuthSettings::PermanentToken { .. } | AuthSettings::ClientCredentials(_) => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    pub busy_timeout: Duration,
    /// Share the state folder and files with a group (folders 2770, files 0660) instead of
    /// keeping them private to the daemon's user (0700, 0600).
    pub group_shared: bool,
    /// Longest wait for the run lock another process holds before giving up with an error.
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// When not empty, only usages whose uri starts with one of these are ours to manage.
    pub uri_prefixes: Vec<String>,
    /// A run planning more deletes than this stops before sending any (`--allow-mass-delete`).
    pub max_deletes: u64,
    /// How changes are sent to Bynder.
    pub strategy: Strategy,
    /// Most usages listed in one sync-endpoint request (halved automatically on 413).
    pub batch_size: usize,
    /// When `run` reconciles: a 6-field cron expression, seconds first, in UTC.
    pub schedule: String,
    /// When `run` repairs drift (reads Bynder back): same syntax.
    pub verify_schedule: String,
    /// When not empty, only uris with one of these schemes (lowercase, without `:`) are sent.
    pub uri_schemes: Vec<String>,
}

/// Default `sync.schedule`: every 5 minutes.
pub const DEFAULT_SCHEDULE: &str = "0 */5 * * * *";
/// Default `sync.verify_schedule`: daily at 03:17 UTC.
pub const DEFAULT_VERIFY_SCHEDULE: &str = "0 17 3 * * *";
/// Default `server.listen`: loopback only; the status page is not meant for the internet.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// Default `server.max_connections`: well under systemd's default 1,024 descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default `bynder.max_response_size`: 16 MiB, far above any real answer.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// Default `database.lock_timeout`.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// The daemon's HTTP endpoints (`/healthz`, `/readyz`, `/metrics`, the status page).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: std::net::SocketAddr,
    /// `Host` names answered besides loopback names and the listen address itself.
    pub allowed_hosts: Vec<String>,
    /// When set, every endpoint but `/healthz` and `/readyz` requires `Authorization: Bearer`.
    pub token: Option<SecretString>,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    pub idle_timeout: Duration,
}

/// The run history (`[runs]`).
#[derive(Debug, Clone)]
pub struct RunsSettings {
    /// Finished runs older than this are deleted (the last successful reconcile is always kept).
    pub keep: Duration,
}

/// Default `runs.keep`: 30 days.
pub const DEFAULT_RUNS_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// How `run` behaves as a service.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// After SIGTERM/SIGINT: how long in-flight requests may take before the process exits
    /// anyway (their operations are read back at the next start).
    pub shutdown_timeout: Duration,
}

/// How changes reach Bynder (`sync.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// `POST /api/media/usage/sync`, usages grouped by uri.
    SyncEndpoint,
    /// One create or delete call per usage.
    PerUsage,
    /// The sync endpoint, falling back to per-usage calls for the rest of the run when the portal
    /// answers it with 404, 405 or 501.
    Auto,
}

/// Where the desired state comes from (`[source]`).
#[derive(Debug, Clone, Default)]
pub struct SourceSettings {
    /// The CMS's own SQLite file, opened read-only; by default the state database.
    pub database: Option<PathBuf>,
    /// A custom `SELECT` returning `asset_id, uri, additional`; by default
    /// `SELECT asset_id, uri, additional FROM cms_asset_references`.
    pub query: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub concurrency: usize,
    pub requests_per_second: u32,
    /// How long all sending stops after Bynder answers 429.
    pub block_pause: Duration,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts one run makes for an operation before leaving it queued for the next run.
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A tracing filter (`info`, `bynder_usage_sync=debug`…); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

// ---- raw, as deserialized -------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    bynder: RawBynder,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    source: RawSource,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    runs: RawRuns,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuns {
    #[serde(default, with = "humantime_serde")]
    keep: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBynder {
    base_url: Option<String>,
    integration_id: Option<String>,
    ca_file: Option<RelativePathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    max_response_size: Option<bytesize::ByteSize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    method: Option<String>,
    permanent_token: Option<SecretString>,
    permanent_token_file: Option<RelativePathBuf>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    client_secret_file: Option<RelativePathBuf>,
    scopes: Option<RawScopes>,
    token_url: Option<String>,
    client_auth: Option<String>,
    redirect_uri: Option<String>,
    consumer_key: Option<String>,
    consumer_secret: Option<SecretString>,
    consumer_secret_file: Option<RelativePathBuf>,
    token: Option<SecretString>,
    token_file: Option<RelativePathBuf>,
    token_secret: Option<SecretString>,
    token_secret_file: Option<RelativePathBuf>,
}

/// `scopes` as OAuth writes them (`"a b c"`) or as a TOML list.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawScopes {
    Text(String),
    List(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<RelativePathBuf>,
    #[serde(default, with = "humantime_serde")]
    busy_timeout: Option<Duration>,
    #[serde(default)]
    group_shared: bool,
    #[serde(default, with = "humantime_serde")]
    lock_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    #[serde(default)]
    uri_prefixes: Vec<String>,
    max_deletes: Option<u64>,
    strategy: Option<Strategy>,
    batch_size: Option<usize>,
    schedule: Option<String>,
    verify_schedule: Option<String>,
    #[serde(default)]
    uri_schemes: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    token_file: Option<RelativePathBuf>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSource {
    database: Option<RelativePathBuf>,
    query: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    concurrency: Option<usize>,
    requests_per_second: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    block_pause: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default, with = "humantime_serde")]
    initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_backoff: Option<Duration>,
    max_attempts: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

/// Where the config file comes from, so a missing default file is not an error (containers
/// configure through the environment alone) while a named one must exist.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Explicit(PathBuf),
    Default,
}

impl ConfigSource {
    pub fn path(&self) -> &Path {
        match self {
            ConfigSource::Explicit(p) => p,
            ConfigSource::Default => Path::new(DEFAULT_CONFIG_PATH),
        }
    }
}

/// Loads and validates the configuration: file (if any), then environment.
pub fn load_config(source: &ConfigSource) -> Result<Config, ConfigError> {
    load_config_from(source, Env::prefixed(ENV_PREFIX))
}

/// The keys whose values are secrets: never shown in a message, always read as text.
const SECRET_KEYS: [&str; 5] = [
    "auth.permanent_token",
    "auth.client_secret",
    "auth.consumer_secret",
    "auth.token",
    "auth.token_secret",
];

fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

fn load_config_from(source: &ConfigSource, env: Env) -> Result<Config, ConfigError> {
    let path = source.path();
    let mut figment = Figment::new();
    let mut warnings = Vec::new();
    match (source, path.exists()) {
        (_, true) => {
            if path.is_dir() {
                return Err(ConfigError::new(format!(
                    "{} is a directory, not a config file. Fix: pass the path of the TOML file \
                     with --config or BYNDER_USAGE_SYNC_CONFIG",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(format!(
                    "cannot read config file {}: {e}. Fix: check the path and its permissions",
                    path.display()
                ))
            })?;
            // Parsed here first: the parser's own message quotes the offending line, which may
            // hold a secret with a missing quote.
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::new(describe_toml_error(path, &text, &e)))?;
            warnings.extend(secrets_readable_by_others(path, &table));
            figment = figment.merge(Toml::file_exact(path));
        }
        (ConfigSource::Explicit(_), false) => {
            return Err(ConfigError::new(format!(
                "config file {} does not exist. Fix: pass the right path with --config (or \
                 BYNDER_USAGE_SYNC_CONFIG); config/example.toml shows every key",
                path.display()
            )));
        }
        (ConfigSource::Default, false) => {}
    }
    // `CONFIG` is the variable naming the file itself, not a key inside it. Secrets are taken
    // verbatim: figment would read `0123` as the number 123.
    let env = env.split("__").ignore(&["config"]);
    let secrets: Vec<(String, String)> = env
        .iter()
        .filter(|(key, _)| is_secret_key(key.as_str()))
        .map(|(key, value)| (key.as_str().to_ascii_lowercase(), value))
        .collect();
    let mut figment = figment.merge(env.filter(|key| !is_secret_key(key.as_str())));
    for (key, value) in secrets {
        figment = figment.merge(figment::providers::Serialized::default(&key, value));
    }
    let missing_default = matches!(source, ConfigSource::Default) && !path.exists();
    let explain = |e: ConfigError| {
        if missing_default {
            ConfigError::new(format!(
                "{}; no config file was read: {} does not exist and no --config was given. Fix: \
                 pass --config PATH (or BYNDER_USAGE_SYNC_CONFIG), or configure everything \
                 through BYNDER_USAGE_SYNC_* variables",
                e.message,
                path.display()
            ))
        } else {
            e
        }
    };
    let raw: RawConfig = figment
        .extract()
        .map_err(describe_figment_error)
        .map_err(explain)?;
    warnings.extend(secret_files_readable_by_others(&raw));
    let otel = OtelEnv::from_process();
    warnings.extend(otel.warnings());
    let mut config = validate(raw, &otel).map_err(explain)?;
    warnings.extend(schedules_that_never_fire(&config.sync));
    config.warnings = warnings;
    Ok(config)
}

/// A TOML syntax error by position and reason, without the line itself.
fn describe_toml_error(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(" at line {line}, column {column}")
        }
        None => String::new(),
    };
    format!(
        "the config file {} is not valid TOML{place}: {} (the line is not shown: it may hold a \
         secret). Fix: correct the syntax there, e.g. close the quotes of a string value",
        path.display(),
        error.message().trim()
    )
}

fn describe_figment_error(error: figment::Error) -> ConfigError {
    let messages: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let place = match &e.metadata {
                Some(m) if m.name.contains("environment") => " (from the environment)".to_owned(),
                Some(m) => match &m.source {
                    Some(src) => format!(" (in {src})"),
                    None => String::new(),
                },
                None => String::new(),
            };
            match &e.kind {
                figment::error::Kind::UnknownField(field, _) => {
                    // figment's path may already end with the unknown field itself.
                    let full = if key.is_empty() || key == *field || key.ends_with(&format!(".{field}")) {
                        if key.is_empty() { field.clone() } else { key.clone() }
                    } else {
                        format!("{key}.{field}")
                    };
                    format!(
                        "unknown key `{full}`{place}. Fix: remove it or correct its spelling; \
                         config/example.toml lists every key"
                    )
                }
                _ if is_secret_key(&key) => format!(
                    "`{key}` (env {}){place} must be text (its value is not shown). Fix: write \
                     it in quotes, or use `{key}_file`",
                    env_var(&key)
                ),
                kind if key.is_empty() => format!("{kind}{place}"),
                kind => format!(
                    "`{key}` (env {}){place}: {kind}. Fix: give it a value of the right type, as in \
                     config/example.toml",
                    env_var(&key)
                ),
            }
        })
        .collect();
    ConfigError::new(messages.join("; "))
}

fn validate(raw: RawConfig, otel: &OtelEnv) -> Result<Config, ConfigError> {
    let bynder = validate_bynder(raw.bynder)?;
    let auth = validate_auth(raw.auth, &bynder)?;

    let database = DatabaseSettings {
        path: raw
            .database
            .path
            .map(|p| p.relative())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE_PATH)),
        busy_timeout: raw.database.busy_timeout.unwrap_or(Duration::from_secs(30)),
        group_shared: raw.database.group_shared,
        lock_timeout: raw.database.lock_timeout.unwrap_or(DEFAULT_LOCK_TIMEOUT),
    };
    if database.lock_timeout.is_zero() {
        return Err(ConfigError::key(
            "database.lock_timeout",
            "must be longer than zero",
            "use the default, \"10m\"",
        ));
    }

    for prefix in &raw.sync.uri_prefixes {
        if prefix.trim().is_empty() {
            return Err(ConfigError::key(
                "sync.uri_prefixes",
                "contains an empty prefix, which would match every uri",
                "remove it, or list the prefixes your CMS owns, e.g. [\"https://shop.example/\"]",
            ));
        }
    }
    let mut uri_schemes = Vec::new();
    for scheme in &raw.sync.uri_schemes {
        let clean = scheme.trim().trim_end_matches(':').to_ascii_lowercase();
        let valid = clean.starts_with(|c: char| c.is_ascii_alphabetic())
            && clean
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid {
            return Err(ConfigError::key(
                "sync.uri_schemes",
                format_args!("contains {scheme:?}, which is not a uri scheme"),
                "list schemes without \"://\", e.g. [\"https\", \"http\"]",
            ));
        }
        uri_schemes.push(clean);
    }
    let sync = SyncSettings {
        uri_prefixes: raw.sync.uri_prefixes,
        uri_schemes,
        max_deletes: raw.sync.max_deletes.unwrap_or(1000),
        strategy: raw.sync.strategy.unwrap_or(Strategy::Auto),
        batch_size: raw.sync.batch_size.unwrap_or(1000),
        schedule: validate_cron("sync.schedule", raw.sync.schedule, DEFAULT_SCHEDULE)?,
        verify_schedule: validate_cron(
            "sync.verify_schedule",
            raw.sync.verify_schedule,
            DEFAULT_VERIFY_SCHEDULE,
        )?,
    };
    let server = validate_server(raw.server)?;
    let daemon = DaemonSettings {
        shutdown_timeout: raw
            .daemon
            .shutdown_timeout
            .unwrap_or(Duration::from_secs(30)),
    };
    if sync.batch_size == 0 {
        return Err(ConfigError::key(
            "sync.batch_size",
            "must be at least 1",
            "use the default, 1000",
        ));
    }
    let source = validate_source(raw.source)?;
    let runs = RunsSettings {
        keep: raw.runs.keep.unwrap_or(DEFAULT_RUNS_KEEP),
    };
    if runs.keep < Duration::from_secs(3600) {
        return Err(ConfigError::key(
            "runs.keep",
            "is shorter than one hour",
            "use the default, \"30days\"",
        ));
    }

    let limits = LimitSettings {
        concurrency: raw.limits.concurrency.unwrap_or(4),
        requests_per_second: raw.limits.requests_per_second.unwrap_or(10),
        block_pause: raw.limits.block_pause.unwrap_or(Duration::from_secs(310)),
    };
    if limits.concurrency == 0 || limits.concurrency > 64 {
        return Err(ConfigError::key(
            "limits.concurrency",
            "must be between 1 and 64",
            "use the default, 4",
        ));
    }
    if limits.requests_per_second == 0 {
        return Err(ConfigError::key(
            "limits.requests_per_second",
            "must be at least 1",
            "use Bynder's guidance, 10",
        ));
    }

    let retry = RetrySettings {
        initial_backoff: raw.retry.initial_backoff.unwrap_or(Duration::from_secs(1)),
        max_backoff: raw.retry.max_backoff.unwrap_or(Duration::from_secs(60)),
        max_attempts: raw.retry.max_attempts.unwrap_or(6),
    };
    if retry.max_attempts == 0 {
        return Err(ConfigError::key(
            "retry.max_attempts",
            "must be at least 1",
            "use the default, 6",
        ));
    }
    if retry.max_backoff < retry.initial_backoff {
        return Err(ConfigError::key(
            "retry.max_backoff",
            "is shorter than retry.initial_backoff",
            "make it at least as long as retry.initial_backoff",
        ));
    }

    let log = LogSettings {
        level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
        format: raw.log.format.unwrap_or(LogFormat::Text),
    };
    let telemetry = validate_telemetry(raw.telemetry, otel)?;

    Ok(Config {
        bynder,
        auth,
        database,
        sync,
        source,
        limits,
        retry,
        log,
        server,
        daemon,
        runs,
        telemetry,
        warnings: Vec::new(),
    })
}

/// The standard OpenTelemetry variables this crate decides on itself (the exporter reads the
/// headers, compression and batch settings on its own). Read once, here, like every other part
/// of the environment.
#[derive(Debug, Default)]
struct OtelEnv {
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
    fn from_process() -> OtelEnv {
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
    fn warnings(&self) -> Vec<String> {
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

fn validate_telemetry(raw: RawTelemetry, otel: &OtelEnv) -> Result<TelemetrySettings, ConfigError> {
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

/// When a schedule (six fields, seconds first, UTC, as the scheduler reads it) next fires after
/// `after`; `None` when it never does (e.g. February 30th).
pub fn next_fire(
    schedule: &str,
    after: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .ok()?
        .find_next_occurrence(&after, false)
        .ok()
}

/// A warning for each schedule that never fires.
fn schedules_that_never_fire(sync: &SyncSettings) -> Vec<String> {
    [
        ("sync.schedule", &sync.schedule, "reconcile"),
        (
            "sync.verify_schedule",
            &sync.verify_schedule,
            "repair drift",
        ),
    ]
    .into_iter()
    .filter(|(_, schedule, _)| next_fire(schedule, chrono::Utc::now()).is_none())
    .map(|(key, schedule, what)| {
        format!(
            "`{key}` = {schedule:?} never fires (no date matches it), so `run` would {what} only \
             at start. Fix: check the day-of-month and month fields, e.g. \"0 */5 * * * *\" for \
             every 5 minutes"
        )
    })
    .collect()
}

/// A cron expression as tokio-cron-scheduler reads it (six fields, seconds first, UTC).
fn validate_cron(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let Some(text) = value else {
        return Ok(default.to_owned());
    };
    let text = text.trim().to_owned();
    // The scheduler's own parser decides; the field count only makes the message precise.
    let fields = text.split_whitespace().count();
    if tokio_cron_scheduler::Job::new_async(text.as_str(), |_, _| Box::pin(async {})).is_ok() {
        return Ok(text);
    }
    let problem = if fields == 6 {
        format!("is not a valid cron expression ({text:?})")
    } else {
        format!("has {fields} field(s) ({text:?}), not 6")
    };
    Err(ConfigError::key(
        key,
        problem,
        format_args!(
            "write six fields, seconds first, in UTC: \"sec min hour day-of-month month \
             day-of-week\", e.g. \"{default}\""
        ),
    ))
}

fn validate_server(raw: RawServer) -> Result<ServerSettings, ConfigError> {
    let text = raw
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = text.trim().parse().map_err(|e| {
        ConfigError::key(
            "server.listen",
            format_args!("is not an address with a port ({text:?}: {e})"),
            format_args!(
                "write ip:port, e.g. \"{DEFAULT_LISTEN}\" (loopback) or \"0.0.0.0:9464\" \
                 (every interface, e.g. in a container)"
            ),
        )
    })?;
    let mut allowed_hosts = Vec::new();
    for host in &raw.allowed_hosts {
        let clean = host.trim().trim_end_matches('.').to_ascii_lowercase();
        if clean.is_empty() || clean.contains(['/', ' ', '@']) {
            return Err(ConfigError::key(
                "server.allowed_hosts",
                format_args!("contains {host:?}, which is not a host name"),
                "list the names clients use to reach the server, e.g. [\"sync.internal.example\"]",
            ));
        }
        allowed_hosts.push(clean);
    }
    let token = resolve_secret("server.token", None, raw.token_file)?;
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(ConfigError::key(
            "server.max_connections",
            "must be at least 1",
            format_args!("use the default, {DEFAULT_MAX_CONNECTIONS}"),
        ));
    }
    let header_timeout = raw.header_timeout.unwrap_or(Duration::from_secs(10));
    let idle_timeout = raw.idle_timeout.unwrap_or(Duration::from_secs(60));
    for (key, value) in [
        ("server.header_timeout", header_timeout),
        ("server.idle_timeout", idle_timeout),
    ] {
        if value.is_zero() {
            return Err(ConfigError::key(
                key,
                "must be longer than zero",
                "use e.g. \"10s\"",
            ));
        }
    }
    Ok(ServerSettings {
        listen,
        allowed_hosts,
        token,
        max_connections,
        header_timeout,
        idle_timeout,
    })
}

fn validate_source(raw: RawSource) -> Result<SourceSettings, ConfigError> {
    let database = raw.database.map(|p| p.relative());
    if let Some(path) = &database {
        if !path.is_file() {
            return Err(ConfigError::key(
                "source.database",
                format_args!("points to {}, which is not a file", path.display()),
                "give the path of the CMS's SQLite database, or remove the key to read cms_asset_references from the state database",
            ));
        }
    }
    let query = raw
        .query
        .map(|q| q.trim().trim_end_matches(';').trim().to_owned());
    if let Some(q) = &query {
        let head = q
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if head != "SELECT" && head != "WITH" {
            return Err(ConfigError::key(
                "source.query",
                "is not a SELECT statement",
                "write a SELECT returning the columns asset_id, uri and additional",
            ));
        }
    }
    if database.is_some() && query.is_none() {
        // The CMS's own file with the product's table name is the default query's assumption.
        return Ok(SourceSettings {
            database,
            query: None,
        });
    }
    Ok(SourceSettings { database, query })
}

fn validate_bynder(raw: RawBynder) -> Result<BynderSettings, ConfigError> {
    let Some(base) = raw.base_url.filter(|s| !s.trim().is_empty()) else {
        return Err(ConfigError::key(
            "bynder.base_url",
            "is missing",
            "set it to your portal's URL, e.g. base_url = \"https://acme.bynder.com\"",
        ));
    };
    let mut url = Url::parse(base.trim()).map_err(|e| {
        ConfigError::key(
            "bynder.base_url",
            format_args!("is not a URL ({e})"),
            "write it with its scheme, e.g. \"https://acme.bynder.com\"",
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" if raw.allow_insecure_http => {}
        "http" => {
            return Err(ConfigError::key(
                "bynder.base_url",
                "uses http://, which would send the token in clear text",
                "use https://, or set bynder.allow_insecure_http = true for a local test portal",
            ))
        }
        other => {
            return Err(ConfigError::key(
                "bynder.base_url",
                format_args!("has scheme `{other}`"),
                "use an https:// URL such as https://acme.bynder.com",
            ))
        }
    }
    reject_userinfo("bynder.base_url", &url)?;
    if url.host_str().is_none() {
        return Err(ConfigError::key(
            "bynder.base_url",
            "has no host",
            "use e.g. https://acme.bynder.com",
        ));
    }
    // Webdam, Bynder's other DAM, has no asset-usage API at all: nothing could ever sync.
    if url.host_str().is_some_and(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        h == "webdamdb.com" || h.ends_with(".webdamdb.com") || h.ends_with(".webdam.com")
    }) {
        return Err(ConfigError::key(
            "bynder.base_url",
            format_args!(
                "points at a Webdam portal ({}), Bynder's other DAM, which has no asset-usage API",
                url.host_str().unwrap_or_default()
            ),
            "asset usages (the Asset Tracker) exist only in Bynder DAM portals: set it to a Bynder \
             portal's URL such as https://acme.bynder.com",
        ));
    }
    if !(url.path() == "/" || url.path().is_empty()) || url.query().is_some() {
        return Err(ConfigError::key(
            "bynder.base_url",
            format_args!("has a path or query ({base})"),
            "give only the portal root, e.g. https://acme.bynder.com (without /api/…)",
        ));
    }
    url.set_path("");

    let Some(integration_id) = raw
        .integration_id
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
    else {
        return Err(ConfigError::key(
            "bynder.integration_id",
            "is missing",
            "set it to the integration id Bynder issued for your CMS (a UUID)",
        ));
    };
    if uuid::Uuid::parse_str(&integration_id).is_err() {
        return Err(ConfigError::key(
            "bynder.integration_id",
            format_args!("is not a UUID ({integration_id})"),
            "use the integration id Bynder issued, e.g. 0191a303-9d99-433e-ada4-d244f37e1d7d",
        ));
    }

    let ca_file = raw.ca_file.map(|p| p.relative());
    if let Some(path) = &ca_file {
        if !path.is_file() {
            return Err(ConfigError::key(
                "bynder.ca_file",
                format_args!("points to {}, which is not a readable file", path.display()),
                "give the path of a PEM certificate, or remove the key",
            ));
        }
    }
    let timeout = raw.timeout.unwrap_or(Duration::from_secs(30));
    if timeout.is_zero() {
        return Err(ConfigError::key(
            "bynder.timeout",
            "must be longer than zero",
            "use e.g. \"30s\"",
        ));
    }
    let max_response_bytes = raw
        .max_response_size
        .map(|s| s.as_u64())
        .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if max_response_bytes < 64 * 1024 {
        return Err(ConfigError::key(
            "bynder.max_response_size",
            "is smaller than 64 KiB, too small for one page of usages",
            "use the default, \"16 MiB\"",
        ));
    }
    Ok(BynderSettings {
        base_url: url,
        max_response_bytes,
        integration_id,
        ca_file,
        allow_insecure_http: raw.allow_insecure_http,
        timeout,
        connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
    })
}

/// A URL with `user:password@` would print the password wherever the URL is shown (`check`,
/// connection errors); Bynder authenticates through `[auth]`, never through the URL.
fn reject_userinfo(key: &str, url: &Url) -> Result<(), ConfigError> {
    if url.username().is_empty() && url.password().is_none() {
        return Ok(());
    }
    Err(ConfigError::key(
        key,
        "contains a user name or password (`user:password@`), which would be shown wherever the URL is printed",
        "remove the `user:password@` part; credentials belong in [auth] (and an \
         authenticating proxy in HTTPS_PROXY)",
    ))
}

const AUTH_METHODS: &str =
    "\"permanent_token\", \"client_credentials\", \"refresh_token\" or \"oauth1\"";

fn validate_auth(raw: RawAuth, bynder: &BynderSettings) -> Result<AuthSettings, ConfigError> {
    let method = raw
        .method
        .clone()
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "permanent_token".to_owned());
    // Which method uses each key: a key set for another method is a mistake worth stopping
    // for (the user believes it is used), not something to ignore silently.
    let keys: [(&str, bool, &[&str]); 11] = [
        (
            "permanent_token",
            raw.permanent_token.is_some() || raw.permanent_token_file.is_some(),
            &["permanent_token"],
        ),
        (
            "client_id",
            raw.client_id.is_some(),
            &["client_credentials", "refresh_token"],
        ),
        (
            "client_secret",
            raw.client_secret.is_some() || raw.client_secret_file.is_some(),
            &["client_credentials", "refresh_token"],
        ),
        (
            "scopes",
            raw.scopes.is_some(),
            &["client_credentials", "refresh_token"],
        ),
        (
            "token_url",
            raw.token_url.is_some(),
            &["client_credentials", "refresh_token"],
        ),
        (
            "client_auth",
            raw.client_auth.is_some(),
            &["client_credentials", "refresh_token"],
        ),
        (
            "redirect_uri",
            raw.redirect_uri.is_some(),
            &["refresh_token"],
        ),
        ("consumer_key", raw.consumer_key.is_some(), &["oauth1"]),
        (
            "consumer_secret",
            raw.consumer_secret.is_some() || raw.consumer_secret_file.is_some(),
            &["oauth1"],
        ),
        (
            "token",
            raw.token.is_some() || raw.token_file.is_some(),
            &["oauth1"],
        ),
        (
            "token_secret",
            raw.token_secret.is_some() || raw.token_secret_file.is_some(),
            &["oauth1"],
        ),
    ];
    if !matches!(
        method.as_str(),
        "permanent_token" | "client_credentials" | "refresh_token" | "oauth1"
    ) {
        return Err(ConfigError::key(
            "auth.method",
            format_args!("is `{method}`, which is not a known method"),
            format_args!("use one of {AUTH_METHODS}"),
        ));
    }
    for (key, set, used_by) in keys {
        if set && !used_by.contains(&method.as_str()) {
            let default = if raw.method.is_none() {
                " (the default)"
            } else {
                ""
            };
            return Err(ConfigError::key(
                &format!("auth.{key}"),
                format_args!(
                    "is set, but auth.method is \"{method}\"{default}, which does not use it"
                ),
                format_args!(
                    "remove it, or set auth.method = \"{}\" if that is the method you mean",
                    used_by[0]
                ),
            ));
        }
    }

    match method.as_str() {
        "permanent_token" => {
            let token = required_secret(
                "auth.permanent_token",
                raw.permanent_token,
                raw.permanent_token_file,
                "the permanent token (Settings > Advanced Settings > Portal Settings > Permanent Tokens)",
            )?;
            Ok(AuthSettings::PermanentToken { token })
        }
        "client_credentials" | "refresh_token" => {
            let settings = validate_oauth2(raw, bynder)?;
            Ok(if method == "client_credentials" {
                AuthSettings::ClientCredentials(settings)
            } else {
                AuthSettings::RefreshToken(settings)
            })
        }
        _ => {
            let consumer_key = required_text(
                "auth.consumer_key",
                raw.consumer_key,
                "the consumer key of the OAuth 1 app (Settings > Portal settings > API tokens)",
            )?;
            let consumer_secret = required_secret(
                "auth.consumer_secret",
                raw.consumer_secret,
                raw.consumer_secret_file,
                "the consumer secret of the OAuth 1 app",
            )?;
            let token = resolve_secret("auth.token", raw.token, raw.token_file)?;
            let token_secret =
                resolve_secret("auth.token_secret", raw.token_secret, raw.token_secret_file)?;
            let token =
                match (token, token_secret) {
                    (Some(token), Some(token_secret)) => Some(OAuth1TokenPair {
                        token,
                        token_secret,
                    }),
                    (None, None) => None,
                    (Some(_), None) => return Err(ConfigError::key(
                        "auth.token_secret",
                        "is missing while auth.token is set",
                        "give both auth.token and auth.token_secret, or neither to use the pair \
                         `bynder-usage-sync auth oauth1-login` stores",
                    )),
                    (None, Some(_)) => return Err(ConfigError::key(
                        "auth.token",
                        "is missing while auth.token_secret is set",
                        "give both auth.token and auth.token_secret, or neither to use the pair \
                         `bynder-usage-sync auth oauth1-login` stores",
                    )),
                };
            Ok(AuthSettings::OAuth1(OAuth1Settings {
                consumer_key,
                consumer_secret,
                token,
            }))
        }
    }
}

fn validate_oauth2(raw: RawAuth, bynder: &BynderSettings) -> Result<OAuth2Settings, ConfigError> {
    let client_id = required_text(
        "auth.client_id",
        raw.client_id,
        "the client id of the OAuth app (Settings > Advanced Settings > Portal Settings > OAuth Apps)",
    )?;
    let client_secret = required_secret(
        "auth.client_secret",
        raw.client_secret,
        raw.client_secret_file,
        "the client secret of the OAuth app (shown once when the app is created)",
    )?;
    let scopes: Vec<String> = match raw.scopes {
        None => DEFAULT_SCOPES
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        Some(RawScopes::Text(text)) => text.split_whitespace().map(str::to_owned).collect(),
        Some(RawScopes::List(list)) => list
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_owned)
            .collect(),
    };
    if scopes.is_empty() {
        return Err(ConfigError::key(
            "auth.scopes",
            "is empty",
            format_args!("remove it to use the default, \"{DEFAULT_SCOPES}\""),
        ));
    }
    let endpoint = |path: &str| {
        let mut url = bynder.base_url.clone();
        url.set_path(path);
        url
    };
    let token_url = match raw.token_url.filter(|u| !u.trim().is_empty()) {
        None => endpoint("/v6/authentication/oauth2/token"),
        Some(text) => {
            let url = Url::parse(text.trim()).map_err(|e| {
                ConfigError::key(
                    "auth.token_url",
                    format_args!("is not a URL ({e})"),
                    "remove it to use {base_url}/v6/authentication/oauth2/token",
                )
            })?;
            match url.scheme() {
                "https" => {}
                "http" if bynder.allow_insecure_http => {}
                _ => return Err(ConfigError::key(
                    "auth.token_url",
                    "is not an https:// URL, and the client secret would travel over it",
                    "use https://, or remove it to use {base_url}/v6/authentication/oauth2/token",
                )),
            }
            reject_userinfo("auth.token_url", &url)?;
            url
        }
    };
    let client_auth = match raw.client_auth.as_deref().map(str::trim) {
        None | Some("body") => ClientAuth::Body,
        Some("basic") => ClientAuth::Basic,
        Some(other) => {
            return Err(ConfigError::key(
                "auth.client_auth",
                format_args!("is `{other}`"),
                "use \"body\" (client_id and client_secret in the form body, the default) or \"basic\" (HTTP Basic)",
            ))
        }
    };
    let redirect_text = raw
        .redirect_uri
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_REDIRECT_URI.to_owned());
    let redirect_uri = Url::parse(redirect_text.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| {
            ConfigError::key(
                "auth.redirect_uri",
                format_args!("is not an http(s) URL ({redirect_text})"),
                format_args!(
                    "use the redirect URI registered with the OAuth app, e.g. {DEFAULT_REDIRECT_URI}"
                ),
            )
        })?;
    Ok(OAuth2Settings {
        client_id,
        client_secret,
        scopes,
        token_url,
        auth_url: endpoint("/v6/authentication/oauth2/auth"),
        client_auth,
        redirect_uri,
    })
}

fn required_text(key: &str, value: Option<String>, what: &str) -> Result<String, ConfigError> {
    value
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ConfigError::key(key, "is missing", format_args!("set it to {what}")))
}

fn required_secret(
    key: &str,
    inline: Option<SecretString>,
    file: Option<RelativePathBuf>,
    what: &str,
) -> Result<SecretString, ConfigError> {
    resolve_secret(key, inline, file)?.ok_or_else(|| {
        ConfigError::key(
            key,
            "is missing",
            format_args!(
                "set it to {what}, or {key}_file (env {}) to a file holding it",
                env_var(&format!("{key}_file"))
            ),
        )
    })
}

/// A secret given inline or as `<key>_file`; never both.
fn resolve_secret(
    key: &str,
    inline: Option<SecretString>,
    file: Option<RelativePathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
    use secrecy::ExposeSecret;
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::key(
            key,
            format_args!("is set together with `{key}_file`"),
            "keep only one of them",
        )),
        (Some(secret), None) => {
            if secret.expose_secret().trim().is_empty() {
                return Err(ConfigError::key(key, "is empty", "give the secret's value"));
            }
            Ok(Some(secret))
        }
        (None, Some(path)) => {
            let path = path.relative();
            let file_key = format!("{key}_file");
            let content = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::key(
                    &file_key,
                    format_args!("points to {}, which cannot be read ({e})", path.display()),
                    "check the path and that the service user may read it",
                )
            })?;
            let value = content.trim_end_matches(['\n', '\r']).trim();
            if value.is_empty() {
                return Err(ConfigError::key(
                    &file_key,
                    format_args!("points to {}, which is empty", path.display()),
                    "write the secret into that file",
                ));
            }
            Ok(Some(SecretString::from(value.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// A warning when a config file holding secrets can be read by other users. Decided from the
/// parsed file, so inline tables (`auth = { permanent_token = … }`) count too.
fn secrets_readable_by_others(path: &Path, table: &toml::Table) -> Option<String> {
    let holds_secret = SECRET_KEYS.iter().any(|key| {
        let mut value = None::<&toml::Value>;
        for (i, part) in key.split('.').enumerate() {
            value = match (i, value) {
                (0, _) => table.get(part),
                (_, Some(toml::Value::Table(t))) => t.get(part),
                _ => None,
            };
        }
        value.is_some()
    });
    (holds_secret && readable_by_others(path)).then(|| {
        format!(
            "the config file {} holds a secret and other users can read it. Fix: `chmod 600` it, \
             or move the secret to a *_file key or an environment variable",
            path.display()
        )
    })
}

/// One warning per `*_file` secret that other users can read.
fn secret_files_readable_by_others(raw: &RawConfig) -> Vec<String> {
    let auth = &raw.auth;
    [
        ("auth.permanent_token_file", &auth.permanent_token_file),
        ("auth.client_secret_file", &auth.client_secret_file),
        ("auth.consumer_secret_file", &auth.consumer_secret_file),
        ("auth.token_file", &auth.token_file),
        ("auth.token_secret_file", &auth.token_secret_file),
        ("server.token_file", &raw.server.token_file),
    ]
    .into_iter()
    .filter_map(|(key, file)| {
        let path = file.as_ref()?.relative();
        readable_by_others(&path).then(|| {
            format!(
                "the secret file {} (`{key}`) can be read by other users. Fix: `chmod 600` it \
                 (or 640 with the service's group as owner group)",
                path.display()
            )
        })
    })
    .collect()
}

fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// What a configuration reload changes: the settings a running daemon applies, and the sections
/// whose change waits for a restart (connections, credentials and files opened at start).
#[derive(Debug)]
pub struct Reload {
    /// The running configuration with every run-time setting taken from the new file.
    pub config: Config,
    /// Run-time keys whose value changed, e.g. `sync.schedule`.
    pub applied: Vec<&'static str>,
    /// Sections or keys that changed but apply only after a restart, e.g. `[auth]`.
    pub needs_restart: Vec<&'static str>,
}

impl Config {
    /// Takes from `new` what a running daemon can change (log level, schedules, limits, retry,
    /// the sync settings, the shutdown timeout) and lists what it cannot.
    pub fn reload(&self, new: Config) -> Reload {
        let mut applied = Vec::new();
        let mut needs_restart = Vec::new();
        let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
        for (key, old, new) in [
            ("log.level", dbg(&self.log.level), dbg(&new.log.level)),
            (
                "sync.schedule",
                dbg(&self.sync.schedule),
                dbg(&new.sync.schedule),
            ),
            (
                "sync.verify_schedule",
                dbg(&self.sync.verify_schedule),
                dbg(&new.sync.verify_schedule),
            ),
            (
                "sync.uri_prefixes",
                dbg(&self.sync.uri_prefixes),
                dbg(&new.sync.uri_prefixes),
            ),
            (
                "sync.uri_schemes",
                dbg(&self.sync.uri_schemes),
                dbg(&new.sync.uri_schemes),
            ),
            (
                "sync.max_deletes",
                dbg(&self.sync.max_deletes),
                dbg(&new.sync.max_deletes),
            ),
            (
                "sync.strategy",
                dbg(&self.sync.strategy),
                dbg(&new.sync.strategy),
            ),
            (
                "sync.batch_size",
                dbg(&self.sync.batch_size),
                dbg(&new.sync.batch_size),
            ),
            ("[limits]", dbg(&self.limits), dbg(&new.limits)),
            ("[retry]", dbg(&self.retry), dbg(&new.retry)),
            ("[daemon]", dbg(&self.daemon), dbg(&new.daemon)),
            ("runs.keep", dbg(&self.runs), dbg(&new.runs)),
        ] {
            if old != new {
                applied.push(key);
            }
        }
        for (key, old, new) in [
            ("[bynder]", dbg(&self.bynder), dbg(&new.bynder)),
            (
                "[auth]",
                auth_identity(&self.auth),
                auth_identity(&new.auth),
            ),
            ("[database]", dbg(&self.database), dbg(&new.database)),
            ("[source]", dbg(&self.source), dbg(&new.source)),
            (
                "[server]",
                server_identity(&self.server),
                server_identity(&new.server),
            ),
            ("log.format", dbg(&self.log.format), dbg(&new.log.format)),
            ("[telemetry]", dbg(&self.telemetry), dbg(&new.telemetry)),
        ] {
            if old != new {
                needs_restart.push(key);
            }
        }
        let mut config = self.clone();
        config.log.level = new.log.level;
        config.sync = new.sync;
        config.limits = new.limits;
        config.retry = new.retry;
        config.daemon = new.daemon;
        config.runs = new.runs;
        config.warnings = new.warnings;
        Reload {
            config,
            applied,
            needs_restart,
        }
    }
}

/// Everything that identifies the credentials, secrets included: only ever compared, never shown.
fn auth_identity(auth: &AuthSettings) -> String {
    use secrecy::ExposeSecret;
    match auth {
        AuthSettings::PermanentToken { token } => format!("pt {}", token.expose_secret()),
        AuthSettings::ClientCredentials(s) | AuthSettings::RefreshToken(s) => format!(
            "{} {s:?} {}",
            auth.method_name(),
            s.client_secret.expose_secret()
        ),
        AuthSettings::OAuth1(s) => format!(
            "o1 {} {} {:?}",
            s.consumer_key,
            s.consumer_secret.expose_secret(),
            s.token
                .as_ref()
                .map(|p| (p.token.expose_secret(), p.token_secret.expose_secret()))
        ),
    }
}

fn server_identity(server: &ServerSettings) -> String {
    use secrecy::ExposeSecret;
    format!(
        "{server:?} {:?}",
        server.token.as_ref().map(|t| t.expose_secret())
    )
}

impl Config {
    /// A configuration for a portal reached with a permanent token (the demo, tests, benchmarks).
    pub fn for_portal(
        base_url: &str,
        integration_id: &str,
        token: &str,
        database: &Path,
    ) -> Result<Config, ConfigError> {
        let raw = RawConfig {
            bynder: RawBynder {
                base_url: Some(base_url.to_owned()),
                integration_id: Some(integration_id.to_owned()),
                allow_insecure_http: base_url.starts_with("http://"),
                ..RawBynder::default()
            },
            auth: RawAuth {
                permanent_token: Some(SecretString::from(token.to_owned())),
                ..RawAuth::default()
            },
            database: RawDatabase {
                path: Some(RelativePathBuf::from(database)),
                ..RawDatabase::default()
            },
            ..RawConfig::default()
        };
        validate(raw, &OtelEnv::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const GOOD: &str = r#"
[bynder]
base_url = "https://acme.bynder.com/"
integration_id = "0191a303-9d99-433e-ada4-d244f37e1d7d"
[auth]
method = "permanent_token"
permanent_token = "s3cret-token"
[database]
path = "state.db"
"#;

    /// Runs `f` on a config file holding `toml`, with exactly the environment `env`.
    #[allow(clippy::result_large_err)] // figment::Jail's closure type, test only
    pub(super) fn with_config_file<T>(
        toml: &str,
        env: &[(&str, &str)],
        f: impl FnOnce(&ConfigSource) -> T,
    ) -> T {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        let mut f = Some(f);
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in env {
                jail.set_env(k, v);
            }
            let f = f.take().expect("called once");
            out = Some(f(&ConfigSource::Explicit(path.clone())));
            Ok(())
        });
        out.expect("the jail ran")
    }

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        with_config_file(toml, env, load_config)
    }

    #[test]
    fn the_http_endpoint_binds_to_loopback_by_default() {
        let c = load(GOOD, &[]).unwrap();
        assert!(c.server.listen.ip().is_loopback(), "{}", c.server.listen);
        assert_eq!(c.server.listen.port(), 9464);
    }

    #[test]
    fn a_good_file_loads_with_defaults_filled_in() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.bynder.base_url.as_str(), "https://acme.bynder.com/");
        assert_eq!(c.limits.concurrency, 4);
        assert_eq!(c.limits.requests_per_second, 10);
        assert!(
            c.database.path.is_absolute(),
            "relative to the config file's folder"
        );
        let AuthSettings::PermanentToken { token } = &c.auth else {
            panic!("permanent token expected, got {:?}", c.auth)
        };
        assert_eq!(token.expose_secret(), "s3cret-token");
    }

    #[test]
    fn environment_variables_override_the_file() {
        let c = load(
            GOOD,
            &[
                ("BYNDER_USAGE_SYNC_LIMITS__CONCURRENCY", "7"),
                ("BYNDER_USAGE_SYNC_SYNC__URI_PREFIXES", "[\"https://a/\"]"),
                ("BYNDER_USAGE_SYNC_CONFIG", "/ignored"),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.concurrency, 7);
        assert_eq!(c.sync.uri_prefixes, vec!["https://a/".to_owned()]);
    }

    #[test]
    fn a_missing_key_names_the_key_its_env_variable_and_the_fix() {
        let e = load("[bynder]\nbase_url = \"https://a.bynder.com\"\n", &[]).unwrap_err();
        assert!(e.message.contains("bynder.integration_id"), "{e}");
        assert!(
            e.message
                .contains("BYNDER_USAGE_SYNC_BYNDER__INTEGRATION_ID"),
            "{e}"
        );
        assert!(e.message.contains("Fix:"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_unless_explicitly_allowed() {
        let http = GOOD.replace("https://acme.bynder.com/", "http://127.0.0.1:9");
        let e = load(&http, &[]).unwrap_err();
        assert!(e.message.contains("allow_insecure_http"), "{e}");
        let allowed = http.replace("[auth]", "allow_insecure_http = true\n[auth]");
        assert!(load(&allowed, &[]).is_ok());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_reported_by_name() {
        let e = load(&format!("{GOOD}\n[sync]\nuri_prefix = []\n"), &[]).unwrap_err();
        assert!(e.message.contains("sync.uri_prefix"), "{e}");
        let e = load(
            &GOOD.replace("[database]", "[limits]\nconcurrency = \"many\"\n[database]"),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("limits.concurrency"), "{e}");
    }

    #[test]
    fn secrets_can_come_from_a_file_but_not_from_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "from-file\n").unwrap();
        let toml = GOOD.replace(
            "permanent_token = \"s3cret-token\"",
            &format!("permanent_token_file = \"{}\"", secret.display()),
        );
        let c = load(&toml, &[]).unwrap();
        let AuthSettings::PermanentToken { token } = &c.auth else {
            panic!("permanent token expected, got {:?}", c.auth)
        };
        assert_eq!(token.expose_secret(), "from-file");
        let both = toml.replace(
            &format!("permanent_token_file = \"{}\"", secret.display()),
            &format!(
                "permanent_token_file = \"{}\"\npermanent_token = \"x\"",
                secret.display()
            ),
        );
        let e = load(&both, &[]).unwrap_err();
        assert!(e.message.contains("auth.permanent_token"), "{e}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = load(GOOD, &[]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret-token"));
    }

    #[test]
    fn daemon_keys_have_defaults_and_bad_ones_name_the_key() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.sync.schedule, DEFAULT_SCHEDULE);
        assert_eq!(c.sync.verify_schedule, DEFAULT_VERIFY_SCHEDULE);
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(30));

        let c = load(
            &format!("{GOOD}\n[sync]\nschedule = \"*/1 * * * * *\"\n[daemon]\nshutdown_timeout = \"2s\"\n"),
            &[("BYNDER_USAGE_SYNC_SERVER__LISTEN", "0.0.0.0:0")],
        )
        .unwrap();
        assert_eq!(c.sync.schedule, "*/1 * * * * *");
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(2));

        // Five fields (the classic crontab) is the mistake people make.
        let e = load(
            &format!("{GOOD}\n[sync]\nschedule = \"*/5 * * * *\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("`sync.schedule`"), "{e}");
        assert!(e.message.contains("not 6"), "{e}");
        let e = load(
            &format!("{GOOD}\n[sync]\nverify_schedule = \"0 0 25 * * *\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(
            e.message
                .contains("BYNDER_USAGE_SYNC_SYNC__VERIFY_SCHEDULE"),
            "{e}"
        );
        let e = load(&format!("{GOOD}\n[server]\nlisten = \"localhost\"\n"), &[]).unwrap_err();
        assert!(e.message.contains("`server.listen`"), "{e}");
    }

    #[test]
    fn an_explicit_config_path_that_does_not_exist_is_an_error() {
        let e = load_config(&ConfigSource::Explicit("/nonexistent/x.toml".into())).unwrap_err();
        assert!(e.message.contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn a_webdam_portal_is_refused_because_it_has_no_usage_api() {
        for url in ["https://apiv2.webdamdb.com", "https://acme.webdamdb.com/"] {
            let text = GOOD.replace("https://acme.bynder.com", url);
            assert!(text.contains(url), "the fixture names the portal once");
            let e = load(&text, &[]).unwrap_err();
            assert!(e.message.contains("Webdam"), "{e}");
            assert!(e.message.contains("bynder.base_url"), "{e}");
        }
    }

    // ---- [auth] -------------------------------------------------------------------------------

    fn with_auth(auth: &str) -> String {
        let start = GOOD.find("[auth]").unwrap();
        let end = GOOD.find("[database]").unwrap();
        format!("{}[auth]\n{auth}\n{}", &GOOD[..start], &GOOD[end..])
    }

    #[test]
    fn client_credentials_get_bynder_defaults() {
        let c = load(
            &with_auth("method = \"client_credentials\"\nclient_id = \"app\"\nclient_secret = \"cs-s3cret\""),
            &[],
        )
        .unwrap();
        let AuthSettings::ClientCredentials(s) = &c.auth else {
            panic!("{:?}", c.auth)
        };
        assert_eq!(s.client_id, "app");
        assert_eq!(s.client_secret.expose_secret(), "cs-s3cret");
        assert_eq!(s.scopes, ["asset.usage:read", "asset.usage:write"]);
        assert_eq!(
            s.token_url.as_str(),
            "https://acme.bynder.com/v6/authentication/oauth2/token"
        );
        assert_eq!(
            s.auth_url.as_str(),
            "https://acme.bynder.com/v6/authentication/oauth2/auth"
        );
        assert_eq!(s.client_auth, ClientAuth::Body);
        assert!(!c.auth.needs_store());
        assert!(!format!("{c:?}").contains("cs-s3cret"));
    }

    #[test]
    fn oauth2_keys_can_be_overridden_from_file_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client_secret");
        std::fs::write(&secret, "from-file\n").unwrap();
        let c = load(
            &with_auth(&format!(
                "method = \"refresh_token\"\nclient_id = \"app\"\nclient_secret_file = \"{}\"\n\
                 scopes = [\"asset.usage:read\", \"offline\"]\nclient_auth = \"basic\"",
                secret.display()
            )),
            &[
                (
                    "BYNDER_USAGE_SYNC_AUTH__TOKEN_URL",
                    "https://login.example/token",
                ),
                (
                    "BYNDER_USAGE_SYNC_AUTH__REDIRECT_URI",
                    "http://localhost:9999/cb",
                ),
            ],
        )
        .unwrap();
        let AuthSettings::RefreshToken(s) = &c.auth else {
            panic!("{:?}", c.auth)
        };
        assert_eq!(s.client_secret.expose_secret(), "from-file");
        assert_eq!(s.scopes, ["asset.usage:read", "offline"]);
        assert_eq!(s.client_auth, ClientAuth::Basic);
        assert_eq!(s.token_url.as_str(), "https://login.example/token");
        assert_eq!(s.redirect_uri.as_str(), "http://localhost:9999/cb");
        assert!(c.auth.needs_store());
    }

    #[test]
    fn a_missing_oauth2_secret_names_the_key_its_file_variant_and_env_variable() {
        let e = load(
            &with_auth("method = \"client_credentials\"\nclient_id = \"app\""),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("`auth.client_secret`"), "{e}");
        assert!(
            e.message.contains("BYNDER_USAGE_SYNC_AUTH__CLIENT_SECRET"),
            "{e}"
        );
        assert!(
            e.message
                .contains("BYNDER_USAGE_SYNC_AUTH__CLIENT_SECRET_FILE"),
            "{e}"
        );
    }

    #[test]
    fn a_key_of_another_method_is_refused_with_the_method_that_uses_it() {
        let e = load(
            &with_auth("permanent_token = \"x\"\nclient_id = \"app\""),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("auth.client_id"), "{e}");
        assert!(e.message.contains("(the default)"), "{e}");
        assert!(e.message.contains("client_credentials"), "{e}");
        let e = load(&with_auth("method = \"oauth2\""), &[]).unwrap_err();
        assert!(
            e.message.contains("auth.method") && e.message.contains("oauth1"),
            "{e}"
        );
        let e = load(
            &with_auth(
                "method = \"client_credentials\"\nclient_id = \"a\"\nclient_secret = \"b\"\nclient_auth = \"header\"",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("auth.client_auth"), "{e}");
    }

    #[test]
    fn an_insecure_token_url_is_refused() {
        let e = load(
            &with_auth(
                "method = \"client_credentials\"\nclient_id = \"a\"\nclient_secret = \"b\"\ntoken_url = \"http://login.example/token\"",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("auth.token_url"), "{e}");
    }

    #[test]
    fn oauth1_takes_a_token_pair_from_the_config_or_none_at_all() {
        let base = "method = \"oauth1\"\nconsumer_key = \"ck\"\nconsumer_secret = \"cs\"";
        let c = load(&with_auth(base), &[]).unwrap();
        let AuthSettings::OAuth1(s) = &c.auth else {
            panic!("{:?}", c.auth)
        };
        assert!(s.token.is_none());
        assert!(
            c.auth.needs_store(),
            "the pair comes from auth oauth1-login"
        );

        let c = load(
            &with_auth(&format!(
                "{base}\ntoken = \"t\"\ntoken_secret = \"ts-s3cret\""
            )),
            &[],
        )
        .unwrap();
        let AuthSettings::OAuth1(s) = &c.auth else {
            panic!("{:?}", c.auth)
        };
        let pair = s.token.as_ref().unwrap();
        assert_eq!(pair.token.expose_secret(), "t");
        assert_eq!(pair.token_secret.expose_secret(), "ts-s3cret");
        assert!(!c.auth.needs_store());
        assert!(!format!("{c:?}").contains("ts-s3cret"));

        let e = load(&with_auth(&format!("{base}\ntoken = \"t\"")), &[]).unwrap_err();
        assert!(e.message.contains("auth.token_secret"), "{e}");
    }

    /// REGRESSION: the warning was line-based and missed `auth = { permanent_token = … }`; the
    /// modes of `*_file` secrets were never checked.
    #[cfg(unix)]
    #[test]
    fn a_secret_readable_by_others_is_warned_about_wherever_it_is_written() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let inline = GOOD.replace(
            "[auth]\nmethod = \"permanent_token\"\npermanent_token = \"s3cret-token\"\n",
            "",
        );
        let inline = format!("auth = {{ permanent_token = \"s3cret-token\" }}\n{inline}");
        for text in [GOOD.to_owned(), inline] {
            std::fs::write(&path, &text).unwrap();
            let table: toml::Table = toml::from_str(&text).unwrap();
            chmod(&path, 0o644);
            let warning = secrets_readable_by_others(&path, &table);
            assert!(warning.is_some_and(|w| w.contains("chmod 600")), "{text}");
            chmod(&path, 0o600);
            assert!(secrets_readable_by_others(&path, &table).is_none());
        }

        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cret-token\n").unwrap();
        chmod(&secret, 0o644);
        let text = GOOD.replace(
            "permanent_token = \"s3cret-token\"",
            &format!("permanent_token_file = {:?}", secret.display().to_string()),
        );
        let c = load(&text, &[]).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("auth.permanent_token_file")),
            "{:?}",
            c.warnings
        );
        chmod(&secret, 0o600);
        let c = load(&text, &[]).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    /// REGRESSION: a TOML syntax error printed the whole source line (a token with a missing
    /// quote appeared verbatim); type errors echoed numeric secrets.
    #[test]
    fn configuration_errors_never_show_a_secret_value() {
        let broken = GOOD.replace("\"s3cret-token\"", "\"s3cret-token");
        let e = load(&broken, &[]).unwrap_err();
        assert!(!e.message.contains("s3cret"), "{e}");
        assert!(e.message.contains("line 7"), "{e}");

        let numeric = GOOD.replace("\"s3cret-token\"", "918273645.5");
        let e = load(&numeric, &[]).unwrap_err();
        assert!(!e.message.contains("918273645"), "{e}");
        assert!(e.message.contains("auth.permanent_token"), "{e}");
        let listed = GOOD.replace("\"s3cret-token\"", "[\"s3cret-token\"]");
        let e = load(&listed, &[]).unwrap_err();
        assert!(!e.message.contains("s3cret"), "{e}");
    }

    /// REGRESSION: secret environment variables that look like numbers were rejected (and a
    /// leading zero would have been lost).
    #[test]
    fn secrets_from_the_environment_are_read_verbatim_as_text() {
        use secrecy::ExposeSecret;
        let without = GOOD.replace("permanent_token = \"s3cret-token\"\n", "");
        for value in ["0123456789", "1e5", "true", "12.50"] {
            let c = load(
                &without,
                &[("BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN", value)],
            )
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            let AuthSettings::PermanentToken { token } = &c.auth else {
                panic!("{:?}", c.auth)
            };
            assert_eq!(token.expose_secret(), value);
        }
    }

    /// REGRESSION: a `base_url` with `user:password@` was printed by `check` and connect errors.
    #[test]
    fn urls_with_a_user_or_password_are_refused_without_showing_them() {
        let text = GOOD.replace(
            "https://acme.bynder.com/",
            "https://admin:hunter2@acme.bynder.com/",
        );
        let e = load(&text, &[]).unwrap_err();
        assert!(e.message.contains("bynder.base_url"), "{e}");
        assert!(!e.message.contains("hunter2"), "{e}");
    }

    /// REGRESSION: with no --config and no default file, the error only said which key was
    /// missing, not that no file had been read.
    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type, test only
    fn a_missing_default_file_is_named_in_the_error() {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            out = Some(load_config_from(
                &ConfigSource::Default,
                Env::prefixed(ENV_PREFIX),
            ));
            Ok(())
        });
        let e = out.unwrap().unwrap_err();
        assert!(e.message.contains("bynder.base_url"), "{e}");
        assert!(
            e.message
                .contains(&format!("{DEFAULT_CONFIG_PATH} does not exist")),
            "{e}"
        );
    }

    #[test]
    fn hardening_keys_have_safe_defaults_and_accept_sizes_with_units() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.bynder.max_response_bytes, 16 * 1024 * 1024);
        assert!(!c.database.group_shared);
        assert_eq!(c.database.lock_timeout, DEFAULT_LOCK_TIMEOUT);
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(c.server.token.is_none() && c.server.allowed_hosts.is_empty());
        assert!(c.sync.uri_schemes.is_empty());

        let text = GOOD.replace(
            "[database]",
            "[sync]\nuri_schemes = [\"HTTPS:\", \"http\"]\n[server]\nallowed_hosts = [\"Sync.Example.\"]\n[database]",
        );
        let text = text.replace(
            "integration_id =",
            "max_response_size = \"2 MiB\"\nintegration_id =",
        );
        let c = load(&text, &[]).unwrap();
        assert_eq!(c.bynder.max_response_bytes, 2 * 1024 * 1024);
        assert_eq!(c.sync.uri_schemes, ["https", "http"]);
        assert_eq!(c.server.allowed_hosts, ["sync.example"]);

        let c = load(
            GOOD,
            &[("BYNDER_USAGE_SYNC_BYNDER__MAX_RESPONSE_SIZE", "1048576")],
        )
        .unwrap();
        assert_eq!(c.bynder.max_response_bytes, 1024 * 1024);

        let e = load(
            GOOD,
            &[("BYNDER_USAGE_SYNC_BYNDER__MAX_RESPONSE_SIZE", "1 KiB")],
        )
        .unwrap_err();
        assert!(e.message.contains("bynder.max_response_size"), "{e}");
        let e = load(
            &GOOD.replace(
                "[database]",
                "[sync]\nuri_schemes = [\"https://\"]\n[database]",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("sync.uri_schemes"), "{e}");
    }

    #[test]
    fn a_schedule_that_never_fires_is_accepted_with_a_warning() {
        let c = load(
            &GOOD.replace(
                "[database]",
                "[sync]\nschedule = \"0 0 0 30 2 *\"\n[database]",
            ),
            &[],
        )
        .unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("`sync.schedule`") && w.contains("never fires")),
            "{:?}",
            c.warnings
        );
        let c = load(GOOD, &[]).unwrap();
        assert!(
            !c.warnings.iter().any(|w| w.contains("never fires")),
            "{:?}",
            c.warnings
        );
        let now = chrono::Utc::now();
        let next = next_fire(DEFAULT_SCHEDULE, now).unwrap();
        assert!(next > now && next - now <= chrono::Duration::minutes(5));
    }

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

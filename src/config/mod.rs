//! Configuration: typed settings loaded once at start-up and passed down.
//!
//! Layers, later ones winning: built-in defaults, the TOML file, then environment variables
//! `BYNDER_USAGE_SYNC_<SECTION>__<KEY>` (e.g. `BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN`). Every
//! secret is also accepted as `<key>_file`, a path whose content is the secret (systemd credentials,
//! container secrets). Validation happens here, once; a problem becomes a [`ConfigError`] naming the
//! key, its environment variable and the fix. Nothing else in the crate reads `std::env`.
//!
//! This file owns the typed configuration and the public API ([`load_config`], [`ConfigSource`],
//! the `*Settings` structs, the defaults, [`Config::reload`]). The steps live beside it: `raw` (the
//! file's shape as serde reads it, and parse errors), `validate` (raw into typed: every check),
//! `secrets` (secret keys, `*_file`, file modes) and `show` (`config show`).

mod raw;
mod secrets;
/// `config show`: the effective configuration, key by key, with where each value came from.
pub mod show;
mod telemetry;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::magic::RelativePathBuf;
use figment::Figment;
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use raw::{
    describe_figment_error, describe_toml_error, AuthMethod, RawAuthKeys, RawBynder, RawConfig,
    RawDatabase,
};
use secrets::{
    auth_identity, secret_files_readable_by_others, secrets_readable_by_others, server_identity,
    source_identity,
};
use telemetry::OtelEnv;
use validate::{schedules_that_never_fire, validate};

pub use telemetry::{TelemetrySettings, DEFAULT_TELEMETRY_TIMEOUT};

/// When a schedule next fires (the scheduler's reading of `sync.schedule`).
pub use validate::next_fire;

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

    /// A problem with its message as given (what failed and the fix).
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

/// The portal and how it is reached (`[bynder]`).
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
    /// The value of `auth.method` that selects it, e.g. `client_credentials`.
    pub fn method_name(&self) -> &'static str {
        let method = match self {
            AuthSettings::PermanentToken { .. } => AuthMethod::PermanentToken,
            AuthSettings::ClientCredentials(_) => AuthMethod::ClientCredentials,
            AuthSettings::RefreshToken(_) => AuthMethod::RefreshToken,
            AuthSettings::OAuth1(_) => AuthMethod::OAuth1,
        };
        method.name()
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

/// The state database (`[database]`).
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// The SQLite file (`database.path`), unless `url` is set.
    pub path: PathBuf,
    /// A PostgreSQL database that keeps the state instead (`database.url`, `database.url_file`),
    /// its password apart (`database.password_file`).
    pub url: Option<ServerUrl>,
    pub busy_timeout: Duration,
    /// Share the state folder and files with a group (folders 2770, files 0660) instead of
    /// keeping them private to the daemon's user (0700, 0600).
    pub group_shared: bool,
    /// Longest wait for the run lock another process holds before giving up with an error.
    pub lock_timeout: Duration,
}

/// What is synced, how and when (`[sync]`).
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

/// The query used when `source.query` is not set.
pub const DEFAULT_SOURCE_QUERY: &str = "SELECT asset_id, uri, additional FROM cms_asset_references";

/// Where the desired state comes from (`[source]`).
#[derive(Debug, Clone, Default)]
pub struct SourceSettings {
    /// The CMS's own SQLite file, opened read-only; by default the state database.
    pub database: Option<PathBuf>,
    /// A custom `SELECT` returning `asset_id, uri, additional`; by default
    /// `SELECT asset_id, uri, additional FROM cms_asset_references`.
    pub query: Option<String>,
    /// The CMS's own PostgreSQL or MySQL/MariaDB database (`source.url`, `source.url_file`),
    /// read through a read-only session.
    pub url: Option<ServerUrl>,
}

impl SourceSettings {
    /// The SELECT the rows come from: `source.query`, or [`DEFAULT_SOURCE_QUERY`].
    pub fn query(&self) -> &str {
        self.query.as_deref().unwrap_or(DEFAULT_SOURCE_QUERY)
    }

    /// Whether the rows come from the state database's own `cms_asset_references` (no other
    /// file, server or query): the one source change capture and the indexed reads apply to.
    pub fn is_state_table(&self) -> bool {
        self.database.is_none() && self.query.is_none() && self.url.is_none()
    }
}

/// Which server a `source.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceServer {
    Postgres,
    /// MySQL or MariaDB (`mysql://` or `mariadb://`).
    MySql,
}

/// A `source.url`: the address without any password, and the password apart (from
/// `source.password_file`, or from the url in `source.url_file`). `Debug` shows no password.
#[derive(Clone)]
pub struct ServerUrl {
    pub server: SourceServer,
    /// The url with the password removed (and `mariadb://` written `mysql://`).
    pub url: url::Url,
    pub password: Option<SecretString>,
}

impl ServerUrl {
    /// The url for messages and `config show`: never holds the password.
    pub fn display(&self) -> String {
        self.url.to_string()
    }
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerUrl")
            .field("server", &self.server)
            .field("url", &self.url.as_str())
            .field("password", &self.password.as_ref().map(|_| show::REDACTED))
            .finish()
    }
}

/// How hard the portal is driven (`[limits]`).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub concurrency: usize,
    pub requests_per_second: u32,
    /// How long all sending stops after Bynder answers 429.
    pub block_pause: Duration,
}

/// Backoff between attempts of one operation (`[retry]`).
#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts one run makes for an operation before leaving it queued for the next run.
    pub max_attempts: u32,
}

/// Logging (`[log]`).
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A tracing filter (`info`, `bynder_usage_sync=debug`…); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written (`log.format`): for people or for a log collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the config file comes from, so a missing default file is not an error (containers
/// configure through the environment alone) while a named one must exist.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Explicit(PathBuf),
    Default,
}

impl ConfigSource {
    /// The file to read: the one named, or [`DEFAULT_CONFIG_PATH`].
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

/// [`load_config`] with the environment given: the pipeline file → environment → raw → typed.
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
    // `CONFIG` is the variable naming the file itself, not a key inside it.
    let env = env.split("__").ignore(&["config"]);
    let figment = secrets::merge_environment(figment, env);
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
            (
                "[source]",
                source_identity(&self.source),
                source_identity(&new.source),
            ),
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
            auth: RawAuthKeys {
                permanent_token: Some(SecretString::from(token.to_owned())),
                ..RawAuthKeys::default()
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

    /// A valid config file: portal, permanent token, relative database path.
    pub(super) const GOOD: &str = r#"
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

    /// Loads `toml` as a config file with exactly the environment `env`.
    pub(super) fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        with_config_file(toml, env, load_config)
    }

    /// `GOOD` with its `[auth]` section replaced by `auth`.
    pub(super) fn with_auth(auth: &str) -> String {
        let start = GOOD.find("[auth]").unwrap();
        let end = GOOD.find("[database]").unwrap();
        format!("{}[auth]\n{auth}\n{}", &GOOD[..start], &GOOD[end..])
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
    fn an_explicit_config_path_that_does_not_exist_is_an_error() {
        let e = load_config(&ConfigSource::Explicit("/nonexistent/x.toml".into())).unwrap_err();
        assert!(e.message.contains("/nonexistent/x.toml"), "{e}");
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
}

//! Configuration: typed settings loaded once at start-up and passed down.
//!
//! Layers, later ones winning: built-in defaults, the TOML file, then environment variables
//! `BYNDER_USAGE_SYNC_<SECTION>__<KEY>` (e.g. `BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN`). Every
//! secret is also accepted as `<key>_file`, a path whose content is the secret (systemd credentials,
//! container secrets). Validation happens here, once; a problem becomes a [`ConfigError`] naming the
//! key, its environment variable and the fix. Nothing else in the crate reads `std::env`.

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
    pub limits: LimitSettings,
    pub retry: RetrySettings,
    pub log: LogSettings,
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
}

/// How requests are authenticated. Secrets stay wrapped until the adapter that sends them.
#[derive(Debug, Clone)]
pub enum AuthSettings {
    PermanentToken { token: SecretString },
}

impl AuthSettings {
    pub fn method_name(&self) -> &'static str {
        match self {
            AuthSettings::PermanentToken { .. } => "permanent_token",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    pub busy_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// When not empty, only usages whose uri starts with one of these are ours to manage.
    pub uri_prefixes: Vec<String>,
    /// A run planning more deletes than this stops before sending any (`--allow-mass-delete`).
    pub max_deletes: u64,
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
    limits: RawLimits,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    log: RawLog,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    method: Option<String>,
    permanent_token: Option<SecretString>,
    permanent_token_file: Option<RelativePathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<RelativePathBuf>,
    #[serde(default, with = "humantime_serde")]
    busy_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    #[serde(default)]
    uri_prefixes: Vec<String>,
    max_deletes: Option<u64>,
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
            if let Err(e) = std::fs::File::open(path) {
                return Err(ConfigError::new(format!(
                    "cannot read config file {}: {e}. Fix: check the path and its permissions",
                    path.display()
                )));
            }
            warnings.extend(secrets_readable_by_others(path));
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
    let figment = figment.merge(env.split("__").ignore(&["config"]));
    let raw: RawConfig = figment.extract().map_err(describe_figment_error)?;
    let mut config = validate(raw)?;
    config.warnings = warnings;
    Ok(config)
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
                    let full = if key.is_empty() { field.clone() } else { format!("{key}.{field}") };
                    format!(
                        "unknown key `{full}`{place}. Fix: remove it or correct its spelling; \
                         config/example.toml lists every key"
                    )
                }
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

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let bynder = validate_bynder(raw.bynder)?;
    let auth = validate_auth(raw.auth)?;

    let database = DatabaseSettings {
        path: raw
            .database
            .path
            .map(|p| p.relative())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE_PATH)),
        busy_timeout: raw.database.busy_timeout.unwrap_or(Duration::from_secs(30)),
    };

    for prefix in &raw.sync.uri_prefixes {
        if prefix.trim().is_empty() {
            return Err(ConfigError::key(
                "sync.uri_prefixes",
                "contains an empty prefix, which would match every uri",
                "remove it, or list the prefixes your CMS owns, e.g. [\"https://shop.example/\"]",
            ));
        }
    }
    let sync = SyncSettings {
        uri_prefixes: raw.sync.uri_prefixes,
        max_deletes: raw.sync.max_deletes.unwrap_or(1000),
    };

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

    Ok(Config {
        bynder,
        auth,
        database,
        sync,
        limits,
        retry,
        log,
        warnings: Vec::new(),
    })
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
    if url.host_str().is_none() {
        return Err(ConfigError::key(
            "bynder.base_url",
            "has no host",
            "use e.g. https://acme.bynder.com",
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
    Ok(BynderSettings {
        base_url: url,
        integration_id,
        ca_file,
        allow_insecure_http: raw.allow_insecure_http,
        timeout,
        connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
    })
}

fn validate_auth(raw: RawAuth) -> Result<AuthSettings, ConfigError> {
    let method = raw.method.unwrap_or_else(|| "permanent_token".to_owned());
    match method.as_str() {
        "permanent_token" => {
            let token = resolve_secret(
                "auth.permanent_token",
                raw.permanent_token,
                raw.permanent_token_file,
            )?
            .ok_or_else(|| {
                ConfigError::key(
                    "auth.permanent_token",
                    "is missing",
                    format_args!(
                        "set it, or auth.permanent_token_file (env {}) to a file holding the token",
                        env_var("auth.permanent_token_file")
                    ),
                )
            })?;
            Ok(AuthSettings::PermanentToken { token })
        }
        other => Err(ConfigError::key(
            "auth.method",
            format_args!("is `{other}`, which is not a known method"),
            "use \"permanent_token\"",
        )),
    }
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

/// A warning when a config file holding secrets can be read by other users.
fn secrets_readable_by_others(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        if meta.permissions().mode() & 0o004 == 0 {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let holds_secret = text.lines().any(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            matches!(
                key,
                "permanent_token" | "client_secret" | "consumer_secret" | "token_secret"
            )
        });
        if holds_secret {
            return Some(format!(
                "the config file {} holds a secret and other users can read it. Fix: `chmod 600` it, \
                 or move the secret to a *_file key or an environment variable",
                path.display()
            ));
        }
    }
    None
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
                busy_timeout: None,
            },
            ..RawConfig::default()
        };
        validate(raw)
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

    #[allow(clippy::result_large_err)] // figment::Jail's closure type, test only
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in env {
                jail.set_env(k, v);
            }
            out = Some(load_config(&ConfigSource::Explicit(path.clone())));
            Ok(())
        });
        out.unwrap()
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
        let AuthSettings::PermanentToken { token } = &c.auth;
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
        let AuthSettings::PermanentToken { token } = &c.auth;
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
    fn an_explicit_config_path_that_does_not_exist_is_an_error() {
        let e = load_config(&ConfigSource::Explicit("/nonexistent/x.toml".into())).unwrap_err();
        assert!(e.message.contains("/nonexistent/x.toml"), "{e}");
    }
}

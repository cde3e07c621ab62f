//! Turning the raw configuration into the typed one: defaults, every check and its message
//! (`ConfigError::key`: the key, its environment variable and the fix), once at start-up.
//!
//! Owns what a valid value is. Does not own the file's shape or parse errors (`raw`), reading
//! secrets (`secrets`), nor the typed structs themselves (`mod`).

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::raw::{
    AuthMethod, RawAuth, RawAuthKeys, RawBynder, RawConfig, RawOAuth1, RawOAuth2, RawScopes,
    RawServer, RawSource,
};
use super::secrets::{required_secret, resolve_secret};
use super::telemetry::{validate_telemetry, OtelEnv};
use super::*;

/// The typed configuration from the raw one, its warnings still empty.
pub(super) fn validate(raw: RawConfig, otel: &OtelEnv) -> Result<Config, ConfigError> {
    let bynder = validate_bynder(raw.bynder)?;
    let auth = validate_auth(raw.auth, &bynder)?;

    let url = validate_server_url(
        "database",
        raw.database.url,
        raw.database.url_file,
        raw.database.password_file,
    )?;
    if url.is_some() && raw.database.path.is_some() {
        return Err(ConfigError::key(
            "database.url",
            "is set together with `database.path`",
            "keep `database.url` to keep the state in PostgreSQL, or `database.path` for a SQLite file, not both",
        ));
    }
    if url.is_some() && raw.database.group_shared {
        return Err(ConfigError::key(
            "database.group_shared",
            "is set with `database.url`, but a PostgreSQL state database has no files to share",
            "remove database.group_shared (grant roles on the database instead)",
        ));
    }
    let database = DatabaseSettings {
        path: raw
            .database
            .path
            .map(|p| p.relative())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE_PATH)),
        url,
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
        telemetry: validate_telemetry(raw.telemetry, otel)?,
        warnings: Vec::new(),
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
pub(super) fn schedules_that_never_fire(sync: &SyncSettings) -> Vec<String> {
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
    let url = validate_source_url(raw.url, raw.url_file, raw.password_file)?;
    if url.is_some() && raw.database.is_some() {
        return Err(ConfigError::key(
            "source.url",
            "is set together with `source.database`",
            "keep `source.url` for a PostgreSQL or MySQL/MariaDB CMS database, or `source.database` for a SQLite file, not both",
        ));
    }
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
    Ok(SourceSettings {
        database,
        query,
        url,
    })
}

/// `source.url` (or the url in `source.url_file`) with its password apart. A password written
/// into `source.url` itself is refused: the config file and the environment are shown and
/// logged, so the password goes in `source.password_file`. Messages never quote the url, which
/// may hold a password.
fn validate_source_url(
    inline: Option<String>,
    file: Option<figment::value::magic::RelativePathBuf>,
    password_file: Option<figment::value::magic::RelativePathBuf>,
) -> Result<Option<ServerUrl>, ConfigError> {
    validate_server_url("source", inline, file, password_file)
}

/// A server's url in `[section]`: `url` or `url_file`, with the password apart (see
/// [`validate_source_url`]). `[database]` takes PostgreSQL only (the state lives there);
/// `[source]` takes PostgreSQL or MySQL/MariaDB.
fn validate_server_url(
    section: &str,
    inline: Option<String>,
    file: Option<figment::value::magic::RelativePathBuf>,
    password_file: Option<figment::value::magic::RelativePathBuf>,
) -> Result<Option<ServerUrl>, ConfigError> {
    let state = section == "database";
    let (url_key, url_file_key, password_key) = (
        format!("{section}.url"),
        format!("{section}.url_file"),
        format!("{section}.password_file"),
    );
    let form = if state {
        "write it as postgres://USER@HOST:PORT/DATABASE"
    } else {
        "write it as postgres://USER@HOST:PORT/DATABASE or mysql://USER@HOST:PORT/DATABASE"
    };
    let inline = inline.filter(|u| !u.trim().is_empty());
    let (key, text) = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                &url_key,
                format_args!("is set together with `{url_file_key}`"),
                "keep only one of them",
            ))
        }
        (Some(u), None) => (url_key.clone(), u),
        (None, Some(path)) => {
            let path = path.relative();
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::key(
                    &url_file_key,
                    format_args!("points to {}, which cannot be read ({e})", path.display()),
                    "check the path and that the service user may read it",
                )
            })?;
            (url_file_key.clone(), text)
        }
        (None, None) => {
            if password_file.is_some() {
                return Err(ConfigError::key(
                    &password_key,
                    format_args!("is set without `{url_key}`"),
                    if state {
                        "set database.url to the PostgreSQL database that keeps the state, or remove the key"
                    } else {
                        "set source.url to the CMS's PostgreSQL or MySQL/MariaDB database, or remove the key"
                    },
                ));
            }
            return Ok(None);
        }
    };
    let mut url = Url::parse(text.trim())
        .map_err(|e| ConfigError::key(&key, format_args!("is not a valid url ({e})"), form))?;
    let server = match url.scheme() {
        "postgres" | "postgresql" => SourceServer::Postgres,
        "mysql" | "mariadb" if !state => SourceServer::MySql,
        other if state => {
            return Err(ConfigError::key(
                &key,
                format_args!("has the scheme `{other}`, but the state is kept in PostgreSQL only"),
                "use postgres:// (or postgresql://); for a SQLite file set database.path instead",
            ))
        }
        other => {
            return Err(ConfigError::key(
                &key,
                format_args!("has the scheme `{other}`, which is not a supported database server"),
                "use postgres:// (or postgresql://) or mysql:// (or mariadb://); for a SQLite file set source.database",
            ))
        }
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::key(&key, "names no host", form));
    }
    if url.path().trim_start_matches('/').is_empty() {
        return Err(ConfigError::key(
            &key,
            "names no database",
            "add the database after the host, e.g. postgres://cms@db.internal:5432/cms",
        ));
    }
    let in_url = url.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    if in_url.is_some() && key == url_key {
        return Err(ConfigError::key(
            &url_key,
            "holds a password",
            format_args!(
                "remove the password from the url and put it into a file named by {password_key} (env {}), or give the whole url in {url_file_key}",
                super::env_var(&password_key)
            ),
        ));
    }
    let from_file = resolve_secret(&format!("{section}.password"), None, password_file)?;
    let password = match (in_url, from_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                &password_key,
                format_args!("is set while the url in `{url_file_key}` holds a password too"),
                "keep only one of them",
            ))
        }
        (Some(p), None) => Some(SecretString::from(p)),
        (None, p) => p,
    };
    // Removing the password always succeeds on a url with a host.
    let _ = url.set_password(None);
    if server == SourceServer::MySql && url.scheme() == "mariadb" {
        // The MySQL driver speaks to MariaDB; it knows only its own scheme.
        let rest = url.as_str()["mariadb".len()..].to_owned();
        url = Url::parse(&format!("mysql{rest}")).expect("the same url with another scheme");
    }
    Ok(Some(ServerUrl {
        server,
        url,
        password,
    }))
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

/// `[auth]` into the settings of its method.
fn validate_auth(raw: RawAuthKeys, bynder: &BynderSettings) -> Result<AuthSettings, ConfigError> {
    match tag_auth(raw)? {
        RawAuth::PermanentToken(raw) => {
            let token = required_secret(
                "auth.permanent_token",
                raw.permanent_token,
                raw.permanent_token_file,
                "the permanent token (Settings > Advanced Settings > Portal Settings > Permanent Tokens)",
            )?;
            Ok(AuthSettings::PermanentToken { token })
        }
        RawAuth::ClientCredentials(raw) => Ok(AuthSettings::ClientCredentials(validate_oauth2(
            raw, bynder,
        )?)),
        RawAuth::RefreshToken(raw) => Ok(AuthSettings::RefreshToken(validate_oauth2(raw, bynder)?)),
        RawAuth::OAuth1(raw) => validate_oauth1(raw),
    }
}

/// The section tagged by `auth.method` (trimmed; `permanent_token` when unset). A key set for
/// another method is a mistake worth stopping for (the user believes it is used), not something
/// to ignore silently.
fn tag_auth(raw: RawAuthKeys) -> Result<RawAuth, ConfigError> {
    let method = match raw.method.as_deref().map(str::trim) {
        None => AuthMethod::DEFAULT,
        Some(name) => AuthMethod::from_name(name).ok_or_else(|| {
            ConfigError::key(
                "auth.method",
                format_args!("is `{name}`, which is not a known method"),
                format_args!("use one of {}", known_methods()),
            )
        })?,
    };
    if let Some(key) = raw.keys_set().find(|key| !method.keys().contains(key)) {
        let used_by = AuthMethod::ALL
            .into_iter()
            .find(|m| m.keys().contains(&key))
            .expect("every key of [auth] belongs to a method");
        let default = if raw.method.is_none() {
            " (the default)"
        } else {
            ""
        };
        return Err(ConfigError::key(
            &format!("auth.{key}"),
            format_args!(
                "is set, but auth.method is \"{}\"{default}, which does not use it",
                method.name()
            ),
            format_args!(
                "remove it, or set auth.method = \"{}\" if that is the method you mean",
                used_by.name()
            ),
        ));
    }
    Ok(raw.into_method(method))
}

/// `"permanent_token", "client_credentials", "refresh_token" or "oauth1"`.
fn known_methods() -> String {
    let names: Vec<String> = AuthMethod::ALL
        .iter()
        .map(|m| format!("\"{}\"", m.name()))
        .collect();
    let (last, rest) = names.split_last().expect("there are methods");
    format!("{} or {last}", rest.join(", "))
}

fn validate_oauth1(raw: RawOAuth1) -> Result<AuthSettings, ConfigError> {
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
    let token = match (token, token_secret) {
        (Some(token), Some(token_secret)) => Some(OAuth1TokenPair {
            token,
            token_secret,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::key(
                "auth.token_secret",
                "is missing while auth.token is set",
                "give both auth.token and auth.token_secret, or neither to use the pair \
                 `bynder-usage-sync auth oauth1-login` stores",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::key(
                "auth.token",
                "is missing while auth.token_secret is set",
                "give both auth.token and auth.token_secret, or neither to use the pair \
                 `bynder-usage-sync auth oauth1-login` stores",
            ))
        }
    };
    Ok(AuthSettings::OAuth1(OAuth1Settings {
        consumer_key,
        consumer_secret,
        token,
    }))
}

fn validate_oauth2(raw: RawOAuth2, bynder: &BynderSettings) -> Result<OAuth2Settings, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{load, with_auth, GOOD};
    use secrecy::ExposeSecret;

    #[test]
    fn the_http_endpoint_binds_to_loopback_by_default() {
        let c = load(GOOD, &[]).unwrap();
        assert!(c.server.listen.ip().is_loopback(), "{}", c.server.listen);
        assert_eq!(c.server.listen.port(), 9464);
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
    fn a_webdam_portal_is_refused_because_it_has_no_usage_api() {
        for url in ["https://apiv2.webdamdb.com", "https://acme.webdamdb.com/"] {
            let text = GOOD.replace("https://acme.bynder.com", url);
            assert!(text.contains(url), "the fixture names the portal once");
            let e = load(&text, &[]).unwrap_err();
            assert!(e.message.contains("Webdam"), "{e}");
            assert!(e.message.contains("bynder.base_url"), "{e}");
        }
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

    /// The exact texts users see for a wrong `auth.method` or a key of another method, and where
    /// those checks stand among the others: after every key's type and after `[bynder]`.
    #[test]
    fn auth_method_mistakes_keep_their_messages_and_their_place_among_the_checks() {
        let message = |auth: &str| load(&with_auth(auth), &[]).unwrap_err().message;
        assert_eq!(
            message("method = \" oauth2 \""),
            "`auth.method` (env BYNDER_USAGE_SYNC_AUTH__METHOD) is `oauth2`, which is not a known \
             method. Fix: use one of \"permanent_token\", \"client_credentials\", \
             \"refresh_token\" or \"oauth1\""
        );
        assert_eq!(
            message("permanent_token = \"x\"\nredirect_uri = \"http://127.0.0.1:1/cb\""),
            "`auth.redirect_uri` (env BYNDER_USAGE_SYNC_AUTH__REDIRECT_URI) is set, but \
             auth.method is \"permanent_token\" (the default), which does not use it. Fix: \
             remove it, or set auth.method = \"refresh_token\" if that is the method you mean"
        );
        // A secret's `_file` form is named as the secret; the first stray key in the order of
        // config/example.toml is the one reported.
        assert_eq!(
            message(
                "method = \"oauth1\"\nconsumer_key = \"ck\"\nconsumer_secret = \"cs\"\n\
                 token_url = \"https://login.example/t\"\nclient_secret_file = \"/nonexistent\""
            ),
            "`auth.client_secret` (env BYNDER_USAGE_SYNC_AUTH__CLIENT_SECRET) is set, but \
             auth.method is \"oauth1\", which does not use it. Fix: remove it, or set \
             auth.method = \"client_credentials\" if that is the method you mean"
        );
        assert!(message(
            "method = \"client_credentials\"\nclient_id = \"a\"\nclient_secret = \"b\"\n\
             redirect_uri = \"http://127.0.0.1:1/cb\""
        )
        .starts_with("`auth.redirect_uri` (env BYNDER_USAGE_SYNC_AUTH__REDIRECT_URI) is set"));
        assert!(
            message("method = \"permanent_token\"\npermanent_tokn = \"x\"")
                .starts_with("unknown key `auth.permanent_tokn`")
        );
        // The method is read with the surrounding spaces trimmed.
        let c = load(
            &with_auth("method = \" oauth1 \"\nconsumer_key = \"ck\"\nconsumer_secret = \"cs\""),
            &[],
        )
        .unwrap();
        assert_eq!(c.auth.method_name(), "oauth1");

        // A wrong type anywhere, and a problem in `[bynder]`, are reported before the method.
        let bad_method = with_auth("method = \"oauth2\"\nclient_id = \"app\"");
        let e = load(
            &bad_method.replace("[database]", "[limits]\nconcurrency = \"many\"\n[database]"),
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("`limits.concurrency`"), "{e}");
        let e = load(
            &bad_method.replace(
                "integration_id = \"0191a303-9d99-433e-ada4-d244f37e1d7d\"",
                "",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.message.starts_with("`bynder.integration_id`"), "{e}");
        let e = load(&with_auth("method = \"oauth2\"\nclient_id = 5"), &[]).unwrap_err();
        assert!(e.message.starts_with("`auth.client_id`"), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
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

    #[test]
    fn a_source_url_comes_from_the_environment_and_mariadb_is_read_as_mysql() {
        let c = load(
            GOOD,
            &[(
                "BYNDER_USAGE_SYNC_SOURCE__URL",
                "mariadb://cms@db.internal:3306/cms",
            )],
        )
        .unwrap();
        let url = c.source.url.as_ref().expect("a url");
        assert_eq!(url.server, SourceServer::MySql);
        assert_eq!(url.display(), "mysql://cms@db.internal:3306/cms");
        assert!(url.password.is_none());
        assert!(!c.source.is_state_table());
    }

    #[test]
    fn a_password_inside_source_url_is_refused_without_quoting_it() {
        let toml = format!("{GOOD}[source]\nurl = \"postgres://cms:hunter2@db.internal/cms\"\n");
        let e = load(&toml, &[]).unwrap_err();
        assert!(
            e.message.contains("`source.url`")
                && e.message.contains("source.password_file")
                && !e.message.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn the_password_comes_from_password_file_or_url_file_and_never_shows_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "p@ss word\n").unwrap();
        let toml = format!(
            "{GOOD}[source]\nurl = \"postgres://cms@db.internal:5432/cms\"\npassword_file = \"{}\"\n",
            password.display()
        );
        let c = load(&toml, &[]).unwrap();
        let url = c.source.url.as_ref().unwrap();
        assert_eq!(
            url.password.as_ref().map(|p| p.expose_secret().to_owned()),
            Some("p@ss word".to_owned())
        );
        assert!(!format!("{c:?}").contains("p@ss"), "{c:?}");

        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "postgresql://cms:s%40cr9x@db.internal/cms\n").unwrap();
        let toml = format!("{GOOD}[source]\nurl_file = \"{}\"\n", url_file.display());
        let c = load(&toml, &[]).unwrap();
        let url = c.source.url.as_ref().unwrap();
        assert_eq!(url.server, SourceServer::Postgres);
        assert_eq!(url.password.as_ref().unwrap().expose_secret(), "s@cr9x");
        assert!(!url.display().contains("cr9x"), "{}", url.display());
        assert!(!format!("{c:?}").contains("cr9x"), "{c:?}");
    }

    #[test]
    fn source_url_is_refused_with_source_database_and_with_another_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cms.sqlite");
        std::fs::write(&file, "").unwrap();
        let both = format!(
            "{GOOD}[source]\nurl = \"postgres://cms@db/cms\"\ndatabase = \"{}\"\n",
            file.display()
        );
        let e = load(&both, &[]).unwrap_err();
        assert!(
            e.message.contains("source.url") && e.message.contains("source.database"),
            "{e}"
        );
        let other = format!("{GOOD}[source]\nurl = \"sqlserver://cms@db/cms\"\n");
        let e = load(&other, &[]).unwrap_err();
        assert!(
            e.message.contains("sqlserver") && e.message.contains("Fix:"),
            "{e}"
        );
        let no_db = format!("{GOOD}[source]\nurl = \"postgres://cms@db\"\n");
        let e = load(&no_db, &[]).unwrap_err();
        assert!(e.message.contains("names no database"), "{e}");
    }

    /// A new database password is noticed by a reload (as a restart to make), though it never
    /// shows in `Debug`.
    #[test]
    fn a_changed_source_password_needs_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        let toml = format!(
            "{GOOD}[source]\nurl = \"postgres://cms@db.internal:5432/cms\"\npassword_file = \"{}\"\n",
            password.display()
        );
        std::fs::write(&password, "first\n").unwrap();
        let old = load(&toml, &[]).unwrap();
        std::fs::write(&password, "second\n").unwrap();
        let new = load(&toml, &[]).unwrap();
        assert!(old.reload(new).needs_restart.contains(&"[source]"));
    }
}

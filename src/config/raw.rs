//! The configuration as read, before validation: one serde struct per TOML section, filled by
//! figment from the file and the environment, plus the descriptions of what can go wrong while
//! reading (TOML syntax, unknown keys, wrong types), none of which shows a value.
//!
//! Owns the shape of the file: every key and its type, `deny_unknown_fields` everywhere, and
//! `[auth]` as a tagged form ([`AuthMethod`], [`RawAuth`]: each method with only its own keys).
//! Does not own defaults, checks or the typed settings (`validate`, `mod`), nor reading secret
//! files (`secrets`).

use std::path::Path;
use std::time::Duration;

use figment::value::magic::RelativePathBuf;
use secrecy::SecretString;
use serde::Deserialize;

use super::{env_var, ConfigError, LogFormat, Strategy};

/// The keys whose values are secrets: never shown in a message, always read as text.
pub(super) const SECRET_KEYS: [&str; 5] = [
    "auth.permanent_token",
    "auth.client_secret",
    "auth.consumer_secret",
    "auth.token",
    "auth.token_secret",
];

/// Whether `key` (dotted, any case) holds a secret.
pub(super) fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// The whole file (and environment), section by section; config/example.toml documents each key.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) bynder: RawBynder,
    #[serde(default)]
    pub(super) auth: RawAuthKeys,
    #[serde(default)]
    pub(super) database: RawDatabase,
    #[serde(default)]
    pub(super) sync: RawSync,
    #[serde(default)]
    pub(super) source: RawSource,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) runs: RawRuns,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
}

/// `[telemetry]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
}

/// `[runs]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuns {
    #[serde(default, with = "humantime_serde")]
    pub(super) keep: Option<Duration>,
}

/// `[bynder]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBynder {
    pub(super) base_url: Option<String>,
    pub(super) integration_id: Option<String>,
    pub(super) ca_file: Option<RelativePathBuf>,
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    pub(super) max_response_size: Option<bytesize::ByteSize>,
}

/// `[auth]` as read: `method` as written and every key of every method, each with its type, so a
/// wrong type or an unknown key is reported like anywhere else. Which method reads which key is
/// [`AuthMethod::keys`]; `validate` tags the section ([`RawAuthKeys::into_method`]) only after
/// `[bynder]`, as the method checks always came after the portal's.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthKeys {
    pub(super) method: Option<String>,
    pub(super) permanent_token: Option<SecretString>,
    pub(super) permanent_token_file: Option<RelativePathBuf>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretString>,
    pub(super) client_secret_file: Option<RelativePathBuf>,
    pub(super) scopes: Option<RawScopes>,
    pub(super) token_url: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) redirect_uri: Option<String>,
    pub(super) consumer_key: Option<String>,
    pub(super) consumer_secret: Option<SecretString>,
    pub(super) consumer_secret_file: Option<RelativePathBuf>,
    pub(super) token: Option<SecretString>,
    pub(super) token_file: Option<RelativePathBuf>,
    pub(super) token_secret: Option<SecretString>,
    pub(super) token_secret_file: Option<RelativePathBuf>,
}

// Not `#[serde(tag = "method")]` on `RawAuth` itself: serde reads an internally tagged enum
// through a buffer of its own, past figment, so a `*_file` path cannot be read at all ("expected
// struct RelativePathBuf") and a type error is reported at `auth` with the value in it, which
// would show a numeric secret.

/// The values of `auth.method`, in the order of config/example.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuthMethod {
    PermanentToken,
    ClientCredentials,
    RefreshToken,
    OAuth1,
}

impl AuthMethod {
    /// Every method, in the order of config/example.toml.
    pub(super) const ALL: [AuthMethod; 4] = [
        AuthMethod::PermanentToken,
        AuthMethod::ClientCredentials,
        AuthMethod::RefreshToken,
        AuthMethod::OAuth1,
    ];

    /// The method when `auth.method` is not set.
    pub(super) const DEFAULT: AuthMethod = AuthMethod::PermanentToken;

    /// The value of `auth.method` that selects it.
    pub(super) fn name(self) -> &'static str {
        match self {
            AuthMethod::PermanentToken => "permanent_token",
            AuthMethod::ClientCredentials => "client_credentials",
            AuthMethod::RefreshToken => "refresh_token",
            AuthMethod::OAuth1 => "oauth1",
        }
    }

    /// The method `auth.method` names, if any.
    pub(super) fn from_name(name: &str) -> Option<AuthMethod> {
        AuthMethod::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The `[auth]` keys it reads, a secret's `_file` form counted as the secret.
    pub(super) fn keys(self) -> &'static [&'static str] {
        const OAUTH2: [&str; 6] = [
            "client_id",
            "client_secret",
            "scopes",
            "token_url",
            "client_auth",
            "redirect_uri",
        ];
        match self {
            AuthMethod::PermanentToken => &["permanent_token"],
            // The redirect is the browser step of `auth login`, which client credentials skip.
            AuthMethod::ClientCredentials => &OAUTH2[..5],
            AuthMethod::RefreshToken => &OAUTH2,
            AuthMethod::OAuth1 => &["consumer_key", "consumer_secret", "token", "token_secret"],
        }
    }
}

/// `[auth]` tagged by its method: each variant holds the keys that method reads, and no others.
pub(super) enum RawAuth {
    PermanentToken(RawPermanentToken),
    ClientCredentials(RawOAuth2),
    RefreshToken(RawOAuth2),
    OAuth1(RawOAuth1),
}

/// The keys of `method = "permanent_token"`.
pub(super) struct RawPermanentToken {
    pub(super) permanent_token: Option<SecretString>,
    pub(super) permanent_token_file: Option<RelativePathBuf>,
}

/// The keys of `method = "client_credentials"` and `"refresh_token"` (the same OAuth 2 app).
pub(super) struct RawOAuth2 {
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretString>,
    pub(super) client_secret_file: Option<RelativePathBuf>,
    pub(super) scopes: Option<RawScopes>,
    pub(super) token_url: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) redirect_uri: Option<String>,
}

/// The keys of `method = "oauth1"`.
pub(super) struct RawOAuth1 {
    pub(super) consumer_key: Option<String>,
    pub(super) consumer_secret: Option<SecretString>,
    pub(super) consumer_secret_file: Option<RelativePathBuf>,
    pub(super) token: Option<SecretString>,
    pub(super) token_file: Option<RelativePathBuf>,
    pub(super) token_secret: Option<SecretString>,
    pub(super) token_secret_file: Option<RelativePathBuf>,
}

impl RawAuthKeys {
    /// The keys that are set (a secret or its `_file` form), in the order of
    /// config/example.toml.
    pub(super) fn keys_set(&self) -> impl Iterator<Item = &'static str> {
        [
            (
                "permanent_token",
                self.permanent_token.is_some() || self.permanent_token_file.is_some(),
            ),
            ("client_id", self.client_id.is_some()),
            (
                "client_secret",
                self.client_secret.is_some() || self.client_secret_file.is_some(),
            ),
            ("scopes", self.scopes.is_some()),
            ("token_url", self.token_url.is_some()),
            ("client_auth", self.client_auth.is_some()),
            ("redirect_uri", self.redirect_uri.is_some()),
            ("consumer_key", self.consumer_key.is_some()),
            (
                "consumer_secret",
                self.consumer_secret.is_some() || self.consumer_secret_file.is_some(),
            ),
            ("token", self.token.is_some() || self.token_file.is_some()),
            (
                "token_secret",
                self.token_secret.is_some() || self.token_secret_file.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
    }

    /// The section as `method` reads it. Keys of other methods are dropped: `validate` refuses
    /// them first.
    pub(super) fn into_method(self, method: AuthMethod) -> RawAuth {
        let oauth2 = || RawOAuth2 {
            client_id: self.client_id,
            client_secret: self.client_secret,
            client_secret_file: self.client_secret_file,
            scopes: self.scopes,
            token_url: self.token_url,
            client_auth: self.client_auth,
            redirect_uri: self.redirect_uri,
        };
        match method {
            AuthMethod::PermanentToken => RawAuth::PermanentToken(RawPermanentToken {
                permanent_token: self.permanent_token,
                permanent_token_file: self.permanent_token_file,
            }),
            AuthMethod::ClientCredentials => RawAuth::ClientCredentials(oauth2()),
            AuthMethod::RefreshToken => RawAuth::RefreshToken(oauth2()),
            AuthMethod::OAuth1 => RawAuth::OAuth1(RawOAuth1 {
                consumer_key: self.consumer_key,
                consumer_secret: self.consumer_secret,
                consumer_secret_file: self.consumer_secret_file,
                token: self.token,
                token_file: self.token_file,
                token_secret: self.token_secret,
                token_secret_file: self.token_secret_file,
            }),
        }
    }
}

/// `scopes` as OAuth writes them (`"a b c"`) or as a TOML list.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawScopes {
    Text(String),
    List(Vec<String>),
}

/// `[database]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) path: Option<RelativePathBuf>,
    pub(super) url: Option<String>,
    pub(super) url_file: Option<RelativePathBuf>,
    pub(super) password_file: Option<RelativePathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(super) busy_timeout: Option<Duration>,
    #[serde(default)]
    pub(super) group_shared: bool,
    #[serde(default, with = "humantime_serde")]
    pub(super) lock_timeout: Option<Duration>,
}

/// `[sync]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    #[serde(default)]
    pub(super) uri_prefixes: Vec<String>,
    pub(super) max_deletes: Option<u64>,
    pub(super) strategy: Option<Strategy>,
    pub(super) batch_size: Option<usize>,
    pub(super) schedule: Option<String>,
    pub(super) verify_schedule: Option<String>,
    #[serde(default)]
    pub(super) uri_schemes: Vec<String>,
}

/// `[server]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    #[serde(default)]
    pub(super) allowed_hosts: Vec<String>,
    pub(super) token_file: Option<RelativePathBuf>,
    pub(super) max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
}

/// `[daemon]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_timeout: Option<Duration>,
}

/// `[source]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) database: Option<RelativePathBuf>,
    pub(super) query: Option<String>,
    pub(super) url: Option<String>,
    pub(super) url_file: Option<RelativePathBuf>,
    pub(super) password_file: Option<RelativePathBuf>,
}

/// `[limits]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) concurrency: Option<usize>,
    pub(super) requests_per_second: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) block_pause: Option<Duration>,
}

/// `[retry]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    #[serde(default, with = "humantime_serde")]
    pub(super) initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_backoff: Option<Duration>,
    pub(super) max_attempts: Option<u32>,
}

/// `[log]` as read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
}

/// A TOML syntax error by position and reason, without the line itself.
pub(super) fn describe_toml_error(path: &Path, text: &str, error: &toml::de::Error) -> String {
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

/// Figment's errors (unknown keys, wrong types) by key and place; a secret's value is never shown.
pub(super) fn describe_figment_error(error: figment::Error) -> ConfigError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{load, GOOD};

    #[test]
    fn every_auth_key_is_read_by_some_method_and_every_method_by_its_name() {
        let secret = || Some(SecretString::from("x".to_owned()));
        let text = || Some("x".to_owned());
        let every_key = RawAuthKeys {
            permanent_token: secret(),
            client_id: text(),
            client_secret: secret(),
            scopes: Some(RawScopes::Text("x".to_owned())),
            token_url: text(),
            client_auth: text(),
            redirect_uri: text(),
            consumer_key: text(),
            consumer_secret: secret(),
            token: secret(),
            token_secret: secret(),
            ..RawAuthKeys::default()
        };
        let set: Vec<&str> = every_key.keys_set().collect();
        assert_eq!(set.len(), 11, "{set:?}");
        for key in &set {
            assert!(
                AuthMethod::ALL.iter().any(|m| m.keys().contains(key)),
                "{key} is read by no method"
            );
        }
        for method in AuthMethod::ALL {
            assert_eq!(AuthMethod::from_name(method.name()), Some(method));
            assert!(method.keys().iter().all(|k| set.contains(k)), "{method:?}");
        }
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
}

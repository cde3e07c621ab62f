//! `config show`: the effective configuration, key by key, after defaults, the file and the
//! environment, each value with where it came from. Secrets are never shown.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::{env_var, load_config, AuthSettings, ClientAuth, Config, ConfigError, ConfigSource};

/// What `config show` prints for a secret.
pub const REDACTED: &str = "[redacted]";

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Default,
    File,
    Env,
}

impl Origin {
    /// How `config show` prints it.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::File => "file",
            Origin::Env => "env",
        }
    }
}

/// One key of the effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub key: &'static str,
    pub value: Value,
    pub origin: Origin,
}

/// The effective configuration and its warnings.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    /// The file read, if any.
    pub file: Option<String>,
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

/// Loads and validates the configuration as every command does, then lists each key.
pub fn explain(source: &ConfigSource) -> Result<Explained, ConfigError> {
    let config = load_config(source)?;
    let path = source.path();
    // Valid TOML: `load_config` parsed it already.
    let table: toml::Table = if path.is_file() {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default()
    } else {
        toml::Table::new()
    };
    let entries = values(&config)
        .into_iter()
        .map(|(key, value)| Entry {
            key,
            value,
            origin: origin(key, &table),
        })
        .collect();
    Ok(Explained {
        file: path.is_file().then(|| path.display().to_string()),
        entries,
        warnings: config.warnings,
    })
}

/// Where `key` (or its `_file` form) was set: the environment wins over the file.
fn origin(key: &str, table: &toml::Table) -> Origin {
    let file_key = format!("{key}_file");
    let in_env = [key, file_key.as_str()]
        .iter()
        .any(|k| std::env::var_os(env_var(k)).is_some());
    let in_file = [key, file_key.as_str()].iter().any(|k| {
        let (section, name) = k.split_once('.').unwrap_or(("", k));
        table
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key(name))
    });
    match (in_env, in_file) {
        (true, _) => Origin::Env,
        (false, true) => Origin::File,
        (false, false) => Origin::Default,
    }
}

fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn path(p: Option<&Path>) -> Value {
    p.map_or(Value::Null, |p| Value::String(p.display().to_string()))
}

/// Every key with its effective value, in the order of `config/example.toml`. Secrets are
/// [`REDACTED`]; keys of other auth methods are left out.
fn values(c: &Config) -> Vec<(&'static str, Value)> {
    let secret = json!(REDACTED);
    let mut v = vec![
        ("bynder.base_url", json!(c.bynder.base_url.as_str())),
        ("bynder.integration_id", json!(c.bynder.integration_id)),
        ("bynder.ca_file", path(c.bynder.ca_file.as_deref())),
        (
            "bynder.allow_insecure_http",
            json!(c.bynder.allow_insecure_http),
        ),
        ("bynder.timeout", duration(c.bynder.timeout)),
        ("bynder.connect_timeout", duration(c.bynder.connect_timeout)),
        (
            "bynder.max_response_size",
            json!(bytesize::ByteSize(c.bynder.max_response_bytes)
                .display()
                .iec()
                .to_string()),
        ),
        ("auth.method", json!(c.auth.method_name())),
    ];
    match &c.auth {
        AuthSettings::PermanentToken { .. } => v.push(("auth.permanent_token", secret.clone())),
        AuthSettings::ClientCredentials(o) | AuthSettings::RefreshToken(o) => {
            v.extend([
                ("auth.client_id", json!(o.client_id)),
                ("auth.client_secret", secret.clone()),
                ("auth.scopes", json!(o.scopes.join(" "))),
                ("auth.token_url", json!(o.token_url.as_str())),
                (
                    "auth.client_auth",
                    json!(match o.client_auth {
                        ClientAuth::Body => "body",
                        ClientAuth::Basic => "basic",
                    }),
                ),
            ]);
            if matches!(c.auth, AuthSettings::RefreshToken(_)) {
                v.push(("auth.redirect_uri", json!(o.redirect_uri.as_str())));
            }
        }
        AuthSettings::OAuth1(o) => {
            let pair = if o.token.is_some() {
                secret.clone()
            } else {
                json!("(the pair `auth oauth1-login` stored)")
            };
            v.extend([
                ("auth.consumer_key", json!(o.consumer_key)),
                ("auth.consumer_secret", secret.clone()),
                ("auth.token", pair.clone()),
                ("auth.token_secret", pair),
            ]);
        }
    }
    v.extend([
        (
            "database.path",
            match c.database.url {
                Some(_) => Value::Null,
                None => path(Some(&c.database.path)),
            },
        ),
        (
            "database.url",
            c.database
                .url
                .as_ref()
                .map_or(Value::Null, |u| json!(u.display())),
        ),
        (
            "database.password",
            match c.database.url.as_ref().and_then(|u| u.password.as_ref()) {
                Some(_) => secret.clone(),
                None => Value::Null,
            },
        ),
        ("database.busy_timeout", duration(c.database.busy_timeout)),
        ("database.group_shared", json!(c.database.group_shared)),
        ("database.lock_timeout", duration(c.database.lock_timeout)),
        ("sync.uri_prefixes", json!(c.sync.uri_prefixes)),
        ("sync.max_deletes", json!(c.sync.max_deletes)),
        ("sync.strategy", json!(c.sync.strategy)),
        ("sync.batch_size", json!(c.sync.batch_size)),
        ("sync.schedule", json!(c.sync.schedule)),
        ("sync.verify_schedule", json!(c.sync.verify_schedule)),
        ("sync.uri_schemes", json!(c.sync.uri_schemes)),
        ("source.database", path(c.source.database.as_deref())),
        ("source.query", json!(c.source.query())),
        (
            "source.url",
            c.source
                .url
                .as_ref()
                .map_or(Value::Null, |u| json!(u.display())),
        ),
        (
            "source.password",
            match c.source.url.as_ref().and_then(|u| u.password.as_ref()) {
                Some(_) => secret.clone(),
                None => Value::Null,
            },
        ),
        ("limits.concurrency", json!(c.limits.concurrency)),
        (
            "limits.requests_per_second",
            json!(c.limits.requests_per_second),
        ),
        ("limits.block_pause", duration(c.limits.block_pause)),
        ("retry.initial_backoff", duration(c.retry.initial_backoff)),
        ("retry.max_backoff", duration(c.retry.max_backoff)),
        ("retry.max_attempts", json!(c.retry.max_attempts)),
        ("server.listen", json!(c.server.listen.to_string())),
        ("server.allowed_hosts", json!(c.server.allowed_hosts)),
        (
            "server.token",
            if c.server.token.is_some() {
                secret.clone()
            } else {
                Value::Null
            },
        ),
        ("server.max_connections", json!(c.server.max_connections)),
        ("server.header_timeout", duration(c.server.header_timeout)),
        ("server.idle_timeout", duration(c.server.idle_timeout)),
        (
            "daemon.shutdown_timeout",
            duration(c.daemon.shutdown_timeout),
        ),
        ("runs.keep", duration(c.runs.keep)),
        ("log.level", json!(c.log.level)),
        (
            "log.format",
            json!(match c.log.format {
                super::LogFormat::Text => "text",
                super::LogFormat::Json => "json",
            }),
        ),
        (
            "telemetry.otlp_endpoint",
            c.telemetry
                .otlp_endpoint
                .as_ref()
                .map_or(Value::Null, |u| json!(u.as_str())),
        ),
        ("telemetry.timeout", duration(c.telemetry.timeout)),
    ]);
    v
}

/// The text form: `key = value  # origin`, one per line.
pub fn render_text(explained: &Explained) -> String {
    let mut out = match &explained.file {
        Some(f) => format!("# effective configuration (file {f}, then the environment)\n"),
        None => {
            "# effective configuration (no config file; defaults and the environment)\n".to_owned()
        }
    };
    let width = explained
        .entries
        .iter()
        .map(|e| e.key.len() + e.value.to_string().len())
        .max()
        .unwrap_or(0);
    for e in &explained.entries {
        let value = e.value.to_string();
        let pad = width - e.key.len() - value.len();
        out.push_str(&format!(
            "{} = {value}{}  # {}\n",
            e.key,
            " ".repeat(pad),
            e.origin.label()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain_with(toml: &str, env: &[(&str, &str)]) -> Explained {
        super::super::tests::with_config_file(toml, env, explain).unwrap()
    }

    const BASE: &str = "[bynder]\nbase_url = \"https://acme.bynder.com\"\n\
        integration_id = \"0191a303-9d99-433e-ada4-d244f37e1d7d\"\n";

    #[test]
    fn no_secret_is_shown_whatever_the_auth_method() {
        let secrets = [
            "pt-s3cret",
            "cs-s3cret",
            "cons-s3cret",
            "tok-s3cret",
            "ts-s3cret",
        ];
        let cases = [
            (
                "[auth]\npermanent_token = \"pt-s3cret\"\n",
                vec![],
            ),
            (
                "[auth]\nmethod = \"client_credentials\"\nclient_id = \"app\"\n",
                vec![("BYNDER_USAGE_SYNC_AUTH__CLIENT_SECRET", "cs-s3cret")],
            ),
            (
                "[auth]\nmethod = \"refresh_token\"\nclient_id = \"app\"\nclient_secret = \"cs-s3cret\"\n",
                vec![],
            ),
            (
                "[auth]\nmethod = \"oauth1\"\nconsumer_key = \"ck\"\nconsumer_secret = \"cons-s3cret\"\ntoken = \"tok-s3cret\"\n",
                vec![("BYNDER_USAGE_SYNC_AUTH__TOKEN_SECRET", "ts-s3cret")],
            ),
        ];
        for (auth, env) in cases {
            let explained = explain_with(&format!("{BASE}{auth}"), &env);
            let text = render_text(&explained);
            let json = serde_json::to_string(&explained).unwrap();
            for s in secrets {
                assert!(
                    !text.contains(s) && !json.contains(s),
                    "{s} in\n{text}\n{json}"
                );
            }
            assert!(text.contains(REDACTED), "{text}");
        }
    }

    #[test]
    fn each_value_names_where_it_came_from() {
        let explained = explain_with(
            &format!("{BASE}[auth]\npermanent_token = \"x\"\n[sync]\nbatch_size = 50\n"),
            &[("BYNDER_USAGE_SYNC_LIMITS__CONCURRENCY", "2")],
        );
        let find = |k: &str| explained.entries.iter().find(|e| e.key == k).unwrap();
        assert_eq!(find("sync.batch_size").origin, Origin::File);
        assert_eq!(find("sync.batch_size").value, json!(50));
        assert_eq!(find("limits.concurrency").origin, Origin::Env);
        assert_eq!(find("limits.concurrency").value, json!(2));
        assert_eq!(find("retry.max_attempts").origin, Origin::Default);
        assert_eq!(find("auth.permanent_token").origin, Origin::File);
        assert_eq!(find("bynder.max_response_size").value, json!("16.0 MiB"));
    }

    /// Every key `config/example.toml` documents appears in `config show`, and nothing else.
    #[test]
    fn every_documented_key_is_shown() {
        let example = include_str!("../../config/example.toml");
        let explained = explain_with(&format!("{BASE}[auth]\npermanent_token = \"x\"\n"), &[]);
        let shown: std::collections::BTreeSet<&str> =
            explained.entries.iter().map(|e| e.key).collect();
        let mut section = String::new();
        for line in example.lines() {
            let line = line.trim_start_matches('#').trim();
            if line.starts_with('[') && line.ends_with(']') && !line.contains(' ') {
                section = line.trim_matches(['[', ']']).to_owned();
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.contains(' ') || section.is_empty() || section == "auth" {
                continue;
            }
            // A secret's `_file` form shows as the secret (`server.token_file`: `server.token`).
            let full = format!("{section}.{key}");
            let secret = format!("{section}.{}", key.trim_end_matches("_file"));
            assert!(
                shown.contains(full.as_str()) || shown.contains(secret.as_str()),
                "{full} is not shown"
            );
        }
    }
}

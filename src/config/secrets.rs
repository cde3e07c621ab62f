//! Secrets in the configuration: which keys hold one, reading them inline, from `<key>_file` or
//! verbatim from the environment, the warnings about files other users can read, and the one place
//! that looks at secret values to compare two configurations.
//!
//! Owns every use of a secret's value inside `config`. Does not own sending a secret (the `auth`
//! adapters) nor the messages for non-secret keys (`validate`, `raw`).

use std::path::Path;

use figment::providers::Env;
use figment::value::magic::RelativePathBuf;
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};

use super::raw::{is_secret_key, RawConfig, SECRET_KEYS};
use super::{env_var, AuthSettings, ConfigError, ServerSettings};

/// Merges the environment into `figment`, the secret keys verbatim as text: figment would read
/// `0123` as the number 123.
pub(super) fn merge_environment(figment: Figment, env: Env) -> Figment {
    let secrets: Vec<(String, String)> = env
        .iter()
        .filter(|(key, _)| is_secret_key(key.as_str()))
        .map(|(key, value)| (key.as_str().to_ascii_lowercase(), value))
        .collect();
    let mut figment = figment.merge(env.filter(|key| !is_secret_key(key.as_str())));
    for (key, value) in secrets {
        figment = figment.merge(figment::providers::Serialized::default(&key, value));
    }
    figment
}

/// A secret that must be given, inline or as `<key>_file`.
pub(super) fn required_secret(
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
pub(super) fn resolve_secret(
    key: &str,
    inline: Option<SecretString>,
    file: Option<RelativePathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
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
pub(super) fn secrets_readable_by_others(path: &Path, table: &toml::Table) -> Option<String> {
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
pub(super) fn secret_files_readable_by_others(raw: &RawConfig) -> Vec<String> {
    let auth = &raw.auth;
    [
        ("auth.permanent_token_file", &auth.permanent_token_file),
        ("auth.client_secret_file", &auth.client_secret_file),
        ("auth.consumer_secret_file", &auth.consumer_secret_file),
        ("auth.token_file", &auth.token_file),
        ("auth.token_secret_file", &auth.token_secret_file),
        ("server.token_file", &raw.server.token_file),
        ("source.password_file", &raw.source.password_file),
        ("database.password_file", &raw.database.password_file),
        ("database.url_file", &raw.database.url_file),
        ("source.url_file", &raw.source.url_file),
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

/// Everything that identifies the credentials, secrets included: only ever compared, never shown.
pub(super) fn auth_identity(auth: &AuthSettings) -> String {
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

/// The source settings, the database password included: only ever compared, never shown.
pub(super) fn source_identity(source: &super::SourceSettings) -> String {
    format!(
        "{source:?} {:?}",
        source
            .url
            .as_ref()
            .and_then(|u| u.password.as_ref())
            .map(|p| p.expose_secret())
    )
}

/// The server settings, the token included: only ever compared, never shown.
pub(super) fn server_identity(server: &ServerSettings) -> String {
    format!(
        "{server:?} {:?}",
        server.token.as_ref().map(|t| t.expose_secret())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{load, with_auth, with_config_file, GOOD};
    use crate::config::{load_config, AuthSettings};

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

    /// A relative `*_file` in `[auth]` is read from the config file's folder, not the working
    /// directory (`/` under systemd).
    #[test]
    fn a_relative_secret_file_is_found_beside_the_config_file() {
        let text = GOOD.replace(
            "permanent_token = \"s3cret-token\"",
            "permanent_token_file = \"token\"",
        );
        let c = with_config_file(&text, &[], |source| {
            std::fs::write(source.path().with_file_name("token"), "beside\n").unwrap();
            load_config(source)
        })
        .unwrap();
        let AuthSettings::PermanentToken { token } = &c.auth else {
            panic!("{:?}", c.auth)
        };
        assert_eq!(token.expose_secret(), "beside");
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
}

//! `check`: can the daemon work with this config? Validates it, reaches the portal,
//! authenticates, and shows who the daemon acts as and which scopes it got. Also the connection
//! `raw` shares.

use std::sync::Arc;

use reqwest::StatusCode;

use super::{Exit, Failure};
use crate::auth::{Credentials, REQUIRED_SCOPES};
use crate::bynder::{self, Client};
use crate::config::{AuthSettings, Config, ConfigError};
use crate::gate::Gate;
use crate::store::{open_store, OpenMode, Store};

/// The gate, store (when the credentials live in it) and client for a one-off command.
pub(super) async fn connect(config: &Config) -> Result<(Option<Store>, Client), Failure> {
    let store = if config.auth.needs_store() {
        Some(open_store(&config.database, OpenMode::Existing).await?)
    } else {
        None
    };
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let credentials = Credentials::load(config, store.as_ref(), gate.clone()).await?;
    let client = Client::new(config, credentials, gate)
        .map_err(|e| ConfigError::new(format!("{e}. Fix: check bynder.ca_file")))?;
    Ok((store, client))
}

/// `check`: validates the config, reaches the portal, authenticates, and shows who the daemon
/// acts as and with which scopes. Sends only reads. Exit 0 when the daemon can work, 4 when the
/// credentials are refused or lack a scope or role, 1 when the portal cannot be reached.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

/// An asset id no portal has: reading its usages proves the read scope and the STATISTICS
/// role without touching anything.
const PROBE_ASSET: &str = "00000000-0000-0000-0000000000000000";

pub async fn check(config: Config, _args: CheckArgs) -> Result<Exit, Failure> {
    println!(
        "Config:       valid (auth.method = \"{}\")",
        config.auth.method_name()
    );
    println!(
        "Portal:       {} (integration {})",
        config.bynder.base_url, config.bynder.integration_id
    );
    let (store, client) = connect(&config).await?;
    let result = check_with(&config, &client).await;
    if let Some(store) = store {
        store.close().await;
    }
    match &result {
        Ok(_) => println!("Result:       ok, the daemon can sync with these credentials"),
        Err(e) => println!("Result:       FAILED: {e}"),
    }
    result
}

async fn check_with(config: &Config, client: &Client) -> Result<Exit, Failure> {
    let credentials = client.credentials();
    let oauth_scopes = match credentials.token_info().await {
        Ok(Some(info)) => {
            let scopes = info.scopes.clone();
            println!(
                "Token:        obtained from {}; expires in {}; scopes: {}",
                token_url(config),
                info.lifetime
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "(not said)".into()),
                scopes
                    .as_ref()
                    .map(|s| s.join(" "))
                    .unwrap_or_else(|| "(not reported; assuming those requested)".into())
            );
            scopes
        }
        Ok(None) => {
            println!(
                "Token:        {}",
                match &config.auth {
                    AuthSettings::OAuth1(_) => "OAuth 1.0a signature (no scopes to report)",
                    _ => "permanent token (its scopes are set in Bynder and not reported)",
                }
            );
            None
        }
        Err(e) => {
            println!("Token:        FAILED");
            return Err(e.into());
        }
    };

    match current_user_on_its_own(config, client).await {
        Ok(user) => println!("Acting as:    {}", describe_user(&user)),
        Err(bynder::Error::Auth(e)) if e.is_invalid_scope() => println!(
            "Acting as:    unknown: the OAuth app does not allow the {CURRENT_USER_SCOPE} scope, which \
             the daemon does not need (usage access is checked below)"
        ),
        Err(e) if e.status() == Some(StatusCode::FORBIDDEN) => println!(
            "Acting as:    unknown: Bynder refused /api/v4/currentUser/ (403); the credentials lack \
             the current.user:read scope (the daemon does not need it)"
        ),
        Err(e) => {
            println!("Acting as:    FAILED");
            return Err(api_failure(e, credentials, CURRENT_USER_SCOPE));
        }
    }

    let probe_asset = crate::model::AssetId::parse(PROBE_ASSET).expect("a valid asset id");
    match client.list_usages(&probe_asset).await {
        Ok(_) => println!("Usage API:    readable (asset.usage:read and the STATISTICS role)"),
        // Bynder's answer for an unknown asset is not documented; neither is a 403.
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(400 | 404)) => {
            println!("Usage API:    readable (asset.usage:read and the STATISTICS role)")
        }
        Err(e) if e.status() == Some(StatusCode::FORBIDDEN) => {
            println!("Usage API:    FAILED (403)");
            let missing_read = oauth_scopes
                .as_ref()
                .is_some_and(|s| !s.iter().any(|g| g == "asset.usage:read"));
            let why = if missing_read {
                "the access token lacks the asset.usage:read scope. Fix: add it to auth.scopes and \
                 allow it for the OAuth app"
                    .to_owned()
            } else if oauth_scopes.is_some() {
                "the credentials' user lacks the STATISTICS security role. Fix: give the OAuth app's \
                 assigned user a profile with the STATISTICS role in Bynder"
                    .to_owned()
            } else {
                "the token lacks the asset.usage:read scope or its user lacks the STATISTICS security \
                 role. Fix: check the token's scopes and give its user the STATISTICS role in Bynder"
                    .to_owned()
            };
            return Err(Failure::Credentials(format!(
                "Bynder refused to list usages (403): {why}"
            )));
        }
        Err(e) => {
            println!("Usage API:    FAILED");
            return Err(api_failure(e, credentials, "asset.usage:read"));
        }
    }

    match &oauth_scopes {
        Some(scopes) => {
            let missing: Vec<&str> = REQUIRED_SCOPES
                .into_iter()
                .filter(|s| !scopes.iter().any(|g| g == s))
                .collect();
            if !missing.is_empty() {
                println!("Write access: FAILED (scope missing)");
                return Err(Failure::Credentials(format!(
                    "the access token lacks the scope(s) {}: Bynder will refuse creates and deletes (403). \
                     Fix: add them to auth.scopes and allow them for the OAuth app",
                    missing.join(", ")
                )));
            }
            println!("Write access: granted (asset.usage:write)");
        }
        None => println!(
            "Write access: not tested (a check never writes); the credentials need the \
             asset.usage:write scope"
        ),
    }
    Ok(Exit::Ok)
}

/// The scope `GET /api/v4/currentUser/` needs; only `check` uses it, to say who the daemon acts as.
const CURRENT_USER_SCOPE: &str = "current.user:read";

/// `GET /api/v4/currentUser/`. With client credentials whose scopes lack `current.user:read`,
/// a token is asked for with it on its own, so that an app registered with the usage scopes
/// only (as Bynder's setup guide does it) still checks out: its `invalid_scope` is a note.
async fn current_user_on_its_own(
    config: &Config,
    client: &Client,
) -> Result<serde_json::Value, bynder::Error> {
    if let AuthSettings::ClientCredentials(settings) = &config.auth {
        if !settings.scopes.iter().any(|s| s == CURRENT_USER_SCOPE) {
            let mut widened = config.clone();
            if let AuthSettings::ClientCredentials(s) = &mut widened.auth {
                s.scopes.push(CURRENT_USER_SCOPE.to_owned());
            }
            let credentials = Credentials::load(&widened, None, client.gate().clone()).await?;
            let asking = Client::new(&widened, credentials, client.gate().clone())?;
            return asking.current_user().await;
        }
    }
    client.current_user().await
}

fn token_url(config: &Config) -> String {
    match &config.auth {
        AuthSettings::ClientCredentials(s) | AuthSettings::RefreshToken(s) => {
            s.token_url.to_string()
        }
        _ => String::new(),
    }
}

fn describe_user(user: &serde_json::Value) -> String {
    let field = |name: &str| {
        user.get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let name = [field("firstname"), field("infix"), field("lastname")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = if name.is_empty() {
        field("username").unwrap_or("(no name)").to_owned()
    } else {
        name
    };
    if let Some(email) = field("email") {
        out.push_str(&format!(" <{email}>"));
    }
    let ids: Vec<String> = [
        ("username", field("username")),
        ("user id", field("id")),
        ("profile", field("profileId")),
    ]
    .into_iter()
    .filter_map(|(label, v)| v.map(|v| format!("{label} {v}")))
    .collect();
    if !ids.is_empty() {
        out.push_str(&format!(" ({})", ids.join(", ")));
    }
    out
}

/// The failure for an API error during `check`: a 401 names the credential to fix.
fn api_failure(error: bynder::Error, credentials: &Credentials, scope: &str) -> Failure {
    match error.status().map(|s| s.as_u16()) {
        Some(401) => Failure::Credentials(format!(
            "Bynder rejected the credentials (401). Fix: {}",
            credentials.rejection_fix()
        )),
        Some(403) => Failure::Credentials(format!(
            "Bynder refused the request (403): the credentials lack the {scope} scope"
        )),
        _ => match error {
            bynder::Error::Auth(e) => e.into(),
            bynder::Error::Connect { .. } | bynder::Error::Timeout(_) => {
                Failure::Unreachable(error.to_string())
            }
            other => Failure::Unexpected(anyhow::Error::new(other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_described_by_name_email_and_ids() {
        let user = serde_json::json!({
            "id": "U1", "username": "robot", "email": "r@example.com",
            "firstname": "Sync", "infix": "", "lastname": "Robot", "profileId": "P1"
        });
        assert_eq!(
            describe_user(&user),
            "Sync Robot <r@example.com> (username robot, user id U1, profile P1)"
        );
    }
}

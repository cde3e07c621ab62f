//! Credentials the one-time logins keep in the state database's `settings` table: the OAuth 2
//! refresh token (`auth login`) and the OAuth 1.0a token pair (`auth oauth1-login`).
//!
//! Each is one row holding a small JSON document, so a pair is written (and replaced) in one
//! statement and can never be found half-written. The values are secrets: they are only
//! deserialized here and handed on wrapped in [`SecretString`]; the state database itself must
//! be readable by the service user alone (docs/authentication.md says so).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::store::Store;

use super::AuthError;

const REFRESH_KEY: &str = "auth.oauth2.refresh_token";
const OAUTH1_KEY: &str = "auth.oauth1.token_pair";

/// How long an OAuth 1.0a token pair from the handshake stays valid at Bynder.
pub const OAUTH1_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// `status` and every run warn when less than this is left.
pub const OAUTH1_WARN_BEFORE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The refresh token `auth login` obtained.
pub(crate) struct SavedRefresh {
    /// The OAuth app it was issued to: another `auth.client_id` cannot use it.
    pub client_id: String,
    pub refresh_token: SecretString,
    pub scopes: Vec<String>,
    pub obtained_at: DateTime<Utc>,
}

/// The OAuth 1.0a token pair `auth oauth1-login` obtained.
pub(crate) struct SavedOAuth1 {
    pub consumer_key: String,
    pub token: SecretString,
    pub token_secret: SecretString,
    pub obtained_at: DateTime<Utc>,
}

impl SavedOAuth1 {
    /// When Bynder stops accepting the pair. `obtained_at` comes from the state database; a
    /// date so late that 30 days cannot be added to it saturates instead of panicking.
    pub fn expires_at(&self) -> DateTime<Utc> {
        chrono::Duration::from_std(OAUTH1_VALIDITY)
            .ok()
            .and_then(|validity| self.obtained_at.checked_add_signed(validity))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// A warning when the pair expires soon (or did), else `None`.
    pub fn expiry_warning(&self, now: DateTime<Utc>) -> Option<String> {
        let expires = self.expires_at();
        let left = expires - now;
        let warn = chrono::Duration::from_std(OAUTH1_WARN_BEFORE).unwrap_or_default();
        if left <= chrono::Duration::zero() {
            Some(format!(
                "the OAuth 1.0a token pair from `auth oauth1-login` expired on {} (obtained {}, valid 30 days). \
                 Fix: run `bynder-usage-sync auth oauth1-login` again",
                expires.format("%Y-%m-%d %H:%M UTC"),
                self.obtained_at.format("%Y-%m-%d")
            ))
        } else if left < warn {
            Some(format!(
                "the OAuth 1.0a token pair from `auth oauth1-login` expires on {} ({} day(s) left). \
                 Fix: run `bynder-usage-sync auth oauth1-login` again before then",
                expires.format("%Y-%m-%d %H:%M UTC"),
                left.num_days()
            ))
        } else {
            None
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RefreshRow {
    client_id: String,
    refresh_token: String,
    #[serde(default)]
    scopes: Vec<String>,
    obtained_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct OAuth1Row {
    consumer_key: String,
    token: String,
    token_secret: String,
    obtained_at: DateTime<Utc>,
}

pub(crate) async fn load_refresh(store: &Store) -> Result<Option<SavedRefresh>, AuthError> {
    let Some(text) = store.setting(REFRESH_KEY).await.map_err(store_error)? else {
        return Ok(None);
    };
    let row: RefreshRow = serde_json::from_str(&text).map_err(|_| corrupt(REFRESH_KEY))?;
    Ok(Some(SavedRefresh {
        client_id: row.client_id,
        refresh_token: SecretString::from(row.refresh_token),
        scopes: row.scopes,
        obtained_at: row.obtained_at,
    }))
}

pub(crate) async fn save_refresh(store: &Store, saved: &SavedRefresh) -> Result<(), AuthError> {
    let row = RefreshRow {
        client_id: saved.client_id.clone(),
        refresh_token: saved.refresh_token.expose_secret().to_owned(),
        scopes: saved.scopes.clone(),
        obtained_at: saved.obtained_at,
    };
    let text = serde_json::to_string(&row).expect("a refresh row serializes");
    store
        .set_setting(REFRESH_KEY, Some(&text))
        .await
        .map_err(store_error)
}

pub(crate) async fn load_oauth1(store: &Store) -> Result<Option<SavedOAuth1>, AuthError> {
    let Some(text) = store.setting(OAUTH1_KEY).await.map_err(store_error)? else {
        return Ok(None);
    };
    let row: OAuth1Row = serde_json::from_str(&text).map_err(|_| corrupt(OAUTH1_KEY))?;
    Ok(Some(SavedOAuth1 {
        consumer_key: row.consumer_key,
        token: SecretString::from(row.token),
        token_secret: SecretString::from(row.token_secret),
        obtained_at: row.obtained_at,
    }))
}

pub(crate) async fn save_oauth1(store: &Store, saved: &SavedOAuth1) -> Result<(), AuthError> {
    let row = OAuth1Row {
        consumer_key: saved.consumer_key.clone(),
        token: saved.token.expose_secret().to_owned(),
        token_secret: saved.token_secret.expose_secret().to_owned(),
        obtained_at: saved.obtained_at,
    };
    let text = serde_json::to_string(&row).expect("an OAuth 1 row serializes");
    store
        .set_setting(OAUTH1_KEY, Some(&text))
        .await
        .map_err(store_error)
}

fn store_error(e: sqlx::Error) -> AuthError {
    AuthError::Store(Arc::new(e))
}

fn corrupt(key: &str) -> AuthError {
    AuthError::NotLoggedIn(format!(
        "the stored credentials (settings key `{key}` in the state database) cannot be read. \
         Fix: run the login again (`bynder-usage-sync auth login` or `auth oauth1-login`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(obtained_days_ago: i64) -> SavedOAuth1 {
        SavedOAuth1 {
            consumer_key: "ck".into(),
            token: SecretString::from("t"),
            token_secret: SecretString::from("ts"),
            obtained_at: Utc::now() - chrono::Duration::days(obtained_days_ago),
        }
    }

    #[test]
    fn an_oauth1_pair_warns_in_its_last_week_and_once_expired() {
        let now = Utc::now();
        assert!(pair(1).expiry_warning(now).is_none());
        assert!(pair(22).expiry_warning(now).is_none());
        let soon = pair(25).expiry_warning(now).unwrap();
        assert!(
            soon.contains("expires on") && soon.contains("auth oauth1-login"),
            "{soon}"
        );
        let gone = pair(31).expiry_warning(now).unwrap();
        assert!(gone.contains("expired on"), "{gone}");
    }

    /// REGRESSION: `obtained_at` is read from the settings table; a pair stored with the latest
    /// date chrono knows made `status` and every run panic adding its 30 days of validity.
    #[test]
    fn a_stored_pair_dated_at_the_end_of_time_does_not_panic() {
        let mut late = pair(0);
        late.obtained_at = DateTime::<Utc>::MAX_UTC;
        assert_eq!(late.expires_at(), DateTime::<Utc>::MAX_UTC);
        assert!(late.expiry_warning(Utc::now()).is_none());
    }
}

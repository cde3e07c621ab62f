//! Authentication: turns the configured credentials into an authorized request, for each of the
//! four ways Bynder portals are reached (`[auth] method`):
//!
//! - `permanent_token`: `Authorization: Bearer <token>`; nothing to renew.
//! - `client_credentials`: OAuth 2 tokens the daemon fetches itself ([`oauth2`], cached and
//!   renewed by [`token`]).
//! - `refresh_token`: OAuth 2 tokens renewed with the refresh token `auth login` stored in the
//!   state database ([`saved`]).
//! - `oauth1`: every request signed with RFC 5849 HMAC-SHA1 ([`oauth1`]).
//!
//! Owns the secrets after configuration hands them over; they are exposed only here, while a
//! request is being authorized or a token requested, and never reach a log, an error or
//! `Debug` output. It does not know which endpoint a request is for, and it does not retry API
//! calls: `bynder::Client` calls [`Credentials::renew_after_rejection`] once on a 401.

mod oauth1;
mod oauth2;
mod saved;
mod token;
mod transport;

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthSettings, Config, OAuth1Settings, OAuth2Settings};
use crate::gate::Gate;
use crate::store::Store;

pub use self::oauth2::{OFFLINE_SCOPE, REQUIRED_SCOPES};
pub use self::saved::{OAUTH1_VALIDITY, OAUTH1_WARN_BEFORE};
pub use self::token::TokenInfo;

/// Why a request could not be authorized. Never carries a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The credential cannot be put into a header.
    #[error("the credential header could not be built: {0}")]
    Header(String),
    /// The token endpoint is down, slow, or answered 5xx: try again later.
    #[error("the token endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The token endpoint answered 429; the process-wide pause has started.
    #[error("the token endpoint answered 429 (Bynder's rate limit)")]
    RateLimited,
    /// The credentials (or the settings around them) were refused.
    #[error("{problem}. Fix: {fix}")]
    Rejected { problem: String, fix: String },
    /// What a one-time login stores is missing; the message says which login to run.
    #[error("{0}")]
    NotLoggedIn(String),
    /// The state database failed while reading or storing credentials.
    #[error("the state database failed while reading or storing credentials: {0}")]
    Store(#[source] Arc<sqlx::Error>),
    /// A one-time login could not finish (no answer in time, a refused approval…).
    #[error("{0}")]
    Login(String),
    /// The HTTP client for the authentication endpoints could not be built.
    #[error("the HTTP client could not be set up: {0}. Fix: check bynder.ca_file")]
    Setup(String),
}

/// How a caller reacts to an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Try again later; nothing reached the API.
    Transient,
    /// Bynder's rate limit: every request waits for the pause.
    RateLimited,
    /// Sending again cannot help until someone changes the credentials or the config.
    Rejected,
}

impl AuthError {
    /// Whether the token endpoint refused a scope that was asked for (`invalid_scope`).
    pub fn is_invalid_scope(&self) -> bool {
        matches!(self, AuthError::Rejected { problem, .. } if problem.contains("(invalid_scope"))
    }

    pub fn failure(&self) -> AuthFailure {
        match self {
            AuthError::Unavailable(_) | AuthError::Store(_) => AuthFailure::Transient,
            AuthError::RateLimited => AuthFailure::RateLimited,
            AuthError::Header(_)
            | AuthError::Rejected { .. }
            | AuthError::NotLoggedIn(_)
            | AuthError::Login(_)
            | AuthError::Setup(_) => AuthFailure::Rejected,
        }
    }
}

/// The credentials a client signs its requests with.
pub struct Credentials {
    kind: Kind,
}

enum Kind {
    /// A permanent token, sent as a bearer token. It never expires; a 401 means it was revoked.
    Bearer(SecretString),
    ClientCredentials(oauth2::OAuth2),
    RefreshToken(oauth2::OAuth2),
    /// Where the token pair came from decides the fix when it is rejected.
    OAuth1 {
        signer: oauth1::Signer,
        from_login: bool,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("method", &self.method_name())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Sets up the configured credentials. Token requests pass `gate`, like API requests.
    /// `store` is needed when [`AuthSettings::needs_store`]: the refresh token or the OAuth 1
    /// token pair is read from it now (so a missing login fails before anything is sent).
    pub async fn load(
        config: &Config,
        store: Option<&Store>,
        gate: Arc<Gate>,
    ) -> Result<Credentials, AuthError> {
        let kind = match &config.auth {
            AuthSettings::PermanentToken { token } => Kind::Bearer(token.clone()),
            AuthSettings::ClientCredentials(settings) => {
                Kind::ClientCredentials(oauth2::OAuth2::new(
                    settings.clone(),
                    Arc::new(transport::Transport::new(&config.bynder, gate)?),
                    oauth2::Grant::ClientCredentials,
                ))
            }
            AuthSettings::RefreshToken(settings) => {
                let store = require_store(store, "auth login")?;
                let refresh_token = oauth2::OAuth2::saved_refresh_token(settings, store).await?;
                Kind::RefreshToken(oauth2::OAuth2::new(
                    settings.clone(),
                    Arc::new(transport::Transport::new(&config.bynder, gate)?),
                    oauth2::Grant::RefreshToken {
                        store: store.clone(),
                        refresh_token: tokio::sync::Mutex::new(refresh_token),
                    },
                ))
            }
            AuthSettings::OAuth1(settings) => oauth1_kind(settings, store).await?,
        };
        Ok(Credentials { kind })
    }

    pub fn method_name(&self) -> &'static str {
        match self.kind {
            Kind::Bearer(_) => "permanent_token",
            Kind::ClientCredentials(_) => "client_credentials",
            Kind::RefreshToken(_) => "refresh_token",
            Kind::OAuth1 { .. } => "oauth1",
        }
    }

    /// Adds the `Authorization` header to a request that is about to be sent (fetching or
    /// renewing an OAuth 2 access token first when needed).
    pub async fn authorize(&self, request: &mut reqwest::Request) -> Result<(), AuthError> {
        let bearer = match &self.kind {
            Kind::Bearer(token) => token.clone(),
            Kind::ClientCredentials(oauth) | Kind::RefreshToken(oauth) => oauth.bearer().await?,
            Kind::OAuth1 { signer, .. } => return signer.sign(request),
        };
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", bearer.expose_secret()))
                .map_err(|_| {
                AuthError::Header("the token contains characters not allowed in a header".into())
            })?;
        value.set_sensitive(true);
        request
            .headers_mut()
            .insert(reqwest::header::AUTHORIZATION, value);
        Ok(())
    }

    /// Called once when Bynder answered 401 to a request authorized with these credentials.
    /// Returns true when the request is worth sending again: an OAuth 2 access token was
    /// renewed (once, however many requests report the same rejected token). False when
    /// nothing can change (a permanent token, an OAuth 1 signature).
    pub async fn renew_after_rejection(&self) -> Result<bool, AuthError> {
        match &self.kind {
            Kind::Bearer(_) | Kind::OAuth1 { .. } => Ok(false),
            Kind::ClientCredentials(oauth) | Kind::RefreshToken(oauth) => {
                oauth.renew_after_rejection().await
            }
        }
    }

    /// For `check`: obtains an OAuth 2 access token if none is cached and tells its scopes and
    /// lifetime. `None` for methods without tokens.
    pub async fn token_info(&self) -> Result<Option<TokenInfo>, AuthError> {
        match &self.kind {
            Kind::Bearer(_) | Kind::OAuth1 { .. } => Ok(None),
            Kind::ClientCredentials(oauth) | Kind::RefreshToken(oauth) => {
                oauth.token_info().await.map(Some)
            }
        }
    }

    /// What to fix when Bynder keeps rejecting these credentials.
    pub fn rejection_fix(&self) -> String {
        match &self.kind {
            Kind::Bearer(_) => {
                "check auth.permanent_token: it may be mistyped, revoked, or for another portal \
                 (Settings > Advanced Settings > Portal Settings > Permanent Tokens)"
                    .to_owned()
            }
            Kind::ClientCredentials(oauth) => oauth.last_rejection().unwrap_or_else(|| {
                "a freshly issued access token was rejected too: check that auth.token_url belongs to \
                 the portal at bynder.base_url and that the OAuth app's assigned user is active"
                    .to_owned()
            }),
            Kind::RefreshToken(oauth) => oauth.last_rejection().unwrap_or_else(|| {
                "a freshly refreshed access token was rejected too: run `bynder-usage-sync auth login` \
                 again, and check that auth.token_url belongs to the portal at bynder.base_url"
                    .to_owned()
            }),
            Kind::OAuth1 { from_login: true, .. } => {
                "check auth.consumer_key and auth.consumer_secret; the token pair from \
                 `auth oauth1-login` is valid 30 days: run `bynder-usage-sync auth oauth1-login` again"
                    .to_owned()
            }
            Kind::OAuth1 {
                from_login: false, ..
            } => "check auth.consumer_key, auth.consumer_secret, auth.token and auth.token_secret \
                  (Settings > Portal settings > API tokens)"
                .to_owned(),
        }
    }
}

fn require_store<'a>(store: Option<&'a Store>, login: &str) -> Result<&'a Store, AuthError> {
    store.ok_or_else(|| {
        AuthError::NotLoggedIn(format!(
            "the credentials are kept in the state database, which is not open. Fix: run \
             `bynder-usage-sync migrate`, then `bynder-usage-sync {login}`"
        ))
    })
}

async fn oauth1_kind(settings: &OAuth1Settings, store: Option<&Store>) -> Result<Kind, AuthError> {
    let (token, from_login) = match &settings.token {
        Some(pair) => ((pair.token.clone(), pair.token_secret.clone()), false),
        None => {
            let store = require_store(store, "auth oauth1-login")?;
            let Some(saved) = saved::load_oauth1(store).await? else {
                return Err(AuthError::NotLoggedIn(format!(
                    "auth.method is \"oauth1\" without auth.token / auth.token_secret, and the state \
                     database {} holds no token pair. Fix: run `bynder-usage-sync auth oauth1-login` \
                     once, or set auth.token and auth.token_secret",
                    store.describe()
                )));
            };
            if saved.consumer_key != settings.consumer_key {
                return Err(AuthError::NotLoggedIn(format!(
                    "the stored OAuth 1 token pair belongs to the consumer {}, not to auth.consumer_key {}. \
                     Fix: run `bynder-usage-sync auth oauth1-login` again",
                    saved.consumer_key, settings.consumer_key
                )));
            }
            if let Some(warning) = saved.expiry_warning(chrono::Utc::now()) {
                tracing::warn!("{warning}");
            }
            ((saved.token, saved.token_secret), true)
        }
    };
    Ok(Kind::OAuth1 {
        signer: oauth1::Signer::new(
            settings.consumer_key.clone(),
            settings.consumer_secret.clone(),
            Some(token),
        ),
        from_login,
    })
}

/// One line about stored credentials for `status`: a missing login, or an OAuth 1 token pair
/// that expires within a week (or has expired). `None` when all is well or nothing is stored.
pub async fn status_warning(
    settings: &AuthSettings,
    store: &Store,
) -> Result<Option<String>, AuthError> {
    let found = match settings {
        AuthSettings::RefreshToken(oauth) => oauth2::OAuth2::saved_refresh_token(oauth, store)
            .await
            .map(|_| None),
        AuthSettings::OAuth1(oauth) if oauth.token.is_none() => {
            match saved::load_oauth1(store).await {
                Ok(None) => Ok(Some(
                    "no OAuth 1 token pair is stored. Fix: run `bynder-usage-sync auth oauth1-login`"
                        .to_owned(),
                )),
                Ok(Some(saved)) => Ok(saved.expiry_warning(chrono::Utc::now())),
                Err(e) => Err(e),
            }
        }
        _ => Ok(None),
    };
    match found {
        // A missing or unreadable login is exactly what `status` should point out.
        Err(AuthError::NotLoggedIn(message)) => Ok(Some(message)),
        other => other,
    }
}

// ---- one-time logins ----------------------------------------------------------------------------

/// `auth login`, step one: the URL the person opens, and what its answer must match.
pub struct OAuth2Login {
    inner: oauth2::Login,
    settings: OAuth2Settings,
}

impl OAuth2Login {
    /// Starts an authorization-code login with PKCE and a random `state`, for the scopes in
    /// `settings` plus `offline`.
    pub fn start(settings: &OAuth2Settings) -> OAuth2Login {
        OAuth2Login {
            inner: oauth2::start_login(settings),
            settings: settings.clone(),
        }
    }

    /// The authorization URL to open in a browser.
    pub fn url(&self) -> &url::Url {
        &self.inner.url
    }

    /// Whether the `state` a redirect brought back is this login's.
    pub fn state_matches(&self, state: &str) -> bool {
        self.inner.state_matches(state)
    }

    /// Step two: exchanges the code (through `gate`) and stores the refresh token. Returns the
    /// granted scopes.
    pub async fn finish(
        self,
        config: &Config,
        store: &Store,
        gate: Arc<Gate>,
        code: String,
    ) -> Result<Vec<String>, AuthError> {
        let transport = transport::Transport::new(&config.bynder, gate)?;
        oauth2::finish_login(&self.settings, &transport, store, self.inner, code).await
    }
}

/// `auth oauth1-login`: the temporary-token handshake, one step at a time.
pub struct OAuth1Login {
    transport: transport::Transport,
    base_url: url::Url,
    settings: OAuth1Settings,
    request_token: oauth1::TokenPair,
}

impl OAuth1Login {
    /// Step one: `POST /api/v4/oauth/request_token/`, signed with the consumer alone.
    pub async fn start(config: &Config, gate: Arc<Gate>) -> Result<OAuth1Login, AuthError> {
        let AuthSettings::OAuth1(settings) = &config.auth else {
            return Err(AuthError::Login(
                "auth oauth1-login needs auth.method = \"oauth1\"".into(),
            ));
        };
        let transport = transport::Transport::new(&config.bynder, gate)?;
        let consumer = oauth1::Signer::new(
            settings.consumer_key.clone(),
            settings.consumer_secret.clone(),
            None,
        );
        let request_token =
            oauth1::request_token(&transport, &config.bynder.base_url, &consumer).await?;
        Ok(OAuth1Login {
            transport,
            base_url: config.bynder.base_url.clone(),
            settings: settings.clone(),
            request_token,
        })
    }

    /// Step two happens in a browser: the URL that approves the request token, redirecting to
    /// `callback` afterwards when one is given.
    pub fn authorise_url(&self, callback: Option<&url::Url>) -> url::Url {
        oauth1::authorise_url(
            &self.base_url,
            self.request_token.token.expose_secret(),
            callback,
        )
    }

    /// Whether a callback's `oauth_token` is this login's request token.
    pub fn is_request_token(&self, token: &str) -> bool {
        self.request_token.token.expose_secret() == token
    }

    /// Step three: `POST /api/v4/oauth/access_token/` and store the pair. Returns when it
    /// expires.
    pub async fn finish(self, store: &Store) -> Result<chrono::DateTime<chrono::Utc>, AuthError> {
        let signer = oauth1::Signer::new(
            self.settings.consumer_key.clone(),
            self.settings.consumer_secret.clone(),
            Some((
                self.request_token.token.clone(),
                self.request_token.secret.clone(),
            )),
        );
        let pair = oauth1::access_token(&self.transport, &self.base_url, &signer).await?;
        let saved = saved::SavedOAuth1 {
            consumer_key: self.settings.consumer_key.clone(),
            token: pair.token,
            token_secret: pair.secret,
            obtained_at: chrono::Utc::now(),
        };
        saved::save_oauth1(store, &saved).await?;
        Ok(saved.expires_at())
    }
}

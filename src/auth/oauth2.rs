//! OAuth 2 with the `oauth2` crate: client credentials, the refresh-token grant, and the
//! authorization-code exchange (with PKCE) of `auth login`.
//!
//! Owns the token endpoint's requests and what their failures mean; the caching and the
//! single flight are [`super::token`]'s. Every request goes through the gated
//! [`Transport`]. Where Bynder is silent this assumes the defensive reading of the API
//! reference: a refresh answer may lack `refresh_token` (keep the old one; store a new one
//! when given), and a client-credentials answer carries none.

use std::sync::{Arc, Mutex as StdMutex};

use chrono::Utc;
use oauth2::basic::{BasicClient, BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use url::Url;

use crate::config::{ClientAuth, OAuth2Settings};
use crate::store::Store;

use super::saved::{self, SavedRefresh};
use super::token::{Issued, TokenCache, TokenInfo};
use super::transport::{Transport, TransportError};
use super::AuthError;

/// The scope that makes Bynder issue a refresh token.
pub const OFFLINE_SCOPE: &str = "offline";
/// Scopes the daemon needs on every token: reading back and writing usages.
pub const REQUIRED_SCOPES: [&str; 2] = ["asset.usage:read", "asset.usage:write"];

type TokenClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;
type TokenError = RequestTokenError<TransportError, BasicErrorResponse>;

/// Which grant renews the access token.
pub(crate) enum Grant {
    ClientCredentials,
    /// The refresh token in memory; the state database holds the same one.
    RefreshToken {
        store: Store,
        refresh_token: tokio::sync::Mutex<SecretString>,
    },
}

/// An OAuth 2 app and the access token it currently holds.
pub(crate) struct OAuth2 {
    settings: OAuth2Settings,
    transport: Arc<Transport>,
    grant: Grant,
    cache: TokenCache,
    /// The last refusal of the token endpoint, for the fix message of a stopped run.
    last_rejection: StdMutex<Option<String>>,
}

impl OAuth2 {
    pub fn new(settings: OAuth2Settings, transport: Arc<Transport>, grant: Grant) -> OAuth2 {
        OAuth2 {
            settings,
            transport,
            grant,
            cache: TokenCache::new(),
            last_rejection: StdMutex::new(None),
        }
    }

    /// Loads the refresh token `auth login` stored, for the refresh-token grant.
    pub async fn saved_refresh_token(
        settings: &OAuth2Settings,
        store: &Store,
    ) -> Result<SecretString, AuthError> {
        let not_logged_in = |why: String| {
            AuthError::NotLoggedIn(format!(
                "{why}. Fix: run `bynder-usage-sync auth login` once (it stores a refresh token in the state database)"
            ))
        };
        match saved::load_refresh(store).await? {
            None => Err(not_logged_in(format!(
                "auth.method is \"refresh_token\" but the state database {} holds no refresh token",
                store.describe()
            ))),
            Some(saved) if saved.client_id != settings.client_id => Err(not_logged_in(format!(
                "the stored refresh token was issued to the OAuth app {}, not to auth.client_id {}",
                saved.client_id, settings.client_id
            ))),
            Some(saved) => Ok(saved.refresh_token),
        }
    }

    /// The access token to send, renewed first when due.
    pub async fn bearer(&self) -> Result<SecretString, AuthError> {
        self.cache.bearer(|| self.fetch()).await
    }

    /// See [`TokenCache::renew_after_rejection`].
    pub async fn renew_after_rejection(&self) -> Result<bool, AuthError> {
        self.cache.renew_after_rejection(|| self.fetch()).await
    }

    /// The current token's scopes and lifetime, fetching a token first if there is none.
    pub async fn token_info(&self) -> Result<TokenInfo, AuthError> {
        self.bearer().await?;
        Ok(self
            .cache
            .info()
            .await
            .expect("a token is cached after bearer()"))
    }

    pub fn last_rejection(&self) -> Option<String> {
        self.last_rejection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn fetch(&self) -> Result<Issued, AuthError> {
        let result = match &self.grant {
            Grant::ClientCredentials => self.client_credentials().await,
            Grant::RefreshToken {
                store,
                refresh_token,
            } => self.refresh(store, refresh_token).await,
        };
        match &result {
            Err(AuthError::Rejected { problem, fix }) => {
                *self
                    .last_rejection
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(format!("{problem}: {fix}"));
            }
            Ok(issued) => warn_about_missing_scopes(issued.scopes.as_deref()),
            Err(_) => {}
        }
        result
    }

    #[tracing::instrument(skip_all, fields(token_url = %self.settings.token_url), err(level = "debug"))]
    async fn client_credentials(&self) -> Result<Issued, AuthError> {
        let client = token_client(&self.settings);
        let requested_at = Instant::now();
        let response = client
            .exchange_client_credentials()
            .add_scopes(self.settings.scopes.iter().cloned().map(Scope::new))
            .request_async(&*self.transport)
            .await
            .map_err(|e| classify(e, &self.settings, GrantKind::ClientCredentials))?;
        Ok(issued(&response, requested_at))
    }

    #[tracing::instrument(skip_all, fields(token_url = %self.settings.token_url), err(level = "debug"))]
    async fn refresh(
        &self,
        store: &Store,
        current: &tokio::sync::Mutex<SecretString>,
    ) -> Result<Issued, AuthError> {
        let mut refresh_token = current.lock().await;
        let client = token_client(&self.settings);
        let mut requested_at = Instant::now();
        let mut result = exchange_refresh(&client, &self.transport, &refresh_token).await;
        if let Err(RequestTokenError::ServerResponse(e)) = &result {
            if *e.error() == BasicErrorResponseType::InvalidGrant {
                // `auth login` may have run again since this process started (or another
                // process rotated the token): try the stored one if it differs.
                if let Ok(stored) = Self::saved_refresh_token(&self.settings, store).await {
                    if stored.expose_secret() != refresh_token.expose_secret() {
                        tracing::info!("the refresh token was replaced in the state database; using the new one");
                        *refresh_token = stored;
                        requested_at = Instant::now();
                        result = exchange_refresh(&client, &self.transport, &refresh_token).await;
                    }
                }
            }
        }
        let response = result.map_err(|e| classify(e, &self.settings, GrantKind::RefreshToken))?;
        if let Some(new) = response.refresh_token() {
            if new.secret() != refresh_token.expose_secret() {
                // Rotation: the old one may stop working at once, so the new one is kept in
                // memory first and written to the database before it is ever needed.
                *refresh_token = SecretString::from(new.secret().clone());
                let saved = SavedRefresh {
                    client_id: self.settings.client_id.clone(),
                    refresh_token: refresh_token.clone(),
                    scopes: scopes_of(&response).unwrap_or_default(),
                    obtained_at: Utc::now(),
                };
                if let Err(error) = saved::save_refresh(store, &saved).await {
                    tracing::error!(%error, "Bynder issued a new refresh token but it could not be stored; \
                        this process keeps using it, but after a restart `auth login` may be needed");
                }
            }
        }
        Ok(issued(&response, requested_at))
    }
}

/// A login in progress: the URL to open, and what the answer must match.
pub(crate) struct Login {
    pub url: Url,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
}

impl Login {
    /// Whether `state` from the redirect is the one this login sent (CSRF protection).
    pub fn state_matches(&self, state: &str) -> bool {
        let expected = self.state.secret().as_bytes();
        let given = state.as_bytes();
        expected.len() == given.len()
            && expected
                .iter()
                .zip(given)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// Builds the authorization URL: the configured scopes plus `offline`, a random `state`, and
/// a PKCE S256 challenge.
pub(crate) fn start_login(settings: &OAuth2Settings) -> Login {
    let client = token_client(settings);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut scopes = settings.scopes.clone();
    if !scopes.iter().any(|s| s == OFFLINE_SCOPE) {
        scopes.push(OFFLINE_SCOPE.to_owned());
    }
    let (url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.into_iter().map(Scope::new))
        .set_pkce_challenge(challenge)
        .url();
    Login {
        url,
        state,
        verifier,
    }
}

/// Exchanges the authorization code and stores the refresh token. Returns the granted scopes.
pub(crate) async fn finish_login(
    settings: &OAuth2Settings,
    transport: &Transport,
    store: &Store,
    login: Login,
    code: String,
) -> Result<Vec<String>, AuthError> {
    let client = token_client(settings);
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(login.verifier)
        .request_async(transport)
        .await
        .map_err(|e| classify(e, settings, GrantKind::AuthorizationCode))?;
    let scopes = scopes_of(&response).unwrap_or_default();
    let Some(refresh_token) = response.refresh_token() else {
        return Err(AuthError::Rejected {
            problem: "Bynder issued no refresh token".into(),
            fix: format!(
                "the OAuth app must allow the refresh token grant and the `{OFFLINE_SCOPE}` scope \
                 (granted: {})",
                if scopes.is_empty() {
                    "not reported".to_owned()
                } else {
                    scopes.join(" ")
                }
            ),
        });
    };
    let saved = SavedRefresh {
        client_id: settings.client_id.clone(),
        refresh_token: SecretString::from(refresh_token.secret().clone()),
        scopes: scopes.clone(),
        obtained_at: Utc::now(),
    };
    saved::save_refresh(store, &saved).await?;
    Ok(scopes)
}

fn token_client(settings: &OAuth2Settings) -> TokenClient {
    BasicClient::new(ClientId::new(settings.client_id.clone()))
        .set_client_secret(ClientSecret::new(
            settings.client_secret.expose_secret().to_owned(),
        ))
        .set_auth_uri(AuthUrl::from_url(settings.auth_url.clone()))
        .set_token_uri(TokenUrl::from_url(settings.token_url.clone()))
        .set_redirect_uri(RedirectUrl::from_url(settings.redirect_uri.clone()))
        .set_auth_type(match settings.client_auth {
            ClientAuth::Body => AuthType::RequestBody,
            ClientAuth::Basic => AuthType::BasicAuth,
        })
}

async fn exchange_refresh(
    client: &TokenClient,
    transport: &Transport,
    refresh_token: &SecretString,
) -> Result<BasicTokenResponse, TokenError> {
    let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
    client
        .exchange_refresh_token(&token)
        .request_async(transport)
        .await
}

fn issued(response: &BasicTokenResponse, requested_at: Instant) -> Issued {
    Issued {
        access_token: SecretString::from(response.access_token().secret().clone()),
        requested_at,
        expires_in: response.expires_in(),
        scopes: scopes_of(response),
    }
}

fn scopes_of(response: &BasicTokenResponse) -> Option<Vec<String>> {
    response
        .scopes()
        .map(|scopes| scopes.iter().map(|s| s.to_string()).collect())
}

/// The fix for an `invalid_scope` answer: the OAuth app lacks a scope that was asked for. Names
/// the scopes beyond the two the daemon needs, the likeliest culprits.
fn invalid_scope_fix(settings: &OAuth2Settings) -> String {
    let requested = settings.scopes.join(" ");
    let extra: Vec<&str> = settings
        .scopes
        .iter()
        .map(String::as_str)
        .filter(|s| !REQUIRED_SCOPES.contains(s) && *s != OFFLINE_SCOPE)
        .collect();
    if extra.is_empty() {
        format!(
            "the OAuth app does not allow every scope asked for ({requested}): allow {} for it in \
             Bynder (Settings > Advanced Settings > Portal Settings > OAuth Apps)",
            REQUIRED_SCOPES.join(" and ")
        )
    } else {
        format!(
            "the OAuth app does not allow every scope in auth.scopes ({requested}); the daemon needs \
             only {}. Remove {} from auth.scopes (or remove auth.scopes to use the default), or \
             allow {} for the OAuth app in Bynder",
            REQUIRED_SCOPES.join(" and "),
            extra.join(", "),
            if extra.len() == 1 { "it" } else { "them" }
        )
    }
}

fn warn_about_missing_scopes(granted: Option<&[String]>) {
    let Some(granted) = granted else { return };
    let missing: Vec<&str> = REQUIRED_SCOPES
        .into_iter()
        .filter(|s| !granted.iter().any(|g| g == s))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            missing = %missing.join(" "),
            "the access token lacks scopes the daemon needs; Bynder will refuse those calls (403). \
             Fix: add them to auth.scopes and allow them for the OAuth app"
        );
    }
}

#[derive(Clone, Copy)]
enum GrantKind {
    ClientCredentials,
    RefreshToken,
    AuthorizationCode,
}

impl GrantKind {
    fn name(self) -> &'static str {
        match self {
            GrantKind::ClientCredentials => "client credentials",
            GrantKind::RefreshToken => "refresh token",
            GrantKind::AuthorizationCode => "authorization code",
        }
    }
}

/// What a failed token request means: try again later, pause for the rate limit, or stop
/// because the credentials (or the config) must change.
fn classify(error: TokenError, settings: &OAuth2Settings, grant: GrantKind) -> AuthError {
    let url = &settings.token_url;
    let client_fix = "check auth.client_id and auth.client_secret (Settings > Advanced Settings > \
        Portal Settings > OAuth Apps; regenerating the secret invalidates the old one)";
    match error {
        RequestTokenError::ServerResponse(response) => {
            let description = response
                .error_description()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            let problem = format!(
                "the token endpoint {url} refused the {} request ({}{description})",
                grant.name(),
                response.error().as_ref()
            );
            let fix = match (response.error(), grant) {
                (BasicErrorResponseType::InvalidClient, _) => client_fix.to_owned(),
                (BasicErrorResponseType::UnauthorizedClient, _)
                | (BasicErrorResponseType::UnsupportedGrantType, _) => format!(
                    "allow the {} grant type for the OAuth app in Bynder, or pick the auth.method it allows",
                    grant.name()
                ),
                (BasicErrorResponseType::InvalidGrant, GrantKind::RefreshToken) => {
                    "the refresh token was revoked or has expired: run `bynder-usage-sync auth login` again"
                        .to_owned()
                }
                (BasicErrorResponseType::InvalidGrant, _) => {
                    "run `bynder-usage-sync auth login` again (the code expired, was used, or the \
                     redirect URI differs from auth.redirect_uri)"
                        .to_owned()
                }
                (BasicErrorResponseType::InvalidScope, _) => invalid_scope_fix(settings),
                _ => format!("{client_fix}; and auth.token_url"),
            };
            AuthError::Rejected { problem, fix }
        }
        RequestTokenError::Request(TransportError::Status { status, body, .. }) => {
            match status.as_u16() {
                429 => AuthError::RateLimited,
                408 | 500..=599 => AuthError::Unavailable(format!(
                    "the token endpoint {url} answered {status}: {body}"
                )),
                300..=399 => AuthError::Rejected {
                    problem: format!("the token endpoint {url} answered with a redirect ({status})"),
                    fix: "set auth.token_url (or bynder.base_url) to the portal's canonical https URL"
                        .to_owned(),
                },
                401 | 403 => AuthError::Rejected {
                    problem: format!("the token endpoint {url} answered {status}"),
                    fix: client_fix.to_owned(),
                },
                _ => AuthError::Rejected {
                    problem: format!("the token endpoint {url} answered {status}"),
                    fix: "check auth.token_url (default {base_url}/v6/authentication/oauth2/token) \
                          and bynder.base_url"
                        .to_owned(),
                },
            }
        }
        RequestTokenError::Request(TransportError::Build(detail)) => AuthError::Rejected {
            problem: format!("the token request could not be built ({detail})"),
            fix: "check auth.token_url and auth.client_id".to_owned(),
        },
        RequestTokenError::Request(other) => AuthError::Unavailable(other.to_string()),
        // The body may hold a token: only the place of the problem is shown, never the body.
        RequestTokenError::Parse(error, _) => AuthError::Unavailable(format!(
            "the token endpoint {url} answered 200 with a body that is not a token response (at `{}`)",
            error.path()
        )),
        RequestTokenError::Other(detail) => {
            AuthError::Unavailable(format!("the token endpoint {url}: {detail}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::auth::token::{Schedule, MAX_LIFETIME};
    use crate::config::{AuthSettings, Config};
    use crate::gate::Gate;

    /// A client-credentials config whose token endpoint is `server`.
    fn config(server: &str, dir: &std::path::Path) -> Config {
        let mut config = Config::for_portal(
            server,
            "0191a303-9d99-433e-ada4-d244f37e1d7d",
            "unused",
            &dir.join("s.db"),
        )
        .unwrap();
        let base = Url::parse(server).unwrap();
        config.auth = AuthSettings::ClientCredentials(OAuth2Settings {
            client_id: "app".into(),
            client_secret: SecretString::from("s3cret"),
            scopes: REQUIRED_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
            token_url: base.join("/token").unwrap(),
            auth_url: base.join("/auth").unwrap(),
            client_auth: ClientAuth::Body,
            redirect_uri: Url::parse("http://127.0.0.1:1/callback").unwrap(),
        });
        config
    }

    /// REGRESSION: a token endpoint answering `"expires_in": 9223372036854775807` made the
    /// first request panic ("overflow when adding duration to instant"), so `run` exited 1
    /// and systemd restarted it in a loop. The lifetime is clamped and the token works.
    #[tokio::test]
    async fn an_absurd_expires_in_gives_a_working_token_renewed_within_a_day() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(
                r#"{"access_token":"tok","token_type":"bearer","expires_in":9223372036854775807}"#,
                "application/json",
            ))
            .expect(1)
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(&server.uri(), dir.path());
        let gate = Arc::new(Gate::new(1000, Duration::from_secs(60)));
        let credentials = crate::auth::Credentials::load(&config, None, gate)
            .await
            .unwrap();
        for _ in 0..2 {
            let mut request =
                reqwest::Request::new(reqwest::Method::GET, Url::parse(&server.uri()).unwrap());
            credentials.authorize(&mut request).await.unwrap();
            assert_eq!(request.headers()["authorization"], "Bearer tok");
        }
        let now = Instant::now();
        let schedule = Schedule::of(now, Some(Duration::from_secs(i64::MAX as u64)));
        assert!(schedule.renew_at <= now + MAX_LIFETIME);
    }

    /// REGRESSION: an endless 200 answer from the token endpoint was read whole (the token
    /// transport is oauth2's HTTP client). Reading stops at bynder.max_response_size, and no
    /// token is a transient failure naming the cap and the key to raise.
    #[tokio::test]
    async fn an_endless_token_answer_stops_at_the_cap_as_a_transient_failure() {
        let (url, mut hung_up) = crate::body::tests::endless_server().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&url, dir.path());
        config.bynder.max_response_bytes = 64 * 1024;
        config.bynder.timeout = Duration::from_secs(120);
        let gate = Arc::new(Gate::new(1000, Duration::from_secs(60)));
        let credentials = crate::auth::Credentials::load(&config, None, gate)
            .await
            .unwrap();
        let mut request = reqwest::Request::new(reqwest::Method::GET, Url::parse(&url).unwrap());
        let e = credentials.authorize(&mut request).await.unwrap_err();
        assert_eq!(e.failure(), crate::auth::AuthFailure::Transient, "{e}");
        let message = e.to_string();
        assert!(
            message.contains("64.0 KiB") && message.contains("raise bynder.max_response_size"),
            "{message}"
        );
        assert!(
            hung_up.recv().await.is_some(),
            "the client hung up instead of reading on"
        );
    }

    /// Whatever JSON value a token endpoint puts in `expires_in`.
    fn any_expires_in() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            any::<u64>().prop_map(|n| format!("\"{n}\"")),
            Just("null".to_owned()),
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("1e400".to_owned()),
            Just(u64::MAX.to_string()),
            Just(i64::MAX.to_string()),
            Just(i64::MIN.to_string()),
        ]
    }

    proptest! {
        /// Any `expires_in` either makes the answer unreadable (an error the caller retries)
        /// or gives a token renewed after it was requested and within a day; nothing panics.
        #[test]
        fn any_expires_in_never_panics_and_renews_within_a_sane_range(value in any_expires_in()) {
            let body = format!(
                r#"{{"access_token":"tok","token_type":"bearer","expires_in":{value}}}"#
            );
            let Ok(response) = serde_json::from_str::<BasicTokenResponse>(&body) else {
                return Ok(());
            };
            let requested_at = Instant::now();
            let issued = issued(&response, requested_at);
            let schedule = Schedule::of(issued.requested_at, issued.expires_in);
            prop_assert!(schedule.renew_at > requested_at);
            prop_assert!(schedule.renew_at <= schedule.usable_until);
            prop_assert!(schedule.usable_until <= requested_at + MAX_LIFETIME);
        }
    }
}

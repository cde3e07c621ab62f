//! Every credential the simulated portal knows, and the decision whether a request to
//! an API endpoint may proceed.
//!
//! Owns permanent tokens, OAuth 2 apps with the access tokens, refresh tokens and
//! authorization codes issued to them, and OAuth 1.0a consumers and tokens (with the
//! nonces already seen). The token endpoints themselves live in [`super::oauth2`] and
//! [`super::oauth1`], and the OAuth 1.0a signature arithmetic in [`super::signature`];
//! this module only stores and checks.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::http::header;
use base64::Engine as _;
use tokio::time::Instant;

use super::options::{Client, OAuth1Credentials};
use super::signature;
use super::wire::{self, Call, Rejection};

/// An issued OAuth 2 access token.
pub(super) struct AccessToken {
    pub scopes: Vec<String>,
    pub expires_at: Instant,
}

/// An issued OAuth 2 refresh token.
pub(super) struct RefreshToken {
    pub client_id: String,
    pub scopes: Vec<String>,
}

/// An authorization code waiting to be exchanged.
pub(super) struct AuthCode {
    pub client_id: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    /// The PKCE S256 challenge, when the authorization request carried one.
    pub code_challenge: Option<String>,
    pub expires_at: Instant,
}

/// An OAuth 1.0a request token between `request_token` and `access_token`.
struct RequestToken {
    consumer_key: String,
    secret: String,
    authorised: bool,
}

/// Which token an OAuth 1.0a request must be signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OAuth1Token {
    /// The consumer alone (`request_token`).
    None,
    /// An authorised request token (`access_token`).
    AuthorisedRequest,
    /// An access token (every API call).
    Access,
}

/// Who an accepted OAuth 1.0a signature belongs to.
pub(super) struct VerifiedOAuth1 {
    pub consumer_key: String,
    pub token: Option<String>,
}

/// What an authenticated request may do.
enum Access {
    /// Permanent tokens and OAuth 1.0a: the user's full rights.
    Everything,
    /// An OAuth 2 access token: its granted scopes.
    Scopes(Vec<String>),
}

impl Access {
    fn allows(&self, scope: &str) -> bool {
        match self {
            Access::Everything => true,
            Access::Scopes(scopes) => scopes.iter().any(|granted| granted == scope),
        }
    }
}

/// Every credential, behind one lock.
pub(super) struct Credentials {
    permanent: HashSet<String>,
    pub clients: HashMap<String, Client>,
    pub access: HashMap<String, AccessToken>,
    pub refresh: HashMap<String, RefreshToken>,
    pub codes: HashMap<String, AuthCode>,
    oauth1_consumers: HashMap<String, String>,
    /// Access token to (consumer key, token secret).
    oauth1_access: HashMap<String, (String, String)>,
    oauth1_requests: HashMap<String, RequestToken>,
    nonces: NonceLog,
}

impl Credentials {
    pub fn new(
        permanent: Vec<String>,
        clients: Vec<Client>,
        oauth1: Vec<OAuth1Credentials>,
    ) -> Credentials {
        let mut credentials = Credentials {
            permanent: permanent.into_iter().collect(),
            clients: clients
                .into_iter()
                .map(|client| (client.client_id.clone(), client))
                .collect(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: HashMap::new(),
            oauth1_consumers: HashMap::new(),
            oauth1_access: HashMap::new(),
            oauth1_requests: HashMap::new(),
            nonces: NonceLog::default(),
        };
        for pair in oauth1 {
            credentials
                .oauth1_consumers
                .insert(pair.consumer_key.clone(), pair.consumer_secret);
            credentials
                .oauth1_access
                .insert(pair.token, (pair.consumer_key, pair.token_secret));
        }
        credentials
    }

    pub fn revoke_access_tokens(&mut self) {
        self.access.clear();
    }

    pub fn revoke_refresh_tokens(&mut self) {
        self.refresh.clear();
    }

    pub fn revoke_permanent_token(&mut self, token: &str) {
        self.permanent.remove(token);
    }

    /// Stores a new access token and returns it.
    pub fn issue_access_token(&mut self, scopes: Vec<String>, lifetime: Duration) -> String {
        let token = random_secret();
        // Expired tokens are only removed when presented; sweep now and then so a long
        // benchmark that renews often does not grow the map without bound.
        if self.access.len() >= 1024 && self.access.len().is_power_of_two() {
            let now = Instant::now();
            self.access.retain(|_, access| access.expires_at > now);
        }
        self.access.insert(
            token.clone(),
            AccessToken {
                scopes,
                expires_at: Instant::now() + lifetime,
            },
        );
        token
    }

    /// Stores a new refresh token and returns it.
    pub fn issue_refresh_token(&mut self, client_id: &str, scopes: Vec<String>) -> String {
        let token = random_secret();
        self.refresh.insert(
            token.clone(),
            RefreshToken {
                client_id: client_id.to_owned(),
                scopes,
            },
        );
        token
    }

    /// Decides who sent a request to an API endpoint; `None` means 401.
    fn authenticate(&mut self, call: &Call) -> Option<Access> {
        let authorization = call.header(header::AUTHORIZATION.as_str())?;
        let (scheme, credential) = authorization.trim().split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            // C# echoes `token_type` ("bearer") as the scheme, so the case must not matter.
            let token = credential.trim();
            if self.permanent.contains(token) {
                return Some(Access::Everything);
            }
            let access = self.access.get(token)?;
            if access.expires_at <= Instant::now() {
                self.access.remove(token);
                return None;
            }
            return Some(Access::Scopes(access.scopes.clone()));
        }
        if scheme.eq_ignore_ascii_case("oauth") {
            self.verify_oauth1(call, OAuth1Token::Access, signature::unix_now())?;
            return Some(Access::Everything);
        }
        None
    }

    /// Lets a request to an API endpoint through, or answers 401 (no valid credential) or
    /// 403 (the credential lacks `scope`).
    pub fn authorize(&mut self, call: &Call, scope: &str) -> Result<(), Rejection> {
        let access = self
            .authenticate(call)
            .ok_or_else(|| Rejection::from(wire::unauthorized()))?;
        if access.allows(scope) {
            Ok(())
        } else {
            Err(Rejection::from(wire::access_denied()))
        }
    }

    /// Checks an OAuth 1.0a signed request per RFC 5849: known consumer and token, the
    /// HMAC-SHA1 signature over the base string, a fresh timestamp and an unused nonce.
    pub fn verify_oauth1(
        &mut self,
        call: &Call,
        expected: OAuth1Token,
        now_unix: i64,
    ) -> Option<VerifiedOAuth1> {
        let header_parameters =
            signature::parse_authorization(call.header(header::AUTHORIZATION.as_str())?)?;
        let get = |name: &str| {
            header_parameters
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        let consumer_key = get("oauth_consumer_key")?;
        let signature = get("oauth_signature")?;
        let nonce = get("oauth_nonce").filter(|nonce| !nonce.is_empty())?;
        let timestamp: i64 = get("oauth_timestamp")?.parse().ok()?;
        if get("oauth_signature_method")? != "HMAC-SHA1" {
            return None;
        }
        if get("oauth_version").is_some_and(|version| version != "1.0") {
            return None;
        }
        if (now_unix - timestamp).abs() > signature::TIMESTAMP_TOLERANCE_SECS {
            return None;
        }
        let token = get("oauth_token").filter(|token| !token.is_empty());
        let consumer_secret = self.oauth1_consumers.get(consumer_key)?;
        let token_secret = match (expected, token) {
            (OAuth1Token::None, None) => "",
            (OAuth1Token::AuthorisedRequest, Some(token)) => {
                let request = self.oauth1_requests.get(token)?;
                if request.consumer_key != consumer_key || !request.authorised {
                    return None;
                }
                request.secret.as_str()
            }
            (OAuth1Token::Access, Some(token)) => {
                let (owner, secret) = self.oauth1_access.get(token)?;
                if owner != consumer_key {
                    return None;
                }
                secret.as_str()
            }
            _ => return None,
        };
        let host = call
            .header(header::HOST.as_str())
            .or_else(|| call.uri.authority().map(|authority| authority.as_str()))?;
        let base_string = signature::signature_base_string(
            call.method.as_str(),
            &signature::base_string_uri(host, call.path()),
            &signature::signed_parameters(call, &header_parameters),
        );
        if !signature::signature_matches(&base_string, consumer_secret, token_secret, signature) {
            return None;
        }
        // Only a correctly signed request may use up a nonce; otherwise anyone could
        // fill the log.
        let first_use = self.nonces.record(
            format!("{consumer_key}&{}&{timestamp}&{nonce}", token.unwrap_or("")),
            timestamp,
            now_unix,
        );
        first_use.then(|| VerifiedOAuth1 {
            consumer_key: consumer_key.to_owned(),
            token: token.map(str::to_owned),
        })
    }

    pub fn add_oauth1_request_token(&mut self, consumer_key: &str, token: &str, secret: &str) {
        self.oauth1_requests.insert(
            token.to_owned(),
            RequestToken {
                consumer_key: consumer_key.to_owned(),
                secret: secret.to_owned(),
                authorised: false,
            },
        );
    }

    /// Marks a request token authorised; false when it does not exist.
    pub fn authorise_oauth1_request_token(&mut self, token: &str) -> bool {
        match self.oauth1_requests.get_mut(token) {
            Some(request) => {
                request.authorised = true;
                true
            }
            None => false,
        }
    }

    pub fn consume_oauth1_request_token(&mut self, token: &str) {
        self.oauth1_requests.remove(token);
    }

    pub fn add_oauth1_access_token(&mut self, consumer_key: &str, token: &str, secret: &str) {
        self.oauth1_access.insert(
            token.to_owned(),
            (consumer_key.to_owned(), secret.to_owned()),
        );
    }
}

/// OAuth 1.0a nonces already used, each with its timestamp. A nonce only has to be
/// remembered while its timestamp is still acceptable, so old ones are swept out.
#[derive(Default)]
struct NonceLog {
    seen: HashMap<String, i64>,
    sweep_at_len: usize,
}

impl NonceLog {
    /// Records a nonce; false when it was already used.
    fn record(&mut self, key: String, timestamp: i64, now_unix: i64) -> bool {
        if self.seen.len() >= self.sweep_at_len.max(4096) {
            self.seen
                .retain(|_, seen| (now_unix - *seen).abs() <= signature::TIMESTAMP_TOLERANCE_SECS);
            // Sweeping again only after the log doubles keeps the cost amortised O(1).
            self.sweep_at_len = self.seen.len() * 2;
        }
        self.seen.insert(key, timestamp).is_none()
    }
}

/// A random opaque token or secret: 32 bytes, base64url without padding.
pub(super) fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

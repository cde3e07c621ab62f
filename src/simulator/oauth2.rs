//! The OAuth 2 endpoints of the simulated portal: `GET /v6/authentication/oauth2/auth`
//! (approves at once and redirects back with a code) and
//! `POST /v6/authentication/oauth2/token` (client credentials, authorization code with
//! PKCE, refresh token).
//!
//! Owns the grant rules, including what a request for a scope the app lacks gets
//! ([`ScopePolicy`]); the tokens themselves are stored by [`super::auth`]. Errors use
//! the OAuth 2 JSON shape `{"error", "error_description"}`: 401 for `invalid_client`,
//! 400 for everything else.

use std::time::Duration;

use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use sha2::Digest as _;
use tokio::time::Instant;

use super::auth::{random_secret, AuthCode, Credentials};
use super::faults;
use super::options::{Client, ScopePolicy};
use super::state::{lock, Shared};
use super::wire::{self, Call, Rejection};

/// How long an authorization code may wait before it is exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// The scope that makes the authorization-code grant issue a refresh token.
const OFFLINE_SCOPE: &str = "offline";

/// `GET /v6/authentication/oauth2/auth`: validates the app and its redirect URI, then
/// approves at once (no login page) with a 302 back to the app.
pub(super) fn authorize(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::GET {
        return wire::method_not_allowed();
    }
    let query = call.query_pairs();
    let param = |name: &str| wire::field(&query, name);
    let mut credentials = shared.credentials();
    let Some(client) = param("client_id").and_then(|id| credentials.clients.get(id).cloned())
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "The client_id is missing or unknown.",
        );
    };
    let Some(redirect_uri) =
        param("redirect_uri").filter(|uri| client.redirect_uris.iter().any(|known| known == uri))
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The redirect_uri is missing or not registered for this client.",
        );
    };
    let Ok(mut target) = url::Url::parse(redirect_uri) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The registered redirect_uri is not an absolute URL.",
        );
    };
    let state = param("state");
    let challenge = param("code_challenge");
    let refused = refused_scope(&client, param("scope"), shared.policy.scope_policy);
    let problem = if param("response_type") != Some("code") {
        Some((
            "unsupported_response_type",
            "Only response_type=code is supported.".to_owned(),
        ))
    } else if state.is_none() {
        Some((
            "invalid_request",
            "The state parameter is required.".to_owned(),
        ))
    } else if challenge.is_some() && param("code_challenge_method") != Some("S256") {
        Some((
            "invalid_request",
            "Only code_challenge_method=S256 is supported.".to_owned(),
        ))
    } else if challenge.is_none() && param("code_challenge_method").is_some() {
        Some((
            "invalid_request",
            "code_challenge_method was sent without a code_challenge.".to_owned(),
        ))
    } else {
        refused.map(|scope| ("invalid_scope", invalid_scope_description(scope)))
    };
    {
        let mut pairs = target.query_pairs_mut();
        match problem {
            Some((error, description)) => {
                pairs
                    .append_pair("error", error)
                    .append_pair("error_description", &description);
            }
            None => {
                let code = random_secret();
                let scopes = grant_scopes(&client, param("scope"));
                credentials.codes.insert(
                    code.clone(),
                    AuthCode {
                        client_id: client.client_id.clone(),
                        redirect_uri: redirect_uri.to_owned(),
                        scopes,
                        code_challenge: challenge.map(str::to_owned),
                        expires_at: Instant::now() + CODE_LIFETIME,
                    },
                );
                pairs.append_pair("code", &code);
            }
        }
        if let Some(state) = state {
            pairs.append_pair("state", state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

/// `POST /v6/authentication/oauth2/token`.
pub(super) fn token(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::POST {
        return wire::method_not_allowed();
    }
    if lock(&shared.faults).token_endpoint_down {
        return faults::server_error(StatusCode::SERVICE_UNAVAILABLE);
    }
    if !call.is_form() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded.",
        );
    }
    let form = call.form_pairs();
    let mut credentials = shared.credentials();
    let client = match authenticate_client(&credentials, call, &form) {
        Ok(client) => client,
        Err(rejection) => return rejection.into_response(),
    };
    let requested = wire::field(&form, "scope");
    let refused = refused_scope(&client, requested, shared.policy.scope_policy);
    let outcome = match (wire::field(&form, "grant_type"), refused) {
        // Checked before the grant itself, so a refused request uses up no code.
        (Some("client_credentials" | "authorization_code" | "refresh_token"), Some(scope)) => {
            Err(Rejection::from(invalid_scope(scope)))
        }
        (Some("client_credentials"), _) => Ok(Grant {
            scopes: grant_scopes(&client, requested),
            refresh_token: None,
        }),
        (Some("authorization_code"), _) => exchange_code(&mut credentials, &client, &form),
        (Some("refresh_token"), _) => refresh(
            &mut credentials,
            &client,
            &form,
            shared.policy.rotate_refresh_tokens,
        ),
        (Some(_), _) => Err(Rejection::from(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The grant_type is not supported.",
        ))),
        (None, _) => Err(Rejection::from(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The grant_type parameter is required.",
        ))),
    };
    let grant = match outcome {
        Ok(grant) => grant,
        Err(rejection) => return rejection.into_response(),
    };
    let lifetime = shared.policy.token_lifetime;
    let access_token = credentials.issue_access_token(grant.scopes.clone(), lifetime);
    drop(credentials);
    shared.meter().counters.tokens_issued += 1;
    let mut body = json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
        "scope": grant.scopes.join(" "),
    });
    if let Some(refresh_token) = grant.refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    let mut response = wire::json_value(StatusCode::OK, &body);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// What a successful grant hands out besides the access token.
struct Grant {
    scopes: Vec<String>,
    refresh_token: Option<String>,
}

/// Client authentication in the body (`client_id` + `client_secret`) or by HTTP Basic
/// (the JS SDK's way), but not both at once (RFC 6749 section 2.3).
fn authenticate_client(
    credentials: &Credentials,
    call: &Call,
    form: &[(String, String)],
) -> Result<Client, Rejection> {
    let basic = call
        .header(header::AUTHORIZATION.as_str())
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, encoded)| decode_basic(encoded.trim()));
    let body_id = wire::field(form, "client_id");
    let body_secret = wire::field(form, "client_secret");
    let (client_id, secret) = match basic {
        Some(None) => return Err(invalid_client("The Basic credentials are malformed.")),
        Some(Some(_)) if body_secret.is_some() => {
            return Err(Rejection::from(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The client authenticated with both HTTP Basic and client_secret; use one.",
            )))
        }
        Some(Some((id, _))) if body_id.is_some_and(|body_id| body_id != id) => {
            return Err(Rejection::from(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The client_id in the body differs from the one in HTTP Basic.",
            )))
        }
        Some(Some((id, secret))) => (id, secret),
        None => match (body_id, body_secret) {
            (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
            _ => return Err(invalid_client("Client authentication is missing.")),
        },
    };
    match credentials.clients.get(&client_id) {
        Some(client) if constant_time_eq(client.client_secret.as_bytes(), secret.as_bytes()) => {
            Ok(client.clone())
        }
        _ => Err(invalid_client("The client_id or client_secret is wrong.")),
    }
}

/// `base64(id:secret)`, each part form-urlencoded first as RFC 6749 section 2.3.1 says.
fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |part: &str| {
        url::form_urlencoded::parse(format!("v={part}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

fn exchange_code(
    credentials: &mut Credentials,
    client: &Client,
    form: &[(String, String)],
) -> Result<Grant, Rejection> {
    let Some(code) = wire::field(form, "code") else {
        return Err(Rejection::from(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The code parameter is required.",
        )));
    };
    // Removed before any check: a code is single-use even when the exchange fails.
    let Some(issued) = credentials.codes.remove(code) else {
        return Err(invalid_grant(
            "The authorization code is unknown or already used.",
        ));
    };
    if issued.client_id != client.client_id || issued.expires_at <= Instant::now() {
        return Err(invalid_grant(
            "The authorization code is expired or belongs to another client.",
        ));
    }
    if wire::field(form, "redirect_uri") != Some(issued.redirect_uri.as_str()) {
        return Err(invalid_grant(
            "The redirect_uri does not match the authorization request.",
        ));
    }
    let verifier = wire::field(form, "code_verifier");
    match (&issued.code_challenge, verifier) {
        (None, None) => {}
        (Some(challenge), Some(verifier)) if pkce_s256(verifier) == *challenge => {}
        (Some(_), _) => {
            return Err(invalid_grant(
                "The code_verifier is missing or does not match the code_challenge.",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid_grant(
                "A code_verifier was sent but the authorization request had no code_challenge.",
            ))
        }
    }
    let scopes = narrow_scopes(issued.scopes, wire::field(form, "scope"));
    let refresh_token = scopes
        .iter()
        .any(|scope| scope == OFFLINE_SCOPE)
        .then(|| credentials.issue_refresh_token(&client.client_id, scopes.clone()));
    Ok(Grant {
        scopes,
        refresh_token,
    })
}

fn refresh(
    credentials: &mut Credentials,
    client: &Client,
    form: &[(String, String)],
    rotate: bool,
) -> Result<Grant, Rejection> {
    let Some(token) = wire::field(form, "refresh_token") else {
        return Err(Rejection::from(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The refresh_token parameter is required.",
        )));
    };
    let Some(stored) = credentials.refresh.get(token) else {
        return Err(invalid_grant(
            "The refresh token is unknown, revoked or already rotated.",
        ));
    };
    if stored.client_id != client.client_id {
        return Err(invalid_grant(
            "The refresh token belongs to another client.",
        ));
    }
    let scopes = narrow_scopes(stored.scopes.clone(), wire::field(form, "scope"));
    let refresh_token = if rotate {
        let kept = stored.scopes.clone();
        credentials.refresh.remove(token);
        Some(credentials.issue_refresh_token(&client.client_id, kept))
    } else {
        // Bynder's documented behaviour: no new refresh token; keep using the old one.
        None
    };
    Ok(Grant {
        scopes,
        refresh_token,
    })
}

/// Under [`ScopePolicy::Refuse`], the first requested scope (space-separated) that the
/// app may not have; `None` when every one is allowed, when `scope` is absent, or under
/// [`ScopePolicy::Narrow`].
fn refused_scope<'a>(
    client: &Client,
    requested: Option<&'a str>,
    policy: ScopePolicy,
) -> Option<&'a str> {
    match policy {
        ScopePolicy::Narrow => None,
        ScopePolicy::Refuse => requested?
            .split_whitespace()
            .find(|scope| !client.scopes.iter().any(|known| known == scope)),
    }
}

/// Hydra's wording for a scope the client may not request.
fn invalid_scope_description(scope: &str) -> String {
    format!(
        "The requested scope is invalid, unknown, or malformed. The OAuth 2.0 Client is not \
         allowed to request scope '{scope}'."
    )
}

fn invalid_scope(scope: &str) -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_scope",
        &invalid_scope_description(scope),
    )
}

/// The app's scopes that were asked for (space-separated), or all of them when `scope`
/// is absent. Scopes the app may not have are left out, which under
/// [`ScopePolicy::Refuse`] only happens after [`refused_scope`] let them through, i.e.
/// never.
fn grant_scopes(client: &Client, requested: Option<&str>) -> Vec<String> {
    narrow_scopes(client.scopes.clone(), requested)
}

fn narrow_scopes(available: Vec<String>, requested: Option<&str>) -> Vec<String> {
    match requested {
        None => available,
        Some(requested) => {
            let mut granted: Vec<String> = Vec::new();
            for scope in requested.split_whitespace() {
                if available.iter().any(|known| known == scope)
                    && !granted.iter().any(|seen| seen == scope)
                {
                    granted.push(scope.to_owned());
                }
            }
            granted
        }
    }
}

/// `BASE64URL-NOPAD(SHA256(verifier))`, RFC 7636 section 4.2.
fn pkce_s256(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    wire::json_value(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn invalid_client(description: &str) -> Rejection {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"oauth2\""),
    );
    response.into()
}

fn invalid_grant(description: &str) -> Rejection {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn requested_scopes_are_narrowed_to_what_the_app_may_have() {
        let available = vec!["asset.usage:read".to_owned(), "offline".to_owned()];
        assert_eq!(
            narrow_scopes(available.clone(), Some("asset.usage:write offline offline")),
            vec!["offline".to_owned()]
        );
        assert_eq!(narrow_scopes(available.clone(), None), available);
    }

    #[test]
    fn refuse_names_the_first_scope_the_app_may_not_have() {
        let client = Client {
            client_id: "app".to_owned(),
            client_secret: "secret".to_owned(),
            scopes: vec!["asset.usage:read".to_owned()],
            redirect_uris: Vec::new(),
        };
        let asked = Some("asset.usage:read offline asset.usage:write");
        assert_eq!(
            refused_scope(&client, asked, ScopePolicy::Refuse),
            Some("offline")
        );
        assert_eq!(refused_scope(&client, asked, ScopePolicy::Narrow), None);
        assert_eq!(refused_scope(&client, None, ScopePolicy::Refuse), None);
        assert_eq!(
            refused_scope(&client, Some("asset.usage:read"), ScopePolicy::Refuse),
            None
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("my%20app:s3cr%2Bt");
        assert_eq!(
            decode_basic(&encoded),
            Some(("my app".to_owned(), "s3cr+t".to_owned()))
        );
        assert_eq!(decode_basic("%%%"), None);
    }
}

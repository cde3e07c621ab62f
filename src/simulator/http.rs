//! The simulated portal's front door: every request passes through [`dispatch`], which
//! counts it, applies the rate limit and the configured latency, routes it, and wraps
//! the usage endpoints in injected faults.
//!
//! Also owns the request view ([`Call`]) and the error answers every route shares. It
//! does not own any route's behaviour; those live in [`super::usage`], [`super::oauth2`]
//! and [`super::oauth1`].
//!
//! Routing is a plain `match` on the exact path rather than an axum router, because the
//! portal's quirks are all about exact paths: `/api/media/usage` redirects while
//! `/api/media/usage/sync` must not gain a slash, and unknown paths must still be counted.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::faults::{self, Fault};
use super::{lock, oauth1, oauth2, usage, Shared};

pub(super) const USAGE_PATH: &str = "/api/media/usage/";
pub(super) const SYNC_PATH: &str = "/api/media/usage/sync";
pub(super) const CURRENT_USER_PATH: &str = "/api/v4/currentUser/";
pub(super) const OAUTH2_AUTH_PATH: &str = "/v6/authentication/oauth2/auth";
pub(super) const OAUTH2_TOKEN_PATH: &str = "/v6/authentication/oauth2/token";
pub(super) const OAUTH1_REQUEST_TOKEN_PATH: &str = "/api/v4/oauth/request_token/";
pub(super) const OAUTH1_AUTHORISE_PATH: &str = "/api/v4/oauth/authorise/";
pub(super) const OAUTH1_ACCESS_TOKEN_PATH: &str = "/api/v4/oauth/access_token/";

/// Bodies above this are refused with 413. Generous, because the benchmarks may sync
/// very large batches in one request.
const MAX_BODY_BYTES: usize = 512 * 1024 * 1024;

/// One received request with its body read in full.
pub(super) struct Call {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The query string decoded as `application/x-www-form-urlencoded`; a bare key
    /// without `=` has an empty value.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        decode_pairs(self.uri.query().unwrap_or("").as_bytes())
    }

    /// Whether the body is declared `application/x-www-form-urlencoded`.
    pub fn is_form(&self) -> bool {
        self.header(header::CONTENT_TYPE.as_str())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media_type| {
                media_type
                    .trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
    }

    /// The body's form fields, or nothing when the body is not declared a form.
    pub fn form_pairs(&self) -> Vec<(String, String)> {
        if self.is_form() {
            decode_pairs(&self.body)
        } else {
            Vec::new()
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

fn decode_pairs(encoded: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(encoded)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

/// The first value of a field, treating an empty value as absent (the JS SDK sends
/// unset fields as bare keys, which must read as "not given").
pub(super) fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
        .filter(|value| !value.is_empty())
}

/// Receives every request on every path.
pub(super) async fn dispatch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let route = format!("{} {}", parts.method, parts.uri.path());
    let admitted = shared.meter().admit(&route, tokio::time::Instant::now());
    // Held across the latency delay so that concurrent token requests overlap visibly.
    let _token_request =
        (parts.uri.path() == OAUTH2_TOKEN_PATH).then(|| shared.enter_token_request());
    let response = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Err(_) => text(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large"),
        Ok(body) => {
            let call = Call {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
            };
            if !shared.pause(shared.policy.latency).await {
                faults::dropped_connection()
            } else if !admitted {
                text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
            } else {
                route_call(&shared, &call).await
            }
        }
    };
    shared.meter().record_status(response.status());
    tracing::debug!(%route, status = response.status().as_u16(), "simulated portal answered");
    response
}

async fn route_call(shared: &Shared, call: &Call) -> Response {
    match call.path() {
        USAGE_PATH => with_faults(shared, call, usage::usages).await,
        SYNC_PATH if !shared.policy.sync_endpoint => not_found(),
        SYNC_PATH => with_faults(shared, call, usage::sync).await,
        CURRENT_USER_PATH => with_faults(shared, call, usage::current_user).await,
        // Old v4 endpoints answered slash-less URLs with a 301; a client that follows it
        // on POST or DELETE usually turns the request into a GET, which then fails here.
        "/api/media/usage" | "/api/v4/currentUser" => redirect_with_slash(call),
        OAUTH2_AUTH_PATH => oauth2::authorize(shared, call),
        OAUTH2_TOKEN_PATH => oauth2::token(shared, call),
        OAUTH1_REQUEST_TOKEN_PATH => oauth1::request_token(shared, call),
        OAUTH1_AUTHORISE_PATH => oauth1::authorise(shared, call),
        OAUTH1_ACCESS_TOKEN_PATH => oauth1::access_token(shared, call),
        _ => not_found(),
    }
}

/// Runs a handler under whatever fault the dice pick for this request.
async fn with_faults(
    shared: &Shared,
    call: &Call,
    handler: fn(&Shared, &Call) -> Response,
) -> Response {
    let fault = faults::roll(&lock(&shared.faults));
    if fault.is_some() {
        shared.meter().counters.faults_injected += 1;
    }
    match fault {
        None => handler(shared, call),
        Some(Fault::ServerError(status)) => faults::server_error(status),
        Some(Fault::DropBefore) => faults::dropped_connection(),
        Some(Fault::DropAfter) => {
            let _ = handler(shared, call);
            faults::dropped_connection()
        }
        Some(Fault::Slow(delay)) => {
            let response = handler(shared, call);
            if shared.pause(delay).await {
                response
            } else {
                faults::dropped_connection()
            }
        }
    }
}

fn redirect_with_slash(call: &Call) -> Response {
    let mut location = format!("{}/", call.path());
    if let Some(query) = call.uri.query() {
        location.push('?');
        location.push_str(query);
    }
    let mut response = text(StatusCode::MOVED_PERMANENTLY, "Moved Permanently");
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// An answer that ends a handler early. Boxed, because a bare [`Response`] makes every
/// `Result` that carries one large.
pub(super) struct Rejection(Box<Response>);

impl From<Response> for Rejection {
    fn from(response: Response) -> Rejection {
        Rejection(Box::new(response))
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        *self.0
    }
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

pub(super) fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

pub(super) fn json_value(status: StatusCode, body: &serde_json::Value) -> Response {
    json_bytes(status, body.to_string().into_bytes())
}

/// The v4 API's answer to a missing, bad, expired or revoked credential.
pub(super) fn unauthorized() -> Response {
    text(StatusCode::UNAUTHORIZED, "Invalid or expired token.")
}

/// The v4 API's 403, used both for a missing scope and for a user without the
/// STATISTICS role (Bynder does not tell them apart either).
pub(super) fn access_denied() -> Response {
    json_value(
        StatusCode::FORBIDDEN,
        &json!({"message": "Access denied", "statuscode": 403}),
    )
}

/// A 400 keyed by each offending field, the shape the usage spec documents.
pub(super) fn field_errors(errors: &[(&str, &str)]) -> Response {
    let body: serde_json::Map<String, serde_json::Value> = errors
        .iter()
        .map(|(name, message)| ((*name).to_owned(), json!(message)))
        .collect();
    json_value(StatusCode::BAD_REQUEST, &serde_json::Value::Object(body))
}

pub(super) fn required(names: &[&'static str]) -> Response {
    let errors: Vec<(&str, &str)> = names
        .iter()
        .map(|name| (*name, "This field is required."))
        .collect();
    field_errors(&errors)
}

pub(super) fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Not Found")
}

pub(super) fn method_not_allowed() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

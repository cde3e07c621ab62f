//! The simulated portal's front door: every request passes through [`dispatch`], which
//! counts it, applies the rate limit and the configured latency, routes it, and wraps
//! the usage endpoints in injected faults.
//!
//! Also owns the paths the portal answers. It does not own any route's behaviour (those
//! live in [`super::usage`], [`super::oauth2`] and [`super::oauth1`]), nor the request
//! view and the shared answers, which are [`super::wire`].
//!
//! Routing is a plain `match` on the exact path rather than an axum router, because the
//! portal's quirks are all about exact paths: `/api/media/usage` redirects while
//! `/api/media/usage/sync` must not gain a slash, and unknown paths must still be counted.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::faults::{self, Fault};
use super::state::{lock, Shared};
use super::wire::{not_found, text, Call};
use super::{oauth1, oauth2, usage};

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

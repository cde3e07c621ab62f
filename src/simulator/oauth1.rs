//! Legacy OAuth 1.0a, server side: the three token endpoints under `/api/v4/oauth/`
//! (the request-token dance).
//!
//! Owns only the endpoints. The signature arithmetic is [`super::signature`]; which
//! consumers and tokens exist, and the check of a signed request against them, are
//! [`super::auth`]'s.

use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{random_secret, OAuth1Token};
use super::signature::unix_now;
use super::state::Shared;
use super::wire::{self, Call};

/// `POST /api/v4/oauth/request_token/`, signed with the consumer alone.
pub(super) fn request_token(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::POST {
        return wire::method_not_allowed();
    }
    let mut credentials = shared.credentials();
    let Some(verified) = credentials.verify_oauth1(call, OAuth1Token::None, unix_now()) else {
        return wire::unauthorized();
    };
    let (token, secret) = (random_secret(), random_secret());
    credentials.add_oauth1_request_token(&verified.consumer_key, &token, &secret);
    token_pair(&token, &secret)
}

/// `GET /api/v4/oauth/authorise/?oauth_token=..[&callback=..]`: the browser step, which
/// the simulator approves at once.
pub(super) fn authorise(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::GET {
        return wire::method_not_allowed();
    }
    let query = call.query_pairs();
    let Some(token) = wire::field(&query, "oauth_token") else {
        return wire::required(&["oauth_token"]);
    };
    if !shared.credentials().authorise_oauth1_request_token(token) {
        return wire::text(StatusCode::BAD_REQUEST, "Unknown or expired request token.");
    }
    match wire::field(&query, "callback") {
        Some(callback) => {
            let Ok(mut target) = url::Url::parse(callback) else {
                return wire::field_errors(&[("callback", "Enter a valid URL.")]);
            };
            target.query_pairs_mut().append_pair("oauth_token", token);
            (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
        }
        None => wire::text(StatusCode::OK, "The application is now authorised."),
    }
}

/// `POST /api/v4/oauth/access_token/`, signed with the consumer and an authorised request
/// token, which it trades for a lasting access token.
pub(super) fn access_token(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::POST {
        return wire::method_not_allowed();
    }
    let mut credentials = shared.credentials();
    let Some(verified) =
        credentials.verify_oauth1(call, OAuth1Token::AuthorisedRequest, unix_now())
    else {
        return wire::unauthorized();
    };
    if let Some(request_token) = &verified.token {
        credentials.consume_oauth1_request_token(request_token);
    }
    let (token, secret) = (random_secret(), random_secret());
    credentials.add_oauth1_access_token(&verified.consumer_key, &token, &secret);
    token_pair(&token, &secret)
}

fn token_pair(token: &str, secret: &str) -> Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("oauth_token", token)
        .append_pair("oauth_token_secret", secret)
        .finish();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
        body,
    )
        .into_response()
}

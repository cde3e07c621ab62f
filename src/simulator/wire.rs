//! The words every route of the simulated portal speaks: the request view ([`Call`]),
//! the field lookup the forms and queries share, and the plain and error answers
//! (401, 403, 404, 405, the 400 keyed by field) that several routes send alike.
//!
//! Owns only this vocabulary. It does not route, authenticate or keep any state: the
//! front door is [`super::http`], and each route's behaviour lives in its own module.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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

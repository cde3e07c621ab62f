//! The HTTP transport of the authentication endpoints (the OAuth 2 token endpoint and the
//! OAuth 1.0a handshake): the same timeouts, TLS roots and user agent as the API client, never
//! following a redirect, and passing the process-wide [`Gate`] first, because Bynder's rate
//! limit counts these requests too.
//!
//! It also adapts the transport to the `oauth2` crate ([`AsyncHttpClient`]). That crate turns any
//! non-200 answer into "could not parse the error body" unless the body is an OAuth 2 error
//! object, which would lose the status; so an answer that is neither a 200 nor an OAuth 2 error
//! becomes a [`TransportError::Status`] here, and the caller can tell a 503 from a rejection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};
use reqwest::StatusCode;
use tracing::Instrument as _;

use crate::body::{self, CappedError, TooLarge};
use crate::config::BynderSettings;
use crate::gate::Gate;
use crate::telemetry::RequestOutcome;

use super::AuthError;

/// Why an authentication request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{url} did not answer in time")]
    Timeout { url: String },
    #[error("the connection to {url} broke: {detail}")]
    Broken { url: String, detail: String },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("the request could not be built: {0}")]
    Build(String),
    /// The answer went on past `bynder.max_response_size`; the rest was not read.
    #[error("{url}: {too_large}")]
    TooLarge { url: String, too_large: TooLarge },
}

/// A received answer: a 200 read in full (up to `bynder.max_response_size`), any other
/// status only as far as an error message needs.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// The gated HTTP client for authentication requests.
pub(crate) struct Transport {
    http: reqwest::Client,
    gate: Arc<Gate>,
    max_response_bytes: u64,
}

impl Transport {
    pub fn new(settings: &BynderSettings, gate: Arc<Gate>) -> Result<Transport, AuthError> {
        let http = crate::gate::http_client(settings).map_err(AuthError::Setup)?;
        Ok(Transport {
            http,
            gate,
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// Sends one request through the gate and reads the answer, whatever its status: a 200
    /// whole up to `bynder.max_response_size`, anything else only its start (an OAuth 2 error
    /// object is small). A 429 starts the process-wide pause, as it does for API requests.
    pub async fn execute(&self, request: reqwest::Request) -> Result<Answer, TransportError> {
        self.gate.pass().await;
        // Method, host and path only: the form body holds the client secret, a code or a
        // refresh token, the headers may hold HTTP Basic credentials, and an OAuth 1.0a query
        // its signature.
        let span = crate::telemetry::request_span(
            crate::telemetry::Endpoint::Auth,
            request.method(),
            request.url(),
        );
        let result = self.exchange(request).instrument(span.clone()).await;
        crate::telemetry::record_outcome(
            &span,
            match &result {
                Ok(answer) => RequestOutcome::Answered(answer.status),
                Err(TransportError::Connect { .. }) => RequestOutcome::ConnectFailed,
                Err(TransportError::Timeout { .. }) => RequestOutcome::TimedOut,
                Err(TransportError::TooLarge { .. }) => RequestOutcome::TooLarge,
                Err(TransportError::Status { status, .. }) => RequestOutcome::Answered(*status),
                Err(TransportError::Broken { .. } | TransportError::Build(_)) => {
                    RequestOutcome::Broken
                }
            },
        );
        result
    }

    /// Sends one request and reads its answer (see [`Transport::execute`]).
    async fn exchange(&self, request: reqwest::Request) -> Result<Answer, TransportError> {
        let mut shown = request.url().clone();
        shown.set_query(None);
        let shown = shown.to_string();
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                TransportError::Timeout { url: shown.clone() }
            } else if e.is_connect() {
                let detail = innermost(&e);
                TransportError::Connect {
                    url: shown.clone(),
                    detail: crate::gate::describe_certificate_error(&detail).unwrap_or(detail),
                }
            } else {
                TransportError::Broken {
                    url: shown.clone(),
                    detail: innermost(&e),
                }
            }
        };
        let mut response = self.http.execute(request).await.map_err(classify)?;
        let status = response.status();
        crate::telemetry::record_status(status);
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.gate.pause();
        }
        let headers = response.headers().clone();
        let body = if status == StatusCode::OK {
            body::read_capped(response, self.max_response_bytes)
                .await
                .map_err(|e| match e {
                    CappedError::TooLarge(too_large) => TransportError::TooLarge {
                        url: shown.clone(),
                        too_large,
                    },
                    CappedError::Read(e) => classify(e),
                })?
        } else {
            body::read_prefix(&mut response, body::SNIPPET_READ_LIMIT)
                .await
                .map_err(classify)?
                .bytes
        };
        tracing::debug!(url = %shown, status = status.as_u16(), "authentication request");
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Like [`Transport::execute`], but any status other than 200 is an error.
    pub async fn execute_ok(&self, request: reqwest::Request) -> Result<Answer, TransportError> {
        let url = request.url().clone();
        let answer = self.execute(request).await?;
        if answer.status != StatusCode::OK {
            let mut shown = url;
            shown.set_query(None);
            return Err(TransportError::Status {
                url: shown.to_string(),
                status: answer.status,
                body: snippet(&answer.body),
            });
        }
        Ok(answer)
    }
}

impl<'c> AsyncHttpClient<'c> for Transport {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let mut request = reqwest::Request::try_from(request)
                .map_err(|e| TransportError::Build(e.to_string()))?;
            // HTTP Basic client authentication carries the client secret: keep it out of any
            // header dump, as the API client does for its bearer token.
            if let Some(value) = request
                .headers_mut()
                .get_mut(reqwest::header::AUTHORIZATION)
            {
                value.set_sensitive(true);
            }
            let url = request.url().clone();
            let answer = self.execute(request).await?;
            if answer.status != StatusCode::OK && !is_oauth2_error(&answer.body) {
                return Err(TransportError::Status {
                    url: url.to_string(),
                    status: answer.status,
                    body: snippet(&answer.body),
                });
            }
            let mut builder = oauth2::http::Response::builder().status(answer.status.as_u16());
            for (name, value) in &answer.headers {
                builder = builder.header(name.as_str(), value.as_bytes());
            }
            builder
                .body(answer.body)
                .map_err(|e| TransportError::Build(e.to_string()))
        })
    }
}

/// Whether a body is an OAuth 2 error object (`{"error": "...", ...}`, RFC 6749 section 5.2).
fn is_oauth2_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(|e| e.is_string()))
}

/// The innermost cause of a reqwest error ("connection refused" rather than "error sending
/// request").
fn innermost(error: &reqwest::Error) -> String {
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    detail
}

/// The start of a body, for messages (error pages can be whole HTML documents).
pub(crate) fn snippet(body: &[u8]) -> String {
    body::snippet(body, true, 200)
}

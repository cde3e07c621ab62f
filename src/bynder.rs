//! The Bynder HTTP client: one method per asset-usage endpoint, wire types private beside it.
//!
//! Follows `bynder-api-reference.md`: GET and DELETE take the query string, create takes a
//! form-urlencoded body, paths keep their exact trailing slashes, redirects are never followed
//! (a redirected POST or DELETE would silently turn into a GET). Every request passes the shared
//! [`Gate`] first, so the whole process stays under Bynder's per-IP rate limit. Errors say how the
//! caller should react ([`Reaction`]); this module never retries on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tracing::Instrument as _;
use url::Url;

use crate::auth::{AuthError, AuthFailure, Credentials};
use crate::body::{self, CappedError, TooLarge};
use crate::config::Config;
use crate::gate::{describe_certificate_error, Gate};
use crate::model::{AssetId, SyncUsage, UsageUri};
use crate::telemetry::{self, RequestOutcome};

const USAGE_PATH: &str = "/api/media/usage/";
const SYNC_PATH: &str = "/api/media/usage/sync";
const CURRENT_USER_PATH: &str = "/api/v4/currentUser/";

/// A usage as Bynder reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub id: String,
    pub asset_id: String,
    pub uri: String,
    pub additional: String,
    /// The integration the usage belongs to, when Bynder says.
    pub integration_id: Option<String>,
}

/// Bynder's answer to a sync request. Missing arrays count as empty.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SyncResult {
    pub accepted: Vec<SyncKey>,
    #[serde(rename = "new")]
    pub created: Vec<SyncCreated>,
    pub rejected: Vec<SyncRejected>,
    pub removed: Vec<SyncKey>,
}

/// What a successful (2xx) sync request answered.
#[derive(Debug, Clone)]
pub enum SyncAnswer {
    /// The documented answer: what was created, accepted, rejected and removed.
    Full(SyncResult),
    /// Nothing that confirms anything (204, `{}`, `[]`, a gateway's page…): what it was. The
    /// changes may or may not have been applied; only a read-back can tell.
    Unconfirmed(String),
}

/// Reads a 2xx sync answer. Missing arrays count as empty, but an answer with none of the four
/// is no sync result: Bynder's answer shape is documented only in its OpenAPI spec, and a portal
/// (or a gateway in front of it) may answer 204, `{}` or `[]`.
fn read_sync_answer(status: StatusCode, body: &str) -> SyncAnswer {
    if body.trim().is_empty() {
        return SyncAnswer::Unconfirmed(format!("{status} with no body"));
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return SyncAnswer::Unconfirmed(format!("{status} with a body that is not JSON"));
    };
    let known = ["accepted", "new", "rejected", "removed"];
    if !value
        .as_object()
        .is_some_and(|o| known.iter().any(|k| o.contains_key(*k)))
    {
        return SyncAnswer::Unconfirmed(format!(
            "{status} with {}",
            match &value {
                serde_json::Value::Object(o) if o.is_empty() => "an empty object".to_owned(),
                serde_json::Value::Array(a) if a.is_empty() => "an empty array".to_owned(),
                _ => format!("an unknown answer: {}", snippet(body)),
            }
        ));
    }
    match serde_json::from_value(value) {
        Ok(result) => SyncAnswer::Full(result),
        Err(e) => SyncAnswer::Unconfirmed(format!("{status} with an unreadable sync result ({e})")),
    }
}

/// An (asset, uri) pair in a sync answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SyncKey {
    pub asset_id: String,
    pub uri: String,
}

/// A usage the sync created.
#[derive(Debug, Clone, Deserialize)]
pub struct SyncCreated {
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub asset_id: String,
    #[serde(default)]
    pub uri: String,
}

/// An entry the sync refused, with Bynder's reason.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SyncRejected {
    pub asset_id: String,
    pub uri: String,
    pub reason: String,
}

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made: nothing reached Bynder.
    #[error("cannot connect to the portal at {url}: {detail}. Fix: check bynder.base_url and the network (proxy, DNS, firewall)")]
    Connect { url: String, detail: String },
    /// The request may have reached Bynder; the answer did not come in time.
    #[error("the portal did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke after the request was sent: it may have been applied.
    #[error("the connection to the portal broke: {0}")]
    Transport(String),
    /// Bynder answered with an error status.
    #[error("the portal answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    /// Bynder answered with a redirect, which is never followed.
    #[error("the portal answered {status} redirecting to {location}; check bynder.base_url (use the portal's canonical https URL)")]
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// A success status with a body that is not what the API documents.
    #[error("the portal's answer could not be understood: {0}")]
    Decode(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The answer went on past `bynder.max_response_size`; the rest was not read.
    #[error("{0}")]
    TooLarge(TooLarge),
}

/// How the caller should react to an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Try again later. `maybe_applied`: Bynder may have carried the request out.
    Retry { maybe_applied: bool },
    /// Bynder's rate limit blocks this IP: stop all sending for the block pause.
    PauseAll,
    /// The credentials were rejected.
    CredentialsRejected,
    /// Sending the same request again cannot succeed.
    GiveUp,
    /// No request can succeed until the setup is fixed (an untrusted TLS certificate): stop the
    /// run, keep every operation queued.
    Fatal,
}

impl Error {
    pub fn reaction(&self) -> Reaction {
        match self {
            Error::Connect { .. } => Reaction::Retry {
                maybe_applied: false,
            },
            // An oversized answer is most likely a broken gateway or proxy that may recover;
            // the request itself did arrive.
            Error::Timeout(_) | Error::Transport(_) | Error::Decode(_) | Error::TooLarge(_) => {
                Reaction::Retry {
                    maybe_applied: true,
                }
            }
            Error::Status { status, .. } => match status.as_u16() {
                401 => Reaction::CredentialsRejected,
                429 => Reaction::PauseAll,
                408 => Reaction::Retry {
                    maybe_applied: true,
                },
                s if s >= 500 => Reaction::Retry {
                    maybe_applied: true,
                },
                _ => Reaction::GiveUp,
            },
            // Nothing reached the API: a token endpoint that is down or slow is a transient
            // failure, a refused client or refresh token stops the run like a 401.
            Error::Auth(e) => match e.failure() {
                AuthFailure::Transient => Reaction::Retry {
                    maybe_applied: false,
                },
                AuthFailure::RateLimited => Reaction::PauseAll,
                AuthFailure::Rejected => Reaction::CredentialsRejected,
            },
            Error::Redirect { .. } => Reaction::GiveUp,
            Error::Tls(_) => Reaction::Fatal,
        }
    }

    /// The HTTP status Bynder answered with, if any.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The Bynder client for one portal and one integration.
pub struct Client {
    http: reqwest::Client,
    base_url: Url,
    integration_id: String,
    credentials: Credentials,
    gate: Arc<Gate>,
    timeout: Duration,
    /// `bynder.max_response_size`: no answer is read past it.
    max_response_bytes: u64,
    requests: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url.as_str())
            .field("integration_id", &self.integration_id)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct WireUsage {
    id: serde_json::Value,
    asset_id: Option<String>,
    uri: Option<String>,
    additional: Option<String>,
    integration: Option<WireIntegration>,
}

#[derive(Deserialize)]
struct WireIntegration {
    id: Option<String>,
}

impl WireUsage {
    fn into_usage(self) -> Usage {
        Usage {
            id: match self.id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            },
            asset_id: self.asset_id.unwrap_or_default(),
            uri: self.uri.unwrap_or_default(),
            additional: self.additional.unwrap_or_default(),
            integration_id: self.integration.and_then(|i| i.id),
        }
    }
}

impl Client {
    /// Builds the client: one connection pool, timeouts, rustls with an optional extra root.
    pub fn new(config: &Config, credentials: Credentials, gate: Arc<Gate>) -> Result<Self, Error> {
        let http = crate::gate::http_client(&config.bynder).map_err(Error::Tls)?;
        Ok(Client {
            http,
            base_url: config.bynder.base_url.clone(),
            integration_id: config.bynder.integration_id.clone(),
            credentials,
            gate,
            timeout: config.bynder.timeout,
            max_response_bytes: config.bynder.max_response_bytes,
            requests: AtomicU64::new(0),
        })
    }

    pub fn integration_id(&self) -> &str {
        &self.integration_id
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// How many requests this client has sent.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.base_url.clone();
        url.set_path(path);
        url
    }

    /// Sends one request through the gate, authorized, and returns status and body. A 401 lets
    /// the credentials renew once and the request is sent once more; a second 401 is final.
    async fn send(&self, request: reqwest::Request) -> Result<(StatusCode, String), Error> {
        let retry = request.try_clone();
        match self.send_once(request).await {
            Err(Error::Status {
                status: StatusCode::UNAUTHORIZED,
                body,
            }) => match retry {
                Some(again) if self.credentials.renew_after_rejection().await? => {
                    self.send_once(again).await
                }
                _ => Err(Error::Status {
                    status: StatusCode::UNAUTHORIZED,
                    body,
                }),
            },
            other => other,
        }
    }

    async fn send_once(
        &self,
        mut request: reqwest::Request,
    ) -> Result<(StatusCode, String), Error> {
        self.gate.pass().await;
        self.credentials.authorize(&mut request).await?;
        // The span covers the exchange only: not the wait at the gate, not a token request.
        let span =
            telemetry::request_span(telemetry::Endpoint::Api, request.method(), request.url());
        let result = self.exchange(request).instrument(span.clone()).await;
        telemetry::record_outcome(&span, request_outcome(result.as_ref().map(|(s, _)| *s)));
        result
    }

    /// Sends an authorized request and reads its answer.
    async fn exchange(&self, request: reqwest::Request) -> Result<(StatusCode, String), Error> {
        let url = request.url().clone();
        let method = request.method().clone();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let response = self.http.execute(request).await.map_err(|e| {
            metrics::counter!("bynder_usage_sync_requests_total", "method" => method.to_string(), "status" => "error")
                .increment(1);
            self.classify(e, &url)
        })?;
        let status = response.status();
        telemetry::record_status(status);
        metrics::histogram!("bynder_usage_sync_request_duration_seconds", "method" => method.to_string())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("bynder_usage_sync_requests_total", "method" => method.to_string(), "status" => status.as_u16().to_string())
            .increment(1);
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            return Err(Error::Redirect { status, location });
        }
        tracing::debug!(%method, path = url.path(), status = status.as_u16(), "bynder request");
        if status == StatusCode::TOO_MANY_REQUESTS {
            metrics::counter!("bynder_usage_sync_rate_limited_total").increment(1);
            self.gate.pause();
        }
        if !status.is_success() {
            // Only the start of an error page is shown, so only the start is read.
            let mut response = response;
            return Err(Error::Status {
                status,
                body: body::read_snippet(&mut response, SNIPPET_CHARS).await,
            });
        }
        let bytes = self.read_body(response, &url).await?;
        let body = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Ok((status, body))
    }

    /// Reads a whole answer, up to `bynder.max_response_size`.
    async fn read_body(&self, response: reqwest::Response, url: &Url) -> Result<Vec<u8>, Error> {
        body::read_capped(response, self.max_response_bytes)
            .await
            .map_err(|e| match e {
                CappedError::TooLarge(too_large) => Error::TooLarge(too_large),
                CappedError::Read(e) => self.classify(e, url),
            })
    }

    fn classify(&self, error: reqwest::Error, url: &Url) -> Error {
        if error.is_timeout() {
            Error::Timeout(self.timeout)
        } else if error.is_connect() {
            let mut detail = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(s) = source {
                detail = s.to_string();
                source = s.source();
            }
            let mut shown = url.clone();
            shown.set_query(None);
            shown.set_path("");
            if let Some(problem) = describe_certificate_error(&detail) {
                // Retrying cannot help and the network is fine: say what to fix.
                return Error::Tls(problem);
            }
            Error::Connect {
                url: shown.to_string(),
                detail,
            }
        } else {
            Error::Transport(error.to_string())
        }
    }

    /// `GET /api/media/usage/?asset_id=…&integration_id=…`: every usage of one asset for our
    /// integration (Bynder needs the asset id; it cannot list a whole integration).
    #[tracing::instrument(skip_all, fields(asset_id), err(level = "debug"))]
    pub async fn list_usages(&self, asset_id: &AssetId) -> Result<Vec<Usage>, Error> {
        self.list_usages_where(Some(asset_id.as_str()), None).await
    }

    /// `GET /api/media/usage/` narrowed by any of asset id and uri, always by our integration.
    /// Whether Bynder answers without `asset_id` is unknown (`probe` finds out); the daemon
    /// itself always names the asset.
    pub async fn list_usages_where(
        &self,
        asset_id: Option<&str>,
        uri: Option<&str>,
    ) -> Result<Vec<Usage>, Error> {
        let mut url = self.url(USAGE_PATH);
        {
            let mut query = url.query_pairs_mut();
            if let Some(asset_id) = asset_id {
                query.append_pair("asset_id", asset_id);
            }
            query.append_pair("integration_id", &self.integration_id);
            if let Some(uri) = uri {
                query.append_pair("uri", uri);
            }
        }
        let (_, body) = self.send(reqwest::Request::new(Method::GET, url)).await?;
        let wire: Vec<WireUsage> = serde_json::from_str(&body)
            .map_err(|e| Error::Decode(format!("usage list: {e}: {}", snippet(&body))))?;
        // Defensive: keep only our integration's usages even if the portal ignored the filter.
        Ok(wire
            .into_iter()
            .map(WireUsage::into_usage)
            .filter(|u| {
                u.integration_id
                    .as_deref()
                    .is_none_or(|id| id == self.integration_id)
            })
            .collect())
    }

    /// `POST /api/media/usage/` (form-urlencoded): records one usage and returns it.
    #[tracing::instrument(skip_all, fields(asset_id, uri), err(level = "debug"))]
    pub async fn create_usage(
        &self,
        asset_id: &AssetId,
        uri: &UsageUri,
        additional: &str,
    ) -> Result<Usage, Error> {
        let timestamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("integration_id", &self.integration_id)
                .append_pair("asset_id", asset_id.as_str())
                .append_pair("uri", uri.as_str())
                .append_pair("timestamp", &timestamp);
            if !additional.is_empty() {
                form.append_pair("additional", additional);
            }
            form.finish()
        };
        let mut request = reqwest::Request::new(Method::POST, self.url(USAGE_PATH));
        request.headers_mut().insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        *request.body_mut() = Some(body.into());
        let (_, body) = self.send(request).await?;
        let wire: WireUsage = serde_json::from_str(&body)
            .map_err(|e| Error::Decode(format!("created usage: {e}: {}", snippet(&body))))?;
        Ok(wire.into_usage())
    }

    /// `DELETE /api/media/usage/?integration_id=…&asset_id=…&uri=…`: removes our usages of one asset
    /// on one uri. The uri is required by the signature on purpose, and a [`UsageUri`] is never
    /// empty: without it Bynder removes the asset's usages of every installation that shares the
    /// integration id. A 404 means already gone.
    #[tracing::instrument(skip_all, fields(asset_id, uri), err(level = "debug"))]
    pub async fn delete_usage(&self, asset_id: &AssetId, uri: &UsageUri) -> Result<(), Error> {
        let mut url = self.url(USAGE_PATH);
        url.query_pairs_mut()
            .append_pair("integration_id", &self.integration_id)
            .append_pair("asset_id", asset_id.as_str())
            .append_pair("uri", uri.as_str());
        match self.send(reqwest::Request::new(Method::DELETE, url)).await {
            Ok(_) => Ok(()),
            Err(Error::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST /api/media/usage/sync` (JSON): for every listed uri, Bynder makes the integration's
    /// usages on it equal to the listed usages with that uri — creating, updating and deleting in
    /// one request. A uri with no usage left must still be listed, or its old usages stay.
    #[tracing::instrument(skip_all, fields(uris = uris.len(), usages = usages.len()), err(level = "debug"))]
    pub async fn sync_usages(
        &self,
        uris: &[String],
        usages: &[SyncUsage],
    ) -> Result<SyncAnswer, Error> {
        let body = serde_json::json!({
            "integration_id": self.integration_id,
            "uris": uris,
            "usages": usages,
        });
        let mut request = reqwest::Request::new(Method::POST, self.url(SYNC_PATH));
        request.headers_mut().insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json; charset=utf-8"),
        );
        *request.body_mut() = Some(body.to_string().into());
        let (status, body) = self.send(request).await?;
        Ok(read_sync_answer(status, &body))
    }

    /// `GET /api/v4/currentUser/`: who the credentials act as.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub async fn current_user(&self) -> Result<serde_json::Value, Error> {
        let (_, body) = self
            .send(reqwest::Request::new(
                Method::GET,
                self.url(CURRENT_USER_PATH),
            ))
            .await?;
        serde_json::from_str(&body)
            .map_err(|e| Error::Decode(format!("current user: {e}: {}", snippet(&body))))
    }

    /// Any authenticated request to a path of the portal (`raw`): the answer is returned
    /// whatever its status, with the headers as sent and received. Like every request it
    /// passes the gate, a 401 lets the credentials renew once and the request is sent once
    /// more, and redirects are not followed. `path_and_query` must start with `/`: the
    /// credentials never go to another origin. In the returned request headers the
    /// credentials are replaced by `[redacted]`.
    #[tracing::instrument(skip_all, fields(%method), err(level = "debug"))]
    pub async fn raw(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<RawResponse, Error> {
        if !path_and_query.starts_with('/') || path_and_query.starts_with("//") {
            return Err(Error::Decode(format!(
                "`{path_and_query}` is not a path on the portal: give it relative to bynder.base_url, starting with /"
            )));
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.url(path);
        url.set_query(query.filter(|q| !q.is_empty()));
        let mut request = reqwest::Request::new(method, url);
        if let Some((content_type, bytes)) = body {
            request.headers_mut().insert(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static(content_type),
            );
            *request.body_mut() = Some(bytes.into());
        }
        let retry = request.try_clone();
        let first = self.raw_once(request).await?;
        if first.status != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        match retry {
            Some(again) if self.credentials.renew_after_rejection().await? => {
                self.raw_once(again).await
            }
            _ => Ok(first),
        }
    }

    async fn raw_once(&self, mut request: reqwest::Request) -> Result<RawResponse, Error> {
        self.gate.pass().await;
        self.credentials.authorize(&mut request).await?;
        let mut request_headers = request.headers().clone();
        for name in [
            reqwest::header::AUTHORIZATION,
            reqwest::header::PROXY_AUTHORIZATION,
            reqwest::header::COOKIE,
        ] {
            if request_headers.contains_key(&name) {
                request_headers.insert(
                    name,
                    reqwest::header::HeaderValue::from_static("[redacted]"),
                );
            }
        }
        let url = request.url().clone();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let span = telemetry::request_span(telemetry::Endpoint::Api, request.method(), &url);
        let exchange = async {
            let response = self
                .http
                .execute(request)
                .await
                .map_err(|e| self.classify(e, &url))?;
            let status = response.status();
            telemetry::record_status(status);
            if status == StatusCode::TOO_MANY_REQUESTS {
                self.gate.pause();
            }
            let headers = response.headers().clone();
            let body = self.read_body(response, &url).await?;
            Ok((status, headers, body))
        };
        let result = exchange.instrument(span.clone()).await;
        telemetry::record_outcome(
            &span,
            request_outcome(result.as_ref().map(|(status, _, _)| *status)),
        );
        let (status, headers, body) = result?;
        Ok(RawResponse {
            url,
            status,
            request_headers,
            headers,
            body,
        })
    }
}

/// How a request ended, for its span.
fn request_outcome(result: Result<StatusCode, &Error>) -> RequestOutcome {
    match result {
        Ok(status) => RequestOutcome::Answered(status),
        Err(Error::Status { status, .. } | Error::Redirect { status, .. }) => {
            RequestOutcome::Answered(*status)
        }
        Err(Error::Connect { .. }) => RequestOutcome::ConnectFailed,
        Err(Error::Timeout(_)) => RequestOutcome::TimedOut,
        Err(Error::TooLarge(_)) => RequestOutcome::TooLarge,
        Err(Error::Tls(_)) => RequestOutcome::Untrusted,
        Err(Error::Transport(_) | Error::Decode(_) | Error::Auth(_)) => RequestOutcome::Broken,
    }
}

/// The answer to [`Client::raw`], whatever its status.
#[derive(Debug)]
pub struct RawResponse {
    pub url: Url,
    pub status: StatusCode,
    /// The request's headers as sent, credentials redacted.
    pub request_headers: reqwest::header::HeaderMap,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// How much of an answer an error message shows (bodies can be whole HTML pages).
const SNIPPET_CHARS: usize = 300;

/// The start of a response body, for error messages.
fn snippet(body: &str) -> String {
    body::snippet(body.as_bytes(), true, SNIPPET_CHARS)
}

#[cfg(test)]
mod tests;

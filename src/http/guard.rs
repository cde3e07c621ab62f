//! Who may be answered: the `Host` check that keeps the status page out of reach of DNS
//! rebinding, and the optional bearer token (`server.token_file`) for a server bound beyond
//! loopback.
//!
//! A web page on another site cannot read our answers, unless its own name resolves to us: then
//! the browser sends that name as `Host`. So only names we know are answered: loopback names,
//! `server.allowed_hosts`, and IP addresses (rebinding needs a name, and probes from container
//! engines and orchestrators ask by address).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::config::ServerSettings;

/// Paths answered without the token: liveness and readiness probes rarely carry credentials,
/// and they say nothing a caller could use.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// What a request must satisfy.
#[derive(Clone)]
pub struct Guard {
    allowed_hosts: Arc<Vec<String>>,
    token: Option<SecretString>,
}

impl Guard {
    pub fn new(settings: &ServerSettings) -> Self {
        Guard {
            allowed_hosts: Arc::new(
                settings
                    .allowed_hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            ),
            token: settings.token.clone(),
        }
    }

    /// Whether a request naming `host` (the `Host` header as sent) is answered.
    fn allows_host(&self, host: &str) -> bool {
        let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        name == "localhost" || name.ends_with(".localhost") || self.allowed_hosts.contains(&name)
    }

    /// Whether `authorization` (the header as sent) carries the configured token; true when no
    /// token is configured.
    fn allows_token(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(presented) = authorization.and_then(|v| v.to_str().ok()).and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        }) else {
            return false;
        };
        bool::from(
            presented
                .trim()
                .as_bytes()
                .ct_eq(token.expose_secret().as_bytes()),
        )
    }
}

/// The host part of a `Host` header: without the port, an IPv6 literal without its brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The middleware: 421 for a host not answered, 401 without the token.
pub async fn check(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    // HTTP/1.1 requires Host and every browser sends it; a request without one is no browser's.
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    if let Some(host) = host {
        if !guard.allows_host(host) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this host name is not answered here: add it to server.allowed_hosts, or ask by \
                 IP address or localhost\n",
            )
                .into_response();
        }
    }
    if !OPEN_PATHS.contains(&request.uri().path())
        && !guard.allows_token(request.headers().get(header::AUTHORIZATION))
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this server requires \"Authorization: Bearer <token>\" with the token in \
             server.token_file\n",
        )
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(allowed: &[&str], token: Option<&str>) -> Guard {
        Guard {
            allowed_hosts: Arc::new(allowed.iter().map(|h| h.to_string()).collect()),
            token: token.map(|t| SecretString::from(t.to_owned())),
        }
    }

    #[test]
    fn loopback_names_addresses_and_allowed_hosts_are_answered() {
        let g = guard(&["sync.internal.example"], None);
        for host in [
            "localhost",
            "localhost:9464",
            "LOCALHOST.:9464",
            "app.localhost",
            "127.0.0.1:9464",
            "10.1.2.3",
            "[::1]:9464",
            "[fe80::1]",
            "sync.internal.example:9464",
            "Sync.Internal.Example",
        ] {
            assert!(g.allows_host(host), "{host}");
        }
    }

    /// REGRESSION: the endpoints answered any Host header, so a page whose name was rebound to
    /// 127.0.0.1 could read the status page from a browser.
    #[test]
    fn a_name_that_is_not_ours_is_refused() {
        let g = guard(&["sync.internal.example"], None);
        for host in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "sync.internal.example.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!g.allows_host(host), "{host}");
        }
    }

    #[test]
    fn the_token_must_match_exactly() {
        let g = guard(&[], Some("s3cret"));
        let header = |v: &str| HeaderValue::from_str(v).expect("header");
        assert!(g.allows_token(Some(&header("Bearer s3cret"))));
        assert!(!g.allows_token(Some(&header("Bearer s3cre"))));
        assert!(!g.allows_token(Some(&header("Bearer s3cret2"))));
        assert!(!g.allows_token(Some(&header("Basic s3cret"))));
        assert!(!g.allows_token(None));
        assert!(guard(&[], None).allows_token(None));
    }
}

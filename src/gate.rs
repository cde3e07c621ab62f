//! What every request to the portal shares: the process-wide [`Gate`] (one token bucket and one
//! 429 pause, because Bynder's rate limit is per IP) and the one way the HTTP client is built
//! (rustls, the extra CA, timeouts, no redirects), used by the usage client and the token
//! transport alike, with what a failure on the portal's certificate means for the operator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::time::Instant;

use crate::config::BynderSettings;

/// The HTTP client for the portal: rustls only, `bynder.ca_file` trusted besides the system
/// roots, `bynder.timeout` and `bynder.connect_timeout`, and no redirect ever followed (a
/// redirected POST would become a GET, and a redirect could carry credentials to another origin).
/// The error names what is wrong with the certificate file.
pub fn http_client(settings: &BynderSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("bynder-usage-sync/", env!("CARGO_PKG_VERSION")))
        .timeout(settings.timeout)
        .connect_timeout(settings.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .use_rustls_tls();
    if let Some(path) = &settings.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} holds no usable PEM certificate: {e}", path.display()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// The process-wide gate every request passes: Bynder's rate limit is per IP, so one token bucket
/// and one 429 pause serve every worker.
pub struct Gate {
    /// Replaced whole when a configuration reload changes the rate.
    limiter: std::sync::RwLock<Arc<DefaultDirectRateLimiter>>,
    paused_until: Mutex<Option<Instant>>,
    block_pause: Mutex<Duration>,
}

/// A token bucket for `requests_per_second`. No burst: requests are spaced evenly, so no window
/// of any length sees more than its share of the configured rate (plus one).
fn limiter(requests_per_second: u32) -> Arc<DefaultDirectRateLimiter> {
    let rps = std::num::NonZeroU32::new(requests_per_second.max(1)).expect("at least 1");
    Arc::new(DefaultDirectRateLimiter::direct(
        Quota::per_second(rps).allow_burst(std::num::NonZeroU32::MIN),
    ))
}

impl Gate {
    pub fn new(requests_per_second: u32, block_pause: Duration) -> Self {
        Gate {
            limiter: std::sync::RwLock::new(limiter(requests_per_second)),
            paused_until: Mutex::new(None),
            block_pause: Mutex::new(block_pause),
        }
    }

    /// New limits from a configuration reload. A pause in force keeps its end.
    pub fn set_limits(&self, requests_per_second: u32, block_pause: Duration) {
        *self.limiter.write().expect("gate lock") = limiter(requests_per_second);
        *self.block_pause.lock().expect("gate lock") = block_pause;
    }

    /// Waits for the pause to end and for a token from the bucket.
    pub async fn pass(&self) {
        loop {
            let until = *self.paused_until.lock().expect("gate lock");
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        let limiter = self.limiter.read().expect("gate lock").clone();
        limiter.until_ready().await;
    }

    /// Starts (or keeps) a pause after a 429. Returns the end of the pause.
    pub fn pause(&self) -> Instant {
        let block_pause = *self.block_pause.lock().expect("gate lock");
        let mut guard = self.paused_until.lock().expect("gate lock");
        let end = Instant::now() + block_pause;
        match *guard {
            Some(t) if t >= end => t,
            _ => {
                *guard = Some(end);
                tracing::warn!(
                    pause = ?block_pause,
                    "Bynder's rate limit blocked us (429): all sending stops until the block has passed"
                );
                end
            }
        }
    }

    /// The end of the current pause, if one is in force.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
            .lock()
            .expect("gate lock")
            .filter(|t| *t > Instant::now())
    }
}

/// What is wrong with the portal's certificate, and the fix, when a connection failed on it
/// (`detail` is the innermost error); `None` when the failure is not about a certificate. Shared
/// by the API client and the token transport.
pub fn describe_certificate_error(detail: &str) -> Option<String> {
    if detail.contains("CaUsedAsEndEntity") {
        // The certificate may well be the very CA in bynder.ca_file: "set bynder.ca_file"
        // would send the reader in circles.
        return Some(format!(
            "the portal (or a TLS-inspecting proxy in between) presents a CA certificate as its \
             own server certificate ({detail}); TLS accepts only a leaf certificate there, even \
             from a trusted CA. Fix: have the portal or proxy serve a leaf (end-entity) \
             certificate for its host name signed by that CA, and keep the CA's certificate in \
             bynder.ca_file"
        ));
    }
    detail
        .to_ascii_lowercase()
        .contains("certificate")
        .then(|| {
            format!(
                "the portal's certificate is not trusted ({detail}). Fix: if the portal, or a \
             TLS-inspecting proxy in between, uses a private CA, set bynder.ca_file to that \
             CA's PEM certificate"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REGRESSION: rustls' `CaUsedAsEndEntity` was answered with "set bynder.ca_file", even when
    /// that was set; it is a CA certificate served where a leaf belongs.
    #[test]
    fn a_ca_used_as_the_server_certificate_is_not_told_to_set_ca_file() {
        let ca = describe_certificate_error(
            "invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))",
        )
        .unwrap();
        assert!(
            ca.contains("CA certificate as its own server certificate"),
            "{ca}"
        );
        assert!(
            ca.contains("leaf") && !ca.contains("set bynder.ca_file"),
            "{ca}"
        );
        let unknown =
            describe_certificate_error("invalid peer certificate: UnknownIssuer").unwrap();
        assert!(unknown.contains("set bynder.ca_file"), "{unknown}");
        assert!(describe_certificate_error("connection refused").is_none());
    }
}

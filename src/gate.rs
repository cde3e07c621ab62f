//! What every request to the portal shares: the process-wide [`Gate`] (one token bucket and one
//! 429 pause, because Bynder's rate limit is per IP) and the one way the HTTP client is built
//! (rustls, the extra CA, timeouts, no redirects), used by the usage client and the token
//! transport alike.

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

//! Request counting and the per-IP rate limit of the simulated portal.
//!
//! Owns the [`Counters`] and the limiter state; it does not decide what a request does.
//! The portal listens on loopback only, so "per IP" means one limiter for everything.

use std::collections::{BTreeMap, VecDeque};

use axum::http::StatusCode;
use tokio::time::Instant;

use super::options::RateLimit;

/// What the portal has seen since it started or since
/// [`Simulator::reset_counters`](super::Simulator::reset_counters).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Every HTTP request received, on any route, including rejected ones.
    pub total: u64,
    /// Requests per route, keyed `"METHOD /path"` (no query), e.g. `"POST /api/media/usage/"`.
    pub by_route: BTreeMap<String, u64>,
    /// 429 answers sent.
    pub rate_limited: u64,
    /// 401 answers sent, on any route.
    pub unauthorized: u64,
    /// Access tokens issued by the OAuth 2 token endpoint.
    pub tokens_issued: u64,
    /// The most token-endpoint requests that were in flight at once.
    pub max_concurrent_token_requests: u64,
    /// Server errors, dropped connections and slow answers injected.
    pub faults_injected: u64,
}

/// Counters plus the sliding-window limiter.
pub(super) struct Meter {
    pub counters: Counters,
    limit: Option<RateLimit>,
    /// When each request admitted inside the current window arrived, oldest first.
    admitted: VecDeque<Instant>,
    /// While a block is in force: when the last request arrived. The block lifts once a
    /// whole window passes after it.
    blocked_since_last: Option<Instant>,
}

impl Meter {
    pub fn new(limit: Option<RateLimit>) -> Meter {
        Meter {
            counters: Counters::default(),
            limit,
            admitted: VecDeque::new(),
            blocked_since_last: None,
        }
    }

    pub fn set_rate_limit(&mut self, limit: Option<RateLimit>) {
        self.limit = limit;
        self.admitted.clear();
        self.blocked_since_last = None;
    }

    /// Counts one arriving request and decides whether the rate limit lets it through.
    pub fn admit(&mut self, route: &str, now: Instant) -> bool {
        self.counters.total += 1;
        match self.counters.by_route.get_mut(route) {
            Some(count) => *count += 1,
            None => {
                self.counters.by_route.insert(route.to_owned(), 1);
            }
        }
        let Some(limit) = self.limit else {
            return true;
        };
        if let Some(last) = self.blocked_since_last {
            if now.saturating_duration_since(last) < limit.window {
                // Bynder's block is punitive: each request while blocked restarts the
                // quiet period the client must keep before it lifts.
                self.blocked_since_last = Some(now);
                return false;
            }
            self.blocked_since_last = None;
        }
        while let Some(&oldest) = self.admitted.front() {
            if now.saturating_duration_since(oldest) >= limit.window {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        if self.admitted.len() >= limit.max_requests as usize {
            self.blocked_since_last = Some(now);
            return false;
        }
        self.admitted.push_back(now);
        true
    }

    /// Counts the statuses the counters care about once the answer is known.
    pub fn record_status(&mut self, status: StatusCode) {
        match status {
            StatusCode::UNAUTHORIZED => self.counters.unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => self.counters.rate_limited += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limited(max_requests: u32, window_ms: u64) -> Meter {
        Meter::new(Some(RateLimit {
            max_requests,
            window: Duration::from_millis(window_ms),
        }))
    }

    #[test]
    fn requests_within_the_limit_pass_and_the_next_one_is_blocked() {
        let mut meter = limited(2, 1000);
        let start = Instant::now();
        assert!(meter.admit("GET /", start));
        assert!(meter.admit("GET /", start));
        assert!(!meter.admit("GET /", start));
        assert_eq!(meter.counters.total, 3);
        assert_eq!(meter.counters.by_route["GET /"], 3);
    }

    #[test]
    fn a_block_lasts_until_a_whole_window_passes_without_requests() {
        let mut meter = limited(1, 1000);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert!(meter.admit("GET /", at(0)));
        assert!(!meter.admit("GET /", at(10)));
        // The window of the first request is over, but the block started at 10 ms and
        // was extended at 900 ms.
        assert!(!meter.admit("GET /", at(900)));
        assert!(!meter.admit("GET /", at(1800)));
        assert!(meter.admit("GET /", at(2800)));
    }

    #[test]
    fn the_window_slides_rather_than_resetting_on_a_boundary() {
        let mut meter = limited(2, 1000);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert!(meter.admit("GET /", at(0)));
        assert!(meter.admit("GET /", at(600)));
        assert!(meter.admit("GET /", at(1000)));
        assert!(!meter.admit("GET /", at(1500)));
    }
}

//! The cached OAuth 2 access token: fetched lazily, renewed ahead of expiry by one request at
//! a time however many requests wait for it, and renewed once when Bynder rejects it.
//!
//! Owns only the timing and the single flight; how a token is obtained (client credentials,
//! refresh token) is the `fetch` closure the caller passes.
//!
//! - Renewal starts `min(60 s, lifetime / 2)` before `expires_in` runs out, counted from when the
//!   token request was *sent*, so a request never carries a token about to lapse, and a
//!   4-second test token is not renewed on every request.
//! - `expires_in` is whatever the token endpoint wrote: it is clamped to [`MAX_LIFETIME`] and
//!   every addition to an instant is checked, so an absurd lifetime (`9223372036854775807`)
//!   renews within a day instead of overflowing the clock and killing the process.
//! - A tokio mutex is held across the fetch: whoever finds the token due renews it, everyone
//!   else waits for that renewal instead of starting another.
//! - A failed renewal is remembered for a short, growing cooldown: while it lasts, callers get
//!   the same error (or the old token, while it is still valid) without a new request, so a
//!   token endpoint that is down or a wrong secret never causes a request storm.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::AuthError;

/// Lifetime assumed when the token endpoint gives no `expires_in` (Bynder always has so far).
const ASSUMED_LIFETIME: Duration = Duration::from_secs(600);
/// The longest lifetime believed. A token endpoint that claims more (up to `u64::MAX`
/// seconds) is broken or hostile; past a day the token is renewed anyway, which costs one
/// request a day and survives a lifetime that was a lie.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Renew at most this long before expiry (Bynder's SDKs use 15 s; a minute leaves room for a
/// slow token endpoint).
const MAX_RENEW_AHEAD: Duration = Duration::from_secs(60);
/// A token is not put on a request in its last moments (at most this long), even when its
/// renewal failed: the request would arrive with it expired.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(5);
const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
const MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// A freshly issued access token.
pub(crate) struct Issued {
    pub access_token: SecretString,
    /// When the request that obtained it was sent: its lifetime counts from there.
    pub requested_at: Instant,
    pub expires_in: Option<Duration>,
    /// The scopes the token endpoint reported, if it did.
    pub scopes: Option<Vec<String>>,
}

/// What is known about the current token, without the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Granted scopes as the token endpoint reported them.
    pub scopes: Option<Vec<String>>,
    /// `expires_in` as issued.
    pub lifetime: Option<Duration>,
    /// How many tokens this process has obtained so far.
    pub generation: u64,
}

struct Cached {
    value: SecretString,
    generation: u64,
    renew_at: Instant,
    usable_until: Instant,
    info: TokenInfo,
}

#[derive(Default)]
struct Slot {
    current: Option<Cached>,
    generations: u64,
    failures: u32,
    cooldown: Option<(Instant, AuthError)>,
}

/// The single cached access token of a process.
pub(crate) struct TokenCache {
    slot: Mutex<Slot>,
    /// Which token generation each task last put on a request. `Client::send` reports a 401
    /// without saying which token the request carried; this tells a rejection of the current
    /// token (renew) from a late rejection of one already replaced (just retry), so four
    /// workers hit by one revocation renew once, not four times. Keyed by tokio task (each
    /// operation runs in its own); `None` outside any task, where calls are sequential.
    handed_out: StdMutex<HashMap<Option<tokio::task::Id>, u64>>,
}

impl TokenCache {
    pub fn new() -> TokenCache {
        TokenCache {
            slot: Mutex::new(Slot::default()),
            handed_out: StdMutex::new(HashMap::new()),
        }
    }

    /// The token to put on a request: the cached one, or a new one when none is cached yet or
    /// the cached one is due for renewal.
    pub async fn bearer<F, Fut>(&self, fetch: F) -> Result<SecretString, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, AuthError>>,
    {
        let mut slot = self.slot.lock().await;
        let now = Instant::now();
        if let Some(cached) = slot.current.as_ref().filter(|c| now < c.renew_at) {
            return Ok(self.hand_out(cached));
        }
        self.renew(&mut slot, fetch).await
    }

    /// Bynder answered 401 to a request authorized by the calling task. Renews the token
    /// unless it was already renewed since that request was authorized; either way the
    /// request is worth sending once more.
    pub async fn renew_after_rejection<F, Fut>(&self, fetch: F) -> Result<bool, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, AuthError>>,
    {
        let used = lock(&self.handed_out).remove(&task_key());
        let mut slot = self.slot.lock().await;
        if let (Some(current), Some(used)) = (&slot.current, used) {
            if current.generation != used {
                return Ok(true);
            }
        }
        tracing::info!("Bynder rejected the access token (401); renewing it once");
        // Whatever its expiry says, the rejected token is no good any more.
        slot.current = None;
        self.renew(&mut slot, fetch).await.map(|_| true)
    }

    /// What is known about the current token, if there is one.
    pub async fn info(&self) -> Option<TokenInfo> {
        self.slot
            .lock()
            .await
            .current
            .as_ref()
            .map(|c| c.info.clone())
    }

    async fn renew<F, Fut>(&self, slot: &mut Slot, fetch: F) -> Result<SecretString, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, AuthError>>,
    {
        let now = Instant::now();
        if let Some((until, error)) = &slot.cooldown {
            if now < *until {
                if let Some(cached) = slot.current.as_ref().filter(|c| now < c.usable_until) {
                    return Ok(self.hand_out(cached));
                }
                return Err(error.clone());
            }
        }
        match fetch().await {
            Ok(issued) => {
                metrics::counter!("bynder_usage_sync_token_renewals_total").increment(1);
                slot.generations += 1;
                slot.failures = 0;
                slot.cooldown = None;
                let cached = Cached::new(issued, slot.generations);
                tracing::debug!(
                    generation = cached.generation,
                    lifetime = ?cached.info.lifetime,
                    "obtained an access token"
                );
                // Only requests still in flight with the previous token can report on it.
                lock(&self.handed_out).retain(|_, g| *g + 1 >= cached.generation);
                Ok(self.hand_out(slot.current.insert(cached)))
            }
            Err(error) => {
                slot.failures += 1;
                let wait = FIRST_COOLDOWN
                    .saturating_mul(2u32.saturating_pow(slot.failures.min(16) - 1))
                    .min(MAX_COOLDOWN);
                slot.cooldown = Some((Instant::now() + wait, error.clone()));
                let now = Instant::now();
                match slot.current.as_ref().filter(|c| now < c.usable_until) {
                    Some(cached) => {
                        tracing::warn!(%error, "renewing the access token failed; the current one is still valid and stays in use");
                        Ok(self.hand_out(cached))
                    }
                    None => Err(error),
                }
            }
        }
    }

    fn hand_out(&self, cached: &Cached) -> SecretString {
        lock(&self.handed_out).insert(task_key(), cached.generation);
        cached.value.clone()
    }
}

impl Cached {
    fn new(issued: Issued, generation: u64) -> Cached {
        let schedule = Schedule::of(issued.requested_at, issued.expires_in);
        Cached {
            value: issued.access_token,
            generation,
            renew_at: schedule.renew_at,
            usable_until: schedule.usable_until,
            info: TokenInfo {
                scopes: issued.scopes,
                lifetime: issued.expires_in,
                generation,
            },
        }
    }
}

/// When a token is renewed and until when it may still be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub renew_at: Instant,
    pub usable_until: Instant,
}

impl Schedule {
    /// The schedule of a token requested at `requested_at` with the `expires_in` the token
    /// endpoint gave. Absent or zero means [`ASSUMED_LIFETIME`]; more than [`MAX_LIFETIME`] is
    /// clamped to it. Never panics: an instant that cannot be represented (a clock near its
    /// end) falls back to `requested_at`, which renews on the next request.
    pub fn of(requested_at: Instant, expires_in: Option<Duration>) -> Schedule {
        let lifetime = expires_in
            .filter(|d| !d.is_zero())
            .unwrap_or(ASSUMED_LIFETIME)
            .min(MAX_LIFETIME);
        let at = |offset: Duration| {
            requested_at
                .checked_add(lifetime.saturating_sub(offset))
                .unwrap_or(requested_at)
        };
        Schedule {
            renew_at: at((lifetime / 2).min(MAX_RENEW_AHEAD)),
            usable_until: at((lifetime / 10).min(MAX_SAFETY_MARGIN)),
        }
    }
}

fn task_key() -> Option<tokio::task::Id> {
    tokio::task::try_id()
}

fn lock<T>(mutex: &StdMutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A token source counting its fetches; token `n` is called `t<n>`.
    #[derive(Default)]
    struct Source {
        fetches: AtomicU32,
        lifetime_secs: u64,
        failing: std::sync::atomic::AtomicBool,
    }

    impl Source {
        fn new(lifetime_secs: u64) -> Arc<Source> {
            Arc::new(Source {
                lifetime_secs,
                ..Source::default()
            })
        }

        async fn fetch(&self) -> Result<Issued, AuthError> {
            let requested_at = Instant::now();
            // A token request takes a while: long enough for others to queue up behind it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.failing.load(Ordering::SeqCst) {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                return Err(AuthError::Unavailable("503".into()));
            }
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Issued {
                access_token: SecretString::from(format!("t{n}")),
                requested_at,
                expires_in: Some(Duration::from_secs(self.lifetime_secs)),
                scopes: None,
            })
        }

        fn count(&self) -> u32 {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    async fn bearer(cache: &TokenCache, source: &Source) -> Result<String, AuthError> {
        cache
            .bearer(|| source.fetch())
            .await
            .map(|t| t.expose_secret().to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_fetched_lazily_and_reused_until_it_is_due() {
        let cache = TokenCache::new();
        let source = Source::new(3600);
        assert_eq!(
            source.count(),
            0,
            "nothing is fetched before the first request"
        );
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        tokio::time::advance(Duration::from_secs(3600 - 61)).await;
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        // Within the last minute: renewed ahead of expiry.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t2");
        assert_eq!(source.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_lived_token_is_renewed_at_half_its_lifetime_not_on_every_request() {
        let cache = TokenCache::new();
        let source = Source::new(4);
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t2");
    }

    #[tokio::test(start_paused = true)]
    async fn many_waiting_requests_share_one_renewal() {
        let cache = Arc::new(TokenCache::new());
        let source = Source::new(3600);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, source) = (cache.clone(), source.clone());
                tokio::spawn(async move { bearer(&cache, &source).await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "t1");
        }
        assert_eq!(source.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_revocation_seen_by_many_tasks_renews_once() {
        let cache = Arc::new(TokenCache::new());
        let source = Source::new(3600);
        bearer(&cache, &source).await.unwrap();
        // Four tasks put t1 on their requests, all of which come back 401 at about the same
        // time, some only after the renewal finished.
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let tasks: Vec<_> = (0..4u64)
            .map(|n| {
                let (cache, source, barrier) = (cache.clone(), source.clone(), barrier.clone());
                tokio::spawn(async move {
                    assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
                    barrier.wait().await;
                    tokio::time::sleep(Duration::from_millis(40 * n)).await;
                    assert!(cache
                        .renew_after_rejection(|| source.fetch())
                        .await
                        .unwrap());
                    bearer(&cache, &source).await.unwrap()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "t2");
        }
        assert_eq!(source.count(), 2, "one initial fetch, one renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_that_is_still_current_is_renewed_even_before_its_expiry() {
        let cache = TokenCache::new();
        let source = Source::new(3600);
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        assert!(cache
            .renew_after_rejection(|| source.fetch())
            .await
            .unwrap());
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_not_repeated_by_every_waiting_request() {
        let cache = Arc::new(TokenCache::new());
        let source = Source::new(3600);
        source.failing.store(true, Ordering::SeqCst);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, source) = (cache.clone(), source.clone());
                tokio::spawn(async move { bearer(&cache, &source).await })
            })
            .collect();
        for task in tasks {
            assert!(matches!(
                task.await.unwrap(),
                Err(AuthError::Unavailable(_))
            ));
        }
        assert_eq!(source.count(), 1, "the others got the remembered failure");
        // After the cooldown the next request tries again; the cooldown grows.
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert!(bearer(&cache, &source).await.is_err());
        assert_eq!(source.count(), 2);
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert!(bearer(&cache, &source).await.is_err());
        assert_eq!(source.count(), 2, "second cooldown is twice as long");
        source.failing.store(false, Ordering::SeqCst);
        tokio::time::advance(FIRST_COOLDOWN * 2).await;
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_still_valid_token_stays_in_use_while_its_renewal_fails() {
        let cache = TokenCache::new();
        let source = Source::new(120);
        assert_eq!(bearer(&cache, &source).await.unwrap(), "t1");
        source.failing.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            bearer(&cache, &source).await.unwrap(),
            "t1",
            "renewal failed, the token has a minute left"
        );
        tokio::time::advance(Duration::from_secs(58)).await;
        assert!(
            bearer(&cache, &source).await.is_err(),
            "too close to expiry to be sent"
        );
    }
}

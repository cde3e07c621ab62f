//! The state the simulated portal's server task and its [`Simulator`](super::Simulator)
//! handle share: the [`Policy`] fixed at start, and the store, credentials, meter and
//! faults, each behind its own lock.
//!
//! Owns the locking (and why it is a std mutex) and the little bookkeeping that spans
//! parts, such as token requests in flight. It does not decide what a request gets: the
//! routes do, over the parts this hands out.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::auth::Credentials;
use super::faults::Faults;
use super::meter::Meter;
use super::options::{IdCase, Options, ScopePolicy, SyncAnswer, SyncSemantics};
use super::store::Store;
use super::wire::{Call, Rejection};

/// Configuration that never changes after start.
pub(super) struct Policy {
    pub(super) token_lifetime: Duration,
    pub(super) rotate_refresh_tokens: bool,
    pub(super) missing_assets: HashSet<String>,
    pub(super) sync_endpoint: bool,
    pub(super) max_sync_usages: Option<usize>,
    pub(super) statistics_role: bool,
    pub(super) latency: Duration,
    pub(super) sync_semantics: SyncSemantics,
    pub(super) sync_answer: SyncAnswer,
    pub(super) id_case: IdCase,
    pub(super) list_without_asset_id: bool,
    pub(super) scope_policy: ScopePolicy,
}

impl Policy {
    /// An asset id as this portal stores and compares it.
    pub(super) fn asset_id<'a>(&self, asset_id: &'a str) -> std::borrow::Cow<'a, str> {
        match self.id_case {
            IdCase::Preserve => std::borrow::Cow::Borrowed(asset_id),
            IdCase::Lower => std::borrow::Cow::Owned(asset_id.to_ascii_lowercase()),
        }
    }

    /// Whether the portal has no asset with this id; `asset_id` must already be in the
    /// portal's case (see [`Policy::asset_id`]).
    pub(super) fn is_missing(&self, asset_id: &str) -> bool {
        self.missing_assets.contains(asset_id)
    }
}

/// State shared by the server task and the [`Simulator`](super::Simulator) handle.
///
/// Each part has its own `std::sync::Mutex`: every critical section is short and
/// synchronous (never held across an await), which a std mutex serves faster than an
/// async one, and separate locks keep the counters from contending with a big sync.
pub(super) struct Shared {
    pub(super) policy: Policy,
    store: Mutex<Store>,
    credentials: Mutex<Credentials>,
    meter: Mutex<Meter>,
    pub(super) faults: Mutex<Faults>,
    token_requests_in_flight: AtomicU64,
    stopped: watch::Receiver<bool>,
}

impl Shared {
    pub(super) fn new(options: Options, stopped: watch::Receiver<bool>) -> Shared {
        let Options {
            permanent_tokens,
            clients,
            oauth1,
            token_lifetime,
            rotate_refresh_tokens,
            rate_limit,
            missing_assets,
            sync_endpoint,
            max_sync_usages,
            statistics_role,
            latency,
            sync_semantics,
            sync_answer,
            id_case,
            list_without_asset_id,
            scope_policy,
        } = options;
        let missing_assets = match id_case {
            IdCase::Preserve => missing_assets,
            IdCase::Lower => missing_assets
                .iter()
                .map(|id| id.to_ascii_lowercase())
                .collect(),
        };
        Shared {
            policy: Policy {
                token_lifetime,
                rotate_refresh_tokens,
                missing_assets,
                sync_endpoint,
                max_sync_usages,
                statistics_role,
                latency,
                sync_semantics,
                sync_answer,
                id_case,
                list_without_asset_id,
                scope_policy,
            },
            store: Mutex::new(Store::default()),
            credentials: Mutex::new(Credentials::new(permanent_tokens, clients, oauth1)),
            meter: Mutex::new(Meter::new(rate_limit)),
            faults: Mutex::new(Faults::default()),
            token_requests_in_flight: AtomicU64::new(0),
            stopped,
        }
    }

    pub(super) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub(super) fn credentials(&self) -> MutexGuard<'_, Credentials> {
        lock(&self.credentials)
    }

    pub(super) fn meter(&self) -> MutexGuard<'_, Meter> {
        lock(&self.meter)
    }

    /// Lets a request to an API endpoint through, or answers 401 or 403; see
    /// [`Credentials::authorize`].
    pub(super) fn authorize(&self, call: &Call, scope: &str) -> Result<(), Rejection> {
        self.credentials().authorize(call, scope)
    }

    /// Marks one more token request in flight until the guard is dropped.
    pub(super) fn enter_token_request(&self) -> TokenRequestGuard<'_> {
        let now = self.token_requests_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let mut meter = self.meter();
        let max = &mut meter.counters.max_concurrent_token_requests;
        *max = (*max).max(now);
        TokenRequestGuard(&self.token_requests_in_flight)
    }

    /// Sleeps for `delay`; returns false when the simulator was stopped meanwhile.
    pub(super) async fn pause(&self, delay: Duration) -> bool {
        if delay.is_zero() {
            return true;
        }
        let mut stopped = self.stopped.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            _ = stopped.wait_for(|stopped| *stopped) => false,
        }
    }
}

pub(super) struct TokenRequestGuard<'a>(&'a AtomicU64);

impl Drop for TokenRequestGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Locks a mutex, ignoring poisoning: a panicking handler must not take the whole
/// simulated portal down with it, and every critical section leaves the state valid.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! The simulated Bynder portal: a stateful HTTP server on loopback that the tests,
//! the benchmarks and the `demo` command talk to instead of a real portal.
//!
//! It owns everything a portal does that the daemon can observe: usage records (indexed
//! so that a million of them stay fast), OAuth 2 and legacy OAuth 1.0a credentials, the
//! per-IP rate limit, injected faults and request counters. It follows the shared API
//! reference (`bynder-api-reference.md`); where Bynder's behaviour is unknown it takes
//! the strict reading (a repeated create makes a second record, a refresh does not
//! rotate the refresh token, client credentials get no refresh token) so that a client
//! which only works against a lenient server fails here first.
//!
//! Where the unknown has more than one plausible answer and a client must survive each,
//! [`Options`] picks one per portal (fixed at start; defaults in brackets):
//!
//! - [`SyncSemantics`] [`Exact`](SyncSemantics::Exact): whether a sync makes each listed
//!   uri hold exactly the request's entries, or only keeps the spec's literal promise
//!   (a listed uri with no entry at all is emptied; nothing else is removed).
//! - [`SyncAnswer`] [`Full`](SyncAnswer::Full): the documented `{accepted, new, rejected,
//!   removed}`, or a 204, `{}` or `[]` that confirms nothing.
//! - [`IdCase`] [`Preserve`](IdCase::Preserve): asset ids kept as sent, or matched
//!   ignoring ASCII case and answered lowercased.
//! - `list_without_asset_id` [false]: whether GET lists an integration's usages (narrowed
//!   by `uri`) without an `asset_id`, as Contentful's app relies on, or answers 400.
//! - [`ScopePolicy`] [`Refuse`](ScopePolicy::Refuse): whether a token request for a scope
//!   the app lacks is refused with `invalid_scope` (Bynder's observed behaviour) or
//!   quietly narrowed to the app's scopes.
//!
//! It does not own any client code: nothing here signs requests or speaks to Bynder,
//! and the daemon never imports from this module outside tests, benchmarks and `demo`.
//!
//! Layout: `http` receives every request (counting, rate limit, latency, faults) and
//! routes it; `usage` serves the asset-usage endpoints over `store`; `oauth2` and
//! `oauth1` serve the token endpoints; `auth` holds every credential and decides whether
//! a request may proceed; `meter` counts and rate-limits; `faults` rolls the dice.

mod auth;
mod endless;
mod faults;
mod http;
mod meter;
mod oauth1;
mod oauth2;
mod store;
mod usage;

#[cfg(test)]
mod tests;

pub use endless::endless_body_server;

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the simulated portal is configured when it starts.
///
/// Everything here is fixed for the simulator's life except what [`Simulator`] has a
/// setter or a revoke method for.
#[derive(Clone)]
pub struct Options {
    /// Permanent tokens accepted as `Authorization: Bearer <token>`; they carry every
    /// scope and never expire.
    pub permanent_tokens: Vec<String>,
    /// Registered OAuth 2 apps.
    pub clients: Vec<Client>,
    /// Legacy OAuth 1.0a consumer and token pairs that are valid from the start.
    pub oauth1: Vec<OAuth1Credentials>,
    /// `expires_in` of issued access tokens, and how long they are accepted.
    pub token_lifetime: Duration,
    /// When false (the default, Bynder's documented behaviour) a refresh response has no
    /// `refresh_token` and the old one stays valid; when true a new one is issued and the
    /// old one stops working.
    pub rotate_refresh_tokens: bool,
    /// The per-IP rate limit, if any.
    pub rate_limit: Option<RateLimit>,
    /// Asset ids that do not exist in the portal; creating a usage for one fails.
    pub missing_assets: HashSet<String>,
    /// When false, `POST /api/media/usage/sync` answers 404 as if the portal predated it.
    pub sync_endpoint: bool,
    /// A sync request with more usages than this gets 413.
    pub max_sync_usages: Option<usize>,
    /// When false, the token's user lacks the STATISTICS role and every usage endpoint
    /// answers 403.
    pub statistics_role: bool,
    /// Added to every response.
    pub latency: Duration,
    /// What a sync removes on the uris it lists.
    pub sync_semantics: SyncSemantics,
    /// What a successful sync answers; the changes are the same in every variant.
    pub sync_answer: SyncAnswer,
    /// Whether asset ids are matched exactly or ignoring ASCII case.
    pub id_case: IdCase,
    /// When false (the default), `GET /api/media/usage/` without `asset_id` answers 400;
    /// when true, `integration_id` (optionally with `uri`) alone lists that
    /// integration's usages.
    pub list_without_asset_id: bool,
    /// What the token endpoint does with a requested scope the app does not have.
    pub scope_policy: ScopePolicy,
}

/// What `POST /api/media/usage/sync` removes on each uri listed in `uris`. Bynder's
/// only promise is that a listed uri no entry uses loses its usages; whether an asset
/// left out of a uri that keeps other entries is removed is unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncSemantics {
    /// The integration's usages on each listed uri become exactly the request's entries
    /// with that uri: listed assets are created or updated, unlisted assets and duplicate
    /// records are removed.
    #[default]
    Exact,
    /// The spec's words only: a listed uri that no entry in the request uses loses every
    /// usage of this integration; on any other listed uri the entries are created or
    /// updated and every other stored usage (unlisted assets, duplicates) stays.
    Literal,
}

/// The answer to a successful sync. Only the answer differs; the changes are applied,
/// and rejected entries left out, the same way in every variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncAnswer {
    /// 200 `{"accepted": [...], "new": [...], "rejected": [...], "removed": [...]}`, as
    /// the spec documents.
    #[default]
    Full,
    /// 204 with no body.
    NoContent,
    /// 200 `{}`.
    EmptyObject,
    /// 200 `[]`.
    EmptyArray,
}

/// How the portal compares asset ids. Bynder's examples are upper case; whether it
/// matches them case-insensitively, and in which case it answers them, is unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdCase {
    /// Asset ids are compared, stored and answered exactly as sent.
    #[default]
    Preserve,
    /// Asset ids are matched ignoring ASCII case, stored lowercased and answered
    /// lowercased everywhere (GET, create, every list of the sync answer); the
    /// `missing_assets` option and [`Simulator::seed_usage`] follow the same rule.
    Lower,
}

/// What the token endpoint does when a request asks for a scope the app lacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScopePolicy {
    /// Bynder's observed behaviour (its OAuth server is Ory Hydra): the token request
    /// answers 400 `invalid_scope` naming the first such scope, and the authorization
    /// step redirects back with `error=invalid_scope`. `offline` is a scope like any
    /// other and must be registered for the app. A request without `scope` gets all of
    /// the app's scopes.
    #[default]
    Refuse,
    /// The request gets the intersection of what it asks for and the app's scopes.
    Narrow,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            permanent_tokens: Vec::new(),
            clients: Vec::new(),
            oauth1: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: false,
            rate_limit: None,
            missing_assets: HashSet::new(),
            sync_endpoint: true,
            max_sync_usages: None,
            statistics_role: true,
            latency: Duration::ZERO,
            sync_semantics: SyncSemantics::default(),
            sync_answer: SyncAnswer::default(),
            id_case: IdCase::default(),
            list_without_asset_id: false,
            scope_policy: ScopePolicy::default(),
        }
    }
}

/// A registered OAuth 2 app.
#[derive(Clone)]
pub struct Client {
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: String,
    /// The scopes this app may be granted (`offline` included, for a refresh token). A
    /// token request asking for any other is refused or narrowed, as
    /// [`Options::scope_policy`] says.
    pub scopes: Vec<String>,
    /// Redirect URIs accepted by the authorization-code flow, compared exactly.
    pub redirect_uris: Vec<String>,
}

/// A legacy OAuth 1.0a consumer with an access token that is valid.
#[derive(Clone)]
pub struct OAuth1Credentials {
    /// `oauth_consumer_key`.
    pub consumer_key: String,
    /// The consumer secret (first half of the signing key).
    pub consumer_secret: String,
    /// `oauth_token`.
    pub token: String,
    /// The token secret (second half of the signing key).
    pub token_secret: String,
}

/// Bynder's per-IP rate limit: at most `max_requests` in any sliding `window`.
///
/// A request over the limit gets 429 and starts a block; every request during the block
/// also gets 429 and extends it, so the block lifts only after a whole `window` with no
/// request at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed in any window.
    pub max_requests: u32,
    /// Length of the sliding window, and of the quiet period that lifts a block.
    pub window: Duration,
}

/// Faults injected into the usage endpoints and `currentUser` (the token endpoint only
/// honours `token_endpoint_down`). Rates are probabilities in `0.0..=1.0`, rolled
/// independently in the order server error, dropped connection, slow answer.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability of answering 500, 502 or 503 with an HTML body, without changing state.
    pub server_error_rate: f64,
    /// Probability of dropping the connection without an HTTP answer; half of the drops
    /// happen before the change is applied and half after, so the client cannot tell.
    pub drop_rate: f64,
    /// Probability of applying the change, then waiting `slow_delay` before answering.
    pub slow_rate: f64,
    /// How long a slow answer waits; make it longer than the client's timeout.
    pub slow_delay: Duration,
    /// When true the token endpoint answers 503.
    pub token_endpoint_down: bool,
}

/// One usage record as the portal stores it (flat; the wire form nests the integration).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// The usage id (a UUID).
    pub id: String,
    /// The integration that owns the usage.
    pub integration_id: String,
    /// The Bynder asset (media) id.
    pub asset_id: String,
    /// Where the asset is used.
    pub uri: String,
    /// Free text.
    pub additional: String,
    /// When the usage was recorded, RFC 3339 with microseconds and a `+00:00` offset.
    pub timestamp: String,
}

/// What the portal has seen since it started or since [`Simulator::reset_counters`].
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

/// A running simulated portal. Dropping it stops the server.
pub struct Simulator {
    base_url: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Starts a portal on a fresh port of 127.0.0.1.
    pub async fn start(options: Options) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Simulator::start_on(listener, options).await
    }

    /// Starts a portal on an already-bound listener (the `demo` command picks its port).
    pub async fn start_on(listener: TcpListener, options: Options) -> std::io::Result<Simulator> {
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared::new(options, stopped.clone()));
        let app = axum::Router::new()
            .fallback(http::dispatch)
            .with_state(Arc::clone(&shared));
        let mut signal = stopped;
        let server = tokio::spawn(async move {
            let until_stopped = async move {
                // An error means the sender is gone, which also means stop.
                let _ = signal.wait_for(|stopped| *stopped).await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(until_stopped)
                .await
            {
                tracing::warn!(%error, "simulated portal stopped serving");
            }
        });
        Ok(Simulator {
            base_url: base_url_for(address),
            shared,
            stop,
            server: Some(server),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Every usage of every integration, sorted by (integration_id, asset_id, uri, id).
    pub fn usages(&self) -> Vec<Usage> {
        self.shared.store().all_sorted()
    }

    /// The usages of one integration, in the same order as [`Simulator::usages`].
    pub fn usages_for(&self, integration_id: &str) -> Vec<Usage> {
        self.shared.store().integration_sorted(integration_id)
    }

    /// Records a usage as if someone else (or a person in the UI) had created it. It
    /// bypasses `missing_assets`, faults and the rate limit; with [`IdCase::Lower`] the
    /// asset id is stored lowercased, as the portal would.
    pub fn seed_usage(
        &self,
        integration_id: &str,
        asset_id: &str,
        uri: &str,
        additional: &str,
    ) -> Usage {
        let asset_id = self.shared.policy.asset_id(asset_id);
        let mut store = self.shared.store();
        let id = store.insert(
            integration_id,
            &asset_id,
            uri,
            additional,
            chrono::Utc::now(),
        );
        store
            .usage(&id)
            .expect("a usage that was just inserted exists")
    }

    /// Deletes one usage as if a person had removed it in the UI; false when no usage has
    /// that id.
    pub fn remove_usage(&self, usage_id: &str) -> bool {
        match uuid::Uuid::parse_str(usage_id) {
            Ok(id) => self.shared.store().remove(&id).is_some(),
            Err(_) => false,
        }
    }

    /// Replaces the injected faults; takes effect for the next request.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Replaces the rate limit and forgets past requests and any block in force.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared.meter().set_rate_limit(limit);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.meter().counters.clone()
    }

    /// Sets every counter back to zero.
    pub fn reset_counters(&self) {
        self.shared.meter().counters = Counters::default();
    }

    /// Every OAuth 2 access token issued and still held (for tests that look for leaks).
    pub fn access_tokens(&self) -> Vec<String> {
        self.shared.credentials().access.keys().cloned().collect()
    }

    /// Makes every issued OAuth 2 access token invalid; refresh tokens stay valid.
    pub fn revoke_access_tokens(&self) {
        self.shared.credentials().revoke_access_tokens();
    }

    /// Makes every issued OAuth 2 refresh token invalid.
    pub fn revoke_refresh_tokens(&self) {
        self.shared.credentials().revoke_refresh_tokens();
    }

    /// Makes one permanent token invalid, as an admin deleting it would.
    pub fn revoke_permanent_token(&self, token: &str) {
        self.shared.credentials().revoke_permanent_token(token);
    }

    /// Stops accepting connections, lets requests in flight finish (a slow fault is cut
    /// short) and waits up to five seconds for the server to wind down.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        // The signal also reaches the per-connection tasks, which aborting the accept
        // loop alone would leave serving keep-alive connections.
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn base_url_for(address: SocketAddr) -> String {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{address}")
}

/// Configuration that never changes after start.
struct Policy {
    token_lifetime: Duration,
    rotate_refresh_tokens: bool,
    missing_assets: HashSet<String>,
    sync_endpoint: bool,
    max_sync_usages: Option<usize>,
    statistics_role: bool,
    latency: Duration,
    sync_semantics: SyncSemantics,
    sync_answer: SyncAnswer,
    id_case: IdCase,
    list_without_asset_id: bool,
    scope_policy: ScopePolicy,
}

impl Policy {
    /// An asset id as this portal stores and compares it.
    fn asset_id<'a>(&self, asset_id: &'a str) -> std::borrow::Cow<'a, str> {
        match self.id_case {
            IdCase::Preserve => std::borrow::Cow::Borrowed(asset_id),
            IdCase::Lower => std::borrow::Cow::Owned(asset_id.to_ascii_lowercase()),
        }
    }

    /// Whether the portal has no asset with this id; `asset_id` must already be in the
    /// portal's case (see [`Policy::asset_id`]).
    fn is_missing(&self, asset_id: &str) -> bool {
        self.missing_assets.contains(asset_id)
    }
}

/// State shared by the server task and the [`Simulator`] handle.
///
/// Each part has its own `std::sync::Mutex`: every critical section is short and
/// synchronous (never held across an await), which a std mutex serves faster than an
/// async one, and separate locks keep the counters from contending with a big sync.
struct Shared {
    policy: Policy,
    store: Mutex<store::Store>,
    credentials: Mutex<auth::Credentials>,
    meter: Mutex<meter::Meter>,
    faults: Mutex<Faults>,
    token_requests_in_flight: AtomicU64,
    stopped: watch::Receiver<bool>,
}

impl Shared {
    fn new(options: Options, stopped: watch::Receiver<bool>) -> Shared {
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
            store: Mutex::new(store::Store::default()),
            credentials: Mutex::new(auth::Credentials::new(permanent_tokens, clients, oauth1)),
            meter: Mutex::new(meter::Meter::new(rate_limit)),
            faults: Mutex::new(Faults::default()),
            token_requests_in_flight: AtomicU64::new(0),
            stopped,
        }
    }

    fn store(&self) -> MutexGuard<'_, store::Store> {
        lock(&self.store)
    }

    fn credentials(&self) -> MutexGuard<'_, auth::Credentials> {
        lock(&self.credentials)
    }

    fn meter(&self) -> MutexGuard<'_, meter::Meter> {
        lock(&self.meter)
    }

    /// Marks one more token request in flight until the guard is dropped.
    fn enter_token_request(&self) -> TokenRequestGuard<'_> {
        let now = self.token_requests_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let mut meter = self.meter();
        let max = &mut meter.counters.max_concurrent_token_requests;
        *max = (*max).max(now);
        TokenRequestGuard(&self.token_requests_in_flight)
    }

    /// Sleeps for `delay`; returns false when the simulator was stopped meanwhile.
    async fn pause(&self, delay: Duration) -> bool {
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

struct TokenRequestGuard<'a>(&'a AtomicU64);

impl Drop for TokenRequestGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Locks a mutex, ignoring poisoning: a panicking handler must not take the whole
/// simulated portal down with it, and every critical section leaves the state valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

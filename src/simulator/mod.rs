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
//! Layout, each file depending only on those listed before it: `options` (what the portal
//! starts with), `store` (usage records), `wire` (the request view and the answers routes
//! share), `faults` (the dice); `meter` counts and rate-limits; `signature` is the OAuth
//! 1.0a arithmetic; `auth` holds every credential and decides whether a request may
//! proceed; `state` is what the server and the handle share; `usage` serves the
//! asset-usage endpoints, `oauth2` and `oauth1` the token endpoints; `http` receives every
//! request (counting, rate limit, latency, faults) and routes it; this file is the handle.
//! `endless` (a server whose answer never ends) stands apart and depends on none of them.

mod auth;
mod endless;
mod faults;
mod http;
mod meter;
mod oauth1;
mod oauth2;
mod options;
mod signature;
mod state;
mod store;
mod usage;
mod wire;

#[cfg(test)]
mod tests;

pub use endless::endless_body_server;
pub use faults::Faults;
pub use meter::Counters;
pub use options::{
    Client, IdCase, OAuth1Credentials, Options, RateLimit, ScopePolicy, SyncAnswer, SyncSemantics,
};
pub use store::Usage;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use state::{lock, Shared};

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

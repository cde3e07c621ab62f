//! What the simulated portal is configured with when it starts: [`Options`] and the
//! types it is made of (the registered apps, the legacy OAuth 1.0a pairs, the rate limit
//! and each choice where Bynder's behaviour is unknown).
//!
//! Owns only the configuration's shape and defaults. It does not decide anything: the
//! routes read these values through the state built from them in [`super::state`].

use std::collections::HashSet;
use std::time::Duration;

/// How the simulated portal is configured when it starts.
///
/// Everything here is fixed for the simulator's life except what [`Simulator`](super::Simulator) has a
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
    /// `missing_assets` option and [`Simulator::seed_usage`](super::Simulator::seed_usage) follow the same rule.
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

//! The daemon's HTTP endpoints (axum, on `server.listen`): `/healthz` (liveness), `/readyz`
//! (readiness), `/metrics` (Prometheus text) and `/`, a small read-only status page with the
//! asset tracking search.
//!
//! Everything here reads; nothing changes state, and no secret is ever rendered. The page is
//! server-rendered HTML without scripts; every value from the database goes through [`escape`]
//! and long ones are cut ([`shown`]). Health itself is the daemon's ([`crate::daemon::Health`]);
//! this module only reports it. Connections are bounded in [`serve`], callers checked in
//! [`guard`]; searches are bounded here (a few at once, each with a time limit), and readiness
//! reads the database on a connection of its own, so no number of searches can fail `/readyz`.

mod guard;
mod serve;

pub use self::serve::Limits;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::app::Context;
use crate::health::{CredentialState, Health, Role};
use crate::model::{RawRow, Reference, SkipReason};
use crate::store::{self, QueueSummary, RunRecord};

/// How long a readiness probe waits for the database.
const DATABASE_PROBE: Duration = Duration::from_secs(2);
/// Search results shown at most.
const SEARCH_LIMIT: usize = 100;
/// Searches answered at once; more are told to try again. A search of a substring reads whole
/// tables, so a handful at once already keeps the database busy.
const SEARCHES_AT_ONCE: usize = 4;
/// A search that takes longer is stopped.
const SEARCH_TIME: Duration = Duration::from_secs(5);
/// Characters of one value shown on the page; the rest is cut.
const SHOWN: usize = 300;
/// Dead letters and runs listed on the page.
const LISTED: i64 = 20;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<Context>,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    /// Raised when the daemon stops: `/readyz` turns not-ready at once.
    pub stopping: watch::Receiver<bool>,
    /// Permits for searches running now ([`SEARCHES_AT_ONCE`]).
    pub searches: Arc<Semaphore>,
}

impl AppState {
    pub fn new(
        ctx: Arc<Context>,
        health: Arc<Health>,
        metrics: PrometheusHandle,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        AppState {
            ctx,
            health,
            metrics,
            stopping,
            searches: Arc::new(Semaphore::new(SEARCHES_AT_ONCE)),
        }
    }
}

/// The router: every endpoint of the daemon, behind the host and token check.
pub fn router(state: AppState) -> Router {
    let guard = guard::Guard::new(&state.ctx.config.server);
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(guard, guard::check))
}

/// Serves the endpoints on an already-bound listener until `shutdown` resolves, with the
/// connection limits of `server` (see [`serve`](self::serve)).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let server = &state.ctx.config.server;
    let limits = Limits {
        max_connections: server.max_connections,
        header_timeout: server.header_timeout,
        idle_timeout: server.idle_timeout,
    };
    if server.token.is_none() && !server.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %server.listen,
            "the status page and /metrics are served beyond loopback without a token: set \
             server.token_file, or keep them behind a proxy that authenticates"
        );
    }
    serve::serve(listener, router(state), limits, shutdown).await
}

// ---- health ---------------------------------------------------------------------------------

/// Liveness: the process answers. (A worker or server that dies ends the process, which is what
/// a failing liveness probe would cause anyway.)
async fn healthz() -> &'static str {
    "ok\n"
}

/// One readiness condition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Whether the daemon can do its job now, and why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// `single`, `leader` or `standby` (see [`crate::health::Role`]).
    pub role: &'static str,
    pub checks: Vec<Check>,
}

/// The readiness rule, on what was observed: the database answers, Bynder accepted the
/// credentials on the last request that said anything about them, no rate-limit block is in force
/// (`paused_until`, a time in the future), and the daemon is not stopping.
///
/// A standby daemon (another one leads) makes no request, so its credentials are unchecked: it
/// is ready when its database answers, and says it stands by.
pub fn readiness(
    database: Result<(), String>,
    credentials: &CredentialState,
    paused_until: Option<&str>,
    stopping: bool,
    role: &Role,
) -> Readiness {
    let credentials = match role {
        Role::Standby { leader } => Check {
            name: "role",
            ok: true,
            detail: format!(
                "standby: {} leads; this daemon takes over when it stops",
                leader.as_deref().unwrap_or("another daemon")
            ),
        },
        _ => match credentials {
            CredentialState::Accepted => Check {
                name: "credentials",
                ok: true,
                detail: "accepted by Bynder".into(),
            },
            CredentialState::Unchecked => Check {
                name: "credentials",
                ok: false,
                detail: "not checked yet: Bynder has not answered since the daemon started".into(),
            },
            CredentialState::Rejected(m) => Check {
                name: "credentials",
                ok: false,
                detail: m.clone(),
            },
        },
    };
    let mut checks = vec![
        match database {
            Ok(()) => Check {
                name: "database",
                ok: true,
                detail: "the state database answers".into(),
            },
            Err(e) => Check {
                name: "database",
                ok: false,
                detail: e,
            },
        },
        credentials,
        match paused_until {
            None => Check {
                name: "rate_limit",
                ok: true,
                detail: "no rate-limit block".into(),
            },
            Some(t) => Check {
                name: "rate_limit",
                ok: false,
                detail: format!(
                    "Bynder's rate limit blocked us (429); all sending is paused until {t}"
                ),
            },
        },
    ];
    if stopping {
        checks.push(Check {
            name: "shutdown",
            ok: false,
            detail: "the daemon is stopping".into(),
        });
    }
    if *role == Role::Leader {
        checks.push(Check {
            name: "role",
            ok: true,
            detail: "leader: this daemon plans and sends for the shared state database".into(),
        });
    }
    Readiness {
        ready: checks.iter().all(|c| c.ok),
        role: role.label(),
        checks,
    }
}

/// Observes and applies [`readiness`].
async fn assess(state: &AppState) -> Readiness {
    let store = &state.ctx.store;
    let database = match tokio::time::timeout(DATABASE_PROBE, store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the state database failed: {e}")),
        Err(_) => Err(format!(
            "the state database did not answer within {DATABASE_PROBE:?}"
        )),
    };
    let paused_until = paused_until(state).await;
    readiness(
        database,
        &state.health.credentials(),
        paused_until.as_deref(),
        *state.stopping.borrow(),
        &state.health.role(),
    )
}

/// The end of a rate-limit block in force: this process's own, or one another process (a manual
/// `resync`) recorded in the database. Bynder's limit is per IP, so either stops us.
async fn paused_until(state: &AppState) -> Option<String> {
    let now = chrono::Utc::now();
    let own = state.ctx.client.gate().paused_until().map(|t| {
        let left = t.saturating_duration_since(tokio::time::Instant::now());
        store::format_time(now + chrono::Duration::from_std(left).unwrap_or_default())
    });
    let recorded = state
        .ctx
        .store
        .recorded_pause()
        .await
        .ok()
        .flatten()
        .filter(|t| t.as_str() > store::format_time(now).as_str());
    own.into_iter().chain(recorded).max()
}

/// `/readyz`: 200 when ready, 503 otherwise; the body says which check failed and why.
async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = assess(&state).await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness)).into_response()
}

/// `/metrics`: the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let readiness = assess(&state).await;
    let queue = match state.ctx.store.queue_summary().await {
        Ok(q) => q,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the state database failed: {e}\n"),
            )
                .into_response()
        }
    };
    let paused = readiness
        .checks
        .iter()
        .any(|c| c.name == "rate_limit" && !c.ok);
    let body = crate::metrics::render(
        &state.metrics,
        &crate::metrics::Snapshot {
            queue,
            paused,
            ready: readiness.ready,
        },
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

// ---- status page ----------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct SearchParams {
    q: Option<String>,
}

/// `/`: health, queue, last runs, dead letters, and the asset tracking search (`?q=`).
async fn status_page(
    State(state): State<AppState>,
    Query(params): Query<SearchParams>,
) -> Response {
    // Nothing the search looks for is longer than a uri may be (2048 characters).
    let query = params
        .q
        .map(|q| q.trim().chars().take(2048).collect::<String>())
        .filter(|q| !q.is_empty());
    let page = match gather(&state, query.as_deref()).await {
        Ok(page) => page,
        Err(e) => {
            let body = format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bynder-usage-sync: error</title></head>\
                 <body><h1>bynder-usage-sync</h1><p id=\"error\">The state database could not be read: {}</p></body></html>",
                escape(&crate::text::error_chain(&e))
            );
            return with_page_headers(
                (StatusCode::SERVICE_UNAVAILABLE, Html(body)).into_response(),
            );
        }
    };
    with_page_headers(Html(render_page(&state, &page, query.as_deref())).into_response())
}

/// A read-only page with no scripts: forbid everything it does not use.
fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What the page shows, read in one go.
struct Page {
    readiness: Readiness,
    queue: QueueSummary,
    runs: Vec<RunRecord>,
    last_success: Option<String>,
    dead: Vec<store::Operation>,
    /// The search's results, or why it was not run to the end.
    matches: Option<Result<Vec<Match>, &'static str>>,
}

/// Why the page could not be put together.
#[derive(Debug, thiserror::Error)]
enum PageError {
    #[error("the state database failed")]
    Database(#[from] sqlx::Error),
    /// The configured source could not be read; `reading` names it.
    #[error("{reading}")]
    Source {
        reading: String,
        #[source]
        source: sqlx::Error,
    },
}

async fn gather(state: &AppState, query: Option<&str>) -> Result<Page, PageError> {
    let store = &state.ctx.store;
    let readiness = assess(state).await;
    let queue = store.queue_summary().await?;
    let runs = store.recent_runs(LISTED).await?;
    let last_success = store.last_successful_reconcile().await?;
    let dead = store.first_dead_letters(LISTED).await?;
    let matches = match query {
        Some(q) => Some(bounded_search(state, q).await?),
        None => None,
    };
    Ok(Page {
        readiness,
        queue,
        runs,
        last_success,
        dead,
        matches,
    })
}

/// [`search`], unless [`SEARCHES_AT_ONCE`] are running already, and never longer than
/// [`SEARCH_TIME`]. The `Err` inside says why there are no results.
async fn bounded_search(
    state: &AppState,
    q: &str,
) -> Result<Result<Vec<Match>, &'static str>, PageError> {
    bounded(&state.searches, SEARCH_TIME, search(&state.ctx, q)).await
}

/// `work` with a permit of `permits` (none free: refused at once) and at most `limit` long.
async fn bounded<T, E>(
    permits: &Semaphore,
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<Result<T, &'static str>, E> {
    let Ok(_permit) = permits.try_acquire() else {
        return Ok(Err(
            "Too many searches are running at once: try again in a moment.",
        ));
    };
    match tokio::time::timeout(limit, work).await {
        Ok(done) => done.map(Ok),
        Err(_) => Ok(Err(
            "The search took longer than 5 seconds and was stopped: search for a whole asset id \
             or uri, or a longer part of a uri.",
        )),
    }
}

/// One (asset id, uri) the search found, as the CMS, the recorded state and the queue see it.
#[derive(Default)]
struct Match {
    asset_id: Vec<u8>,
    uri: Vec<u8>,
    /// The CMS row, when the source has one.
    cms: Option<CmsRow>,
    recorded: Option<Recorded>,
    operation: Option<Queued>,
}

struct CmsRow {
    additional: Option<Vec<u8>>,
    /// Whether the key columns are TEXT (only those are ever sent).
    text_keys: bool,
}

struct Recorded {
    usage_id: Option<String>,
    additional: String,
    synced_at: String,
}

struct Queued {
    state: store::OperationState,
    action: String,
    additional: Option<String>,
    attempts: i64,
    last_error: Option<String>,
    next_attempt_at: String,
    uncertain: bool,
}

/// Search results by key, in key order.
type Found = BTreeMap<(Vec<u8>, Vec<u8>), Match>;

/// The match for a key; asset ids that differ only in letter case are one key, as in the plan.
fn slot(found: &mut Found, asset_id: Vec<u8>, uri: Vec<u8>) -> &mut Match {
    found
        .entry((asset_id.to_ascii_lowercase(), uri.clone()))
        .or_insert_with(|| Match {
            asset_id,
            uri,
            ..Match::default()
        })
}

/// Every key whose asset id is `q` (any case), whose uri is `q`, or (for 3 characters or more)
/// whose uri contains `q`: in the CMS rows as the configured source yields them, the recorded
/// usages and the queue. The default table is searched with one query; another file or a custom
/// `source.query` is read through in full (seconds on a million rows).
async fn search(ctx: &Context, q: &str) -> Result<Vec<Match>, PageError> {
    use futures::TryStreamExt;
    let substring = q.chars().count() >= 3;
    let hit = |asset_id: &[u8], uri: &[u8]| {
        let uri = String::from_utf8_lossy(uri);
        String::from_utf8_lossy(asset_id).eq_ignore_ascii_case(q)
            || uri == q
            || (substring && uri.contains(q))
    };
    let mut found = Found::new();

    let default_source = ctx.config.source.is_state_table();
    let limit = SEARCH_LIMIT as i64 + 1;
    if default_source {
        // The table in the state database: one filtered query, no full read.
        for row in ctx.store.search_cms_rows(q, substring, limit).await? {
            let m = slot(&mut found, row.asset_id, row.uri);
            m.cms = Some(CmsRow {
                additional: row.additional,
                text_keys: row.text_keys,
            });
        }
    } else {
        // Another file or a custom query: only the source's own read-only connection may run it,
        // so read it through (in full, in key order) and filter here.
        let mut rows = ctx.source.stream_rows();
        while let Some(row) = rows.try_next().await.map_err(|source| PageError::Source {
            reading: ctx.source.reading().to_owned(),
            source,
        })? {
            let asset_id = row.raw.asset_id.clone().unwrap_or_default();
            let uri = row.raw.uri.clone().unwrap_or_default();
            if !hit(&asset_id, &uri) {
                continue;
            }
            let m = slot(&mut found, asset_id, uri);
            // A key listed twice by a custom query: the plan keeps the first, and so does the page.
            m.cms.get_or_insert(CmsRow {
                additional: row.raw.additional,
                text_keys: row.text_keys,
            });
            if found.len() > SEARCH_LIMIT {
                break;
            }
        }
    }

    for row in ctx.store.search_recorded(q, substring, limit).await? {
        let m = slot(&mut found, row.asset_id, row.uri);
        m.recorded = Some(Recorded {
            usage_id: row.usage_id,
            additional: row.additional,
            synced_at: row.synced_at,
        });
    }
    for row in ctx.store.search_operations(q, substring, limit).await? {
        let m = slot(&mut found, row.asset_id, row.uri);
        m.operation = Some(Queued {
            state: row.state,
            action: row.action,
            additional: row.additional,
            attempts: row.attempts,
            last_error: row.last_error,
            next_attempt_at: row.next_attempt_at,
            uncertain: row.uncertain,
        });
    }
    Ok(found.into_values().take(SEARCH_LIMIT + 1).collect())
}

/// How a key stands, in a word (a CSS class) and a sentence.
fn describe(m: &Match, uri_prefixes: &[String]) -> (&'static str, String) {
    if let Some(op) = &m.operation {
        let note = match op.additional.as_deref() {
            Some(a) if !a.is_empty() => format!(" with note \u{201c}{a}\u{201d}"),
            _ => String::new(),
        };
        let what = match (op.action.as_str(), m.recorded.is_some()) {
            ("delete", _) => "delete from Bynder".to_owned(),
            (_, true) => format!("update in Bynder{note}"),
            (_, false) => format!("create in Bynder{note}"),
        };
        let error = op
            .last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default();
        return match op.state {
            store::OperationState::Dead => (
                "bad",
                format!(
                    "dead letter ({what}): Bynder refused it for good{error}. It is retried when \
                     its CMS row changes, or with `queue retry`"
                ),
            ),
            store::OperationState::InFlight => ("wait", format!("being sent now: {what}")),
            _ => (
                "wait",
                format!(
                    "queued: {what}; {} attempt(s) so far, next not before {}{}{error}",
                    op.attempts,
                    op.next_attempt_at,
                    if op.uncertain {
                        "; Bynder is read back first (an earlier answer was lost)"
                    } else {
                        ""
                    }
                ),
            ),
        };
    }
    match &m.cms {
        None if m.recorded.is_some() => (
            "wait",
            "no longer in the CMS: the next reconcile deletes it from Bynder".to_owned(),
        ),
        None => ("wait", "nothing recorded".to_owned()),
        Some(row) => {
            let raw = RawRow {
                asset_id: Some(m.asset_id.clone()),
                uri: Some(m.uri.clone()),
                additional: row.additional.clone(),
            };
            let parsed = match row.text_keys {
                true => Reference::parse(&raw, uri_prefixes, &[]),
                false => Err(SkipReason::NotText),
            };
            match (parsed, &m.recorded) {
                (Err(reason), _) => ("bad", format!("skipped, never sent: {reason}")),
                (Ok(r), Some(rec)) if rec.additional == r.additional => {
                    ("ok", "in Bynder, up to date".to_owned())
                }
                (Ok(_), Some(_)) => (
                    "wait",
                    "changed in the CMS: the next reconcile updates it in Bynder".to_owned(),
                ),
                (Ok(_), None) => (
                    "wait",
                    "not in Bynder yet: the next reconcile creates it".to_owned(),
                ),
            }
        }
    }
}

// ---- rendering ------------------------------------------------------------------------------

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` escaped, cut to [`SHOWN`] characters: a uri, note or error of any length cannot make
/// the page huge.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        None => escape(text),
        Some((cut, _)) => format!(
            "{}… ({} more characters)",
            escape(&text[..cut]),
            text[cut..].chars().count()
        ),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:84rem;padding:0 1rem;color:#1d2330}\
h1{font-size:1.4rem;margin:0}h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #d8dce4}\
.meta{color:#5a6272;margin:.2rem 0 0}table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;\
padding:.3rem .5rem;border-bottom:1px solid #eceef2}th{font-weight:600;background:#f5f6f9}\
td.mono,span.mono{font-family:ui-monospace,monospace;font-size:.85rem;overflow-wrap:anywhere}\
#results{table-layout:fixed}#results td{overflow-wrap:anywhere}\
.ok{color:#116b2f}.bad{color:#a1221b}.wait{color:#8a5a00}p.state{font-size:1.2rem;font-weight:700;margin:.4rem 0}\
form{display:flex;gap:.5rem;margin:.5rem 0}input[type=search]{flex:1;padding:.4rem;font:inherit}button{font:inherit;padding:.4rem 1rem}\
footer{margin-top:2rem;color:#5a6272;font-size:.85rem}";

fn render_page(state: &AppState, page: &Page, query: Option<&str>) -> String {
    let config = &state.ctx.config;
    let mut portal = config.bynder.base_url.clone();
    // Never show a password someone put in the URL.
    let _ = portal.set_username("");
    let _ = portal.set_password(None);
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>bynder-usage-sync: {}</title><style>{STYLE}</style></head><body>\
         <header><h1>bynder-usage-sync</h1><p class=\"meta\">version {} · portal <span class=\"mono\">{}</span> · \
         integration <span class=\"mono\" id=\"integration\">{}</span> · database <span class=\"mono\">{}</span> · \
         up since {}</p></header>",
        if page.readiness.ready { "ready" } else { "NOT READY" },
        escape(env!("CARGO_PKG_VERSION")),
        escape(portal.as_str()),
        escape(&config.bynder.integration_id),
        escape(&state.ctx.store.describe()),
        escape(&store::format_time(state.health.started_at())),
    );

    // Health
    let (class, word) = if page.readiness.ready {
        ("ok", "Ready")
    } else {
        ("bad", "Not ready")
    };
    let _ = write!(
        h,
        "<section id=\"health\"><h2>Health</h2><p class=\"state {class}\" id=\"readiness\">{word}</p>\
         <table><tbody>"
    );
    for check in &page.readiness.checks {
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}</th><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(check.name),
            if check.ok { "ok" } else { "bad" },
            if check.ok { "ok" } else { "failing" },
            shown(&check.detail)
        );
    }
    let last_run = state
        .health
        .last_run()
        .map(|r| {
            format!(
                "{} {} at {}{}",
                r.command,
                r.outcome,
                store::format_time(r.finished_at),
                r.message.map(|m| format!(": {m}")).unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "none since start".to_owned());
    let _ = write!(
        h,
        "<tr><th scope=\"row\">last run</th><td></td><td id=\"last-run\">{}</td></tr>\
         <tr><th scope=\"row\">last successful reconcile</th><td></td><td id=\"last-success\">{}</td></tr>\
         <tr><th scope=\"row\">schedule</th><td></td><td><span class=\"mono\">{}</span> (reconcile), \
         <span class=\"mono\">{}</span> (drift repair); cron with seconds, UTC</td></tr>\
         </tbody></table></section>",
        shown(&last_run),
        escape(page.last_success.as_deref().unwrap_or("never")),
        escape(&config.sync.schedule),
        escape(&config.sync.verify_schedule),
    );

    render_search(&mut h, page, query, &config.sync.uri_prefixes);

    // Queue
    let q = &page.queue;
    let _ = write!(
        h,
        "<section id=\"queue\"><h2>Queue</h2><table><tbody>\
         <tr><th scope=\"row\">pending</th><td id=\"queue-pending\">{}</td></tr>\
         <tr><th scope=\"row\">in flight</th><td id=\"queue-in-flight\">{}</td></tr>\
         <tr><th scope=\"row\">dead letters</th><td id=\"queue-dead\" class=\"{}\">{}</td></tr>\
         <tr><th scope=\"row\">oldest queued since</th><td>{}</td></tr></tbody></table></section>",
        q.pending,
        q.in_flight,
        if q.dead > 0 { "bad" } else { "ok" },
        q.dead,
        escape(q.oldest_pending_at.as_deref().unwrap_or("-")),
    );

    // What the daemon learned about the portal
    h.push_str("<section id=\"portal-profile\"><h2>Portal profile</h2>");
    let facts = state.ctx.profile.facts();
    if facts.is_empty() {
        h.push_str(
            "<p>Nothing learned yet: runs learn as they go, <code>probe</code> learns it all.</p>",
        );
    } else {
        h.push_str("<table><thead><tr><th>behaviour</th><th>value</th><th>learned</th><th>how</th></tr></thead><tbody>");
        for l in facts {
            let _ = write!(
                h,
                "<tr id=\"profile-{}\"><th scope=\"row\">{}</th><td class=\"mono\">{}</td><td>{}</td><td>{}</td></tr>",
                l.fact.key(),
                escape(l.fact.question()),
                shown(&l.value),
                escape(&l.learned_at),
                shown(&l.evidence)
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");

    // Runs
    h.push_str("<section id=\"runs\"><h2>Last runs</h2>");
    if page.runs.is_empty() {
        h.push_str("<p>No run yet.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>#</th><th>command</th><th>started</th><th>outcome</th>\
             <th>+ / ~ / −</th><th>sent ok</th><th>failed</th><th>skipped rows</th><th>requests</th></tr></thead><tbody>",
        );
        for r in &page.runs {
            let outcome = r.outcome.as_deref().unwrap_or("running or stopped");
            let class = match outcome {
                "converged" | "nothing_to_do" => "ok",
                "partial" | "running or stopped" => "wait",
                _ => "bad",
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"{class}\">{}{}</td>\
                 <td>{} / {} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.id,
                escape(&r.command),
                escape(&r.started_at),
                escape(outcome),
                r.message
                    .as_deref()
                    .map(|m| format!("<br><small>{}</small>", shown(m)))
                    .unwrap_or_default(),
                r.creates,
                r.updates,
                r.deletes,
                r.succeeded,
                r.failed,
                r.skipped_rows,
                r.requests
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");

    // Dead letters
    h.push_str("<section id=\"dead-letters\"><h2>Dead letters</h2>");
    if page.dead.is_empty() {
        h.push_str("<p class=\"ok\">None.</p>");
    } else {
        h.push_str(
            "<p>Bynder refused these for good. Each is retried when its CMS row changes, or with \
             <span class=\"mono\">bynder-usage-sync queue retry</span>.</p><table><thead><tr><th>id</th>\
             <th>asset id</th><th>uri</th><th>action</th><th>attempts</th><th>reason</th><th>since</th></tr></thead><tbody>",
        );
        for d in &page.dead {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"mono id\">{}</td><td class=\"mono uri\">{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td class=\"mono\">{}</td></tr>",
                d.id,
                shown(&d.asset_id),
                shown(&d.uri),
                match d.target {
                    crate::plan::Target::Delete => "delete",
                    crate::plan::Target::Upsert(_) => "upsert",
                },
                d.attempts,
                shown(d.last_error.as_deref().unwrap_or("")),
                escape(&d.updated_at)
            );
        }
        h.push_str("</tbody></table>");
        if q.dead > page.dead.len() as i64 {
            let _ = write!(
                h,
                "<p>… and {} more (<span class=\"mono\">queue list --dead</span>).</p>",
                q.dead - page.dead.len() as i64
            );
        }
    }
    h.push_str(
        "</section><footer>Read-only. Machine-readable: <a href=\"/readyz\">/readyz</a>, \
         <a href=\"/metrics\">/metrics</a>.</footer></body></html>",
    );
    h
}

fn render_search(h: &mut String, page: &Page, query: Option<&str>, uri_prefixes: &[String]) {
    let _ = write!(
        h,
        "<section id=\"search\"><h2>Asset tracking search</h2>\
         <form method=\"get\" action=\"/\" role=\"search\"><label for=\"q\">Asset id or uri</label>\
         <input type=\"search\" id=\"q\" name=\"q\" value=\"{}\" placeholder=\"C078E8EE-C13A-4DA5-86EC8D6F335364EB or https://…\">\
         <button type=\"submit\">Search</button></form>",
        escape(query.unwrap_or(""))
    );
    let (Some(q), Some(matches)) = (query, &page.matches) else {
        h.push_str(
            "<p>Where an asset is used, according to the CMS, and whether Bynder has it.</p></section>",
        );
        return;
    };
    let matches = match matches {
        Ok(matches) => matches,
        Err(why) => {
            let _ = write!(
                h,
                "<p id=\"search-refused\" class=\"wait\">{}</p></section>",
                escape(why)
            );
            return;
        }
    };
    if matches.is_empty() {
        let _ = write!(
            h,
            "<p id=\"no-match\">Nothing in the CMS table, the recorded usages or the queue matches <strong>{}</strong>.</p></section>",
            shown(q)
        );
        return;
    }
    let _ = write!(
        h,
        "<p id=\"match-count\">{}{} match(es) for <strong>{}</strong>.</p>\
         <table id=\"results\"><colgroup><col style=\"width:19%\"><col style=\"width:18%\">\
         <col style=\"width:25%\"><col style=\"width:18%\"><col style=\"width:20%\"></colgroup><thead><tr><th>asset id</th><th>uri</th><th>state</th><th>in the CMS</th><th>in Bynder</th></tr></thead><tbody>",
        if matches.len() > SEARCH_LIMIT { "first " } else { "" },
        matches.len().min(SEARCH_LIMIT),
        shown(q)
    );
    for m in matches.iter().take(SEARCH_LIMIT) {
        let cms = match &m.cms {
            None => "no row".to_owned(),
            Some(row) => format!(
                "row{}",
                row.additional
                    .as_deref()
                    .filter(|a| !a.is_empty())
                    .map(|a| format!(", note \u{201c}{}\u{201d}", lossy(a)))
                    .unwrap_or_default(),
            ),
        };
        let bynder = match &m.recorded {
            None => "not recorded".to_owned(),
            Some(r) => format!(
                "recorded, usage id {}{}, confirmed {}",
                r.usage_id.as_deref().unwrap_or("unknown"),
                if r.additional.is_empty() {
                    String::new()
                } else {
                    format!(", note \u{201c}{}\u{201d}", r.additional)
                },
                r.synced_at
            ),
        };
        let (class, summary) = describe(m, uri_prefixes);
        let _ = write!(
            h,
            "<tr class=\"result\"><td class=\"mono id\">{}</td><td class=\"mono uri\">{}</td>\
             <td class=\"state {class}\">{}</td><td>{}</td><td class=\"bynder\">{}</td></tr>",
            shown(&lossy(&m.asset_id)),
            shown(&lossy(&m.uri)),
            shown(&summary),
            shown(&cms),
            shown(&bynder),
        );
    }
    h.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_every_character_that_means_something_in_html() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(escape("plain C078E8EE-1"), "plain C078E8EE-1");
    }

    /// REGRESSION: a uri, note or portal error of any length was shown whole on the page.
    #[test]
    fn long_values_are_cut_and_say_how_much_was_cut() {
        let long = "é".repeat(SHOWN + 5);
        let cut = shown(&long);
        assert!(cut.starts_with(&"é".repeat(SHOWN)), "{cut}");
        assert!(cut.ends_with("… (5 more characters)"), "{cut}");
        assert_eq!(shown("<b>"), "&lt;b&gt;");
    }

    /// REGRESSION: a search had no time limit; a slow one held its database connection and
    /// its page for as long as it took.
    #[tokio::test(start_paused = true)]
    async fn a_search_that_takes_too_long_is_stopped_and_one_over_the_limit_is_refused() {
        let permits = Semaphore::new(1);
        let slow = bounded(
            &permits,
            SEARCH_TIME,
            std::future::pending::<Result<(), ()>>(),
        );
        assert!(matches!(slow.await, Ok(Err(why)) if why.contains("longer than 5 seconds")));
        let held = permits
            .try_acquire()
            .expect("the stopped search gave its permit back");
        let refused = bounded(&permits, SEARCH_TIME, async { Ok::<_, ()>(()) }).await;
        assert!(matches!(refused, Ok(Err(why)) if why.contains("Too many searches")));
        drop(held);
        let answered = bounded(&permits, SEARCH_TIME, async { Ok::<_, ()>(7) }).await;
        assert_eq!(answered, Ok(Ok(7)));
    }

    #[test]
    fn ready_only_when_database_credentials_and_rate_limit_are_all_fine() {
        let ok = readiness(
            Ok(()),
            &CredentialState::Accepted,
            None,
            false,
            &Role::Single,
        );
        assert!(ok.ready, "{ok:?}");
        assert_eq!(ok.checks.len(), 3);

        let rejected = readiness(
            Ok(()),
            &CredentialState::Rejected("Bynder rejected the credentials (401)".into()),
            None,
            false,
            &Role::Single,
        );
        assert!(!rejected.ready);
        assert!(rejected
            .checks
            .iter()
            .any(|c| c.name == "credentials" && !c.ok && c.detail.contains("401")));

        assert!(
            !readiness(
                Ok(()),
                &CredentialState::Unchecked,
                None,
                false,
                &Role::Single
            )
            .ready
        );
        let paused = readiness(
            Ok(()),
            &CredentialState::Accepted,
            Some("2030-01-01T00:00:00.000Z"),
            false,
            &Role::Single,
        );
        assert!(!paused.ready);
        assert!(paused.checks[2].detail.contains("2030-01-01"));
        assert!(
            !readiness(
                Err("locked".into()),
                &CredentialState::Accepted,
                None,
                false,
                &Role::Single,
            )
            .ready
        );
        assert!(
            !readiness(
                Ok(()),
                &CredentialState::Accepted,
                None,
                true,
                &Role::Single
            )
            .ready
        );
        // A standby makes no request: ready while its database answers, whatever it knows of
        // the credentials, and saying who leads.
        let standby = Role::Standby {
            leader: Some("process 7 (run) on host-a".into()),
        };
        let ready = readiness(Ok(()), &CredentialState::Unchecked, None, false, &standby);
        assert!(ready.ready);
        assert_eq!(ready.role, "standby");
        assert!(ready.checks.iter().any(|c| c.detail.contains("host-a")));
        assert!(
            !readiness(
                Err("down".into()),
                &CredentialState::Unchecked,
                None,
                false,
                &standby
            )
            .ready
        );
    }

    fn key(additional: Option<&str>) -> Match {
        Match {
            asset_id: b"C078E8EE-C13A-4DA5-86EC8D6F33530001".to_vec(),
            uri: b"https://cms.example/pages/1".to_vec(),
            cms: Some(CmsRow {
                additional: additional.map(|a| a.as_bytes().to_vec()),
                text_keys: true,
            }),
            recorded: None,
            operation: None,
        }
    }

    #[test]
    fn a_search_result_says_where_the_key_stands() {
        let mut m = key(Some("hero"));
        assert_eq!(describe(&m, &[]).0, "wait");
        assert!(describe(&m, &[]).1.contains("creates"));
        m.recorded = Some(Recorded {
            usage_id: Some("u-1".into()),
            additional: "hero".into(),
            synced_at: "2026-01-01T00:00:00.000Z".into(),
        });
        assert_eq!(
            describe(&m, &[]),
            ("ok", "in Bynder, up to date".to_owned())
        );
        m.operation = Some(Queued {
            state: store::OperationState::Dead,
            action: "upsert".into(),
            additional: Some("hero 2".into()),
            attempts: 1,
            last_error: Some("Bynder does not know this asset (404)".into()),
            next_attempt_at: "2026-01-01T00:00:00.000Z".into(),
            uncertain: false,
        });
        let (class, text) = describe(&m, &[]);
        assert_eq!(class, "bad");
        assert!(
            text.contains("dead letter") && text.contains("404"),
            "{text}"
        );

        let outside = key(None);
        let (class, text) = describe(&outside, &["https://shop.example/".to_owned()]);
        assert_eq!(class, "bad");
        assert!(text.contains("skipped"), "{text}");

        let mut gone = key(None);
        gone.cms = None;
        gone.recorded = m.recorded.take();
        assert!(describe(&gone, &[]).1.contains("deletes it"));
    }
}

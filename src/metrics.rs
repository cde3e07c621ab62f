//! Prometheus metrics: installs the process-wide recorder that `/metrics` renders, declares every
//! metric with its help text, and refreshes the gauges that describe state rather than events
//! (queue depth, dead letters, the rate-limit pause) from the database at scrape time.
//!
//! It does not count anything itself: requests, 429s and latency are recorded by `bynder`, runs and
//! operations by `queue::drain`, token renewals by `auth`, each where the event happens.

use std::sync::{Mutex, OnceLock};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::{self, Store};

/// Upper bounds of the request-latency histogram, in seconds (Bynder answers in tens to hundreds
/// of milliseconds; the client gives up after `bynder.timeout`, 30 s by default).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The names `/metrics` always shows (a counter appears at zero before its first event, so an
/// alert on `rate()` or `increase()` works from the first scrape).
pub const ALWAYS_PRESENT: &[&str] = &[
    "bynder_usage_sync_rate_limited_total",
    "bynder_usage_sync_token_renewals_total",
    "bynder_usage_sync_queue_pending",
    "bynder_usage_sync_queue_in_flight",
    "bynder_usage_sync_dead_letters",
    "bynder_usage_sync_queue_oldest_age_seconds",
    "bynder_usage_sync_rate_limit_paused",
    "bynder_usage_sync_ready",
    "bynder_usage_sync_build_info",
];

/// The commit the binary was built from (`unknown` outside a git checkout).
pub const BUILD_COMMIT: &str = env!("BUILD_COMMIT");

/// Process metrics (CPU, memory, open descriptors), named `bynder_usage_sync_process_*`.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| metrics_process::Collector::new("bynder_usage_sync_"))
}

/// Installs the Prometheus recorder as the process-wide `metrics` recorder, once; later calls
/// return the same handle (the recorder cannot be replaced once set).
/// Why the Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("installing the Prometheus recorder")]
pub struct InstallError(#[source] metrics_exporter_prometheus::BuildError);

pub fn install() -> Result<PrometheusHandle, InstallError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    // A std mutex only serialises the first installation; it is never held across an await.
    static INSTALLING: Mutex<()> = Mutex::new(());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let _guard = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("bynder_usage_sync_request_duration_seconds".to_owned()),
            LATENCY_BUCKETS,
        )
        .map_err(InstallError)?
        .install_recorder()
        .map_err(InstallError)?;
    describe();
    process_collector().describe();
    metrics::gauge!(
        "bynder_usage_sync_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => BUILD_COMMIT
    )
    .set(1.0);
    metrics::counter!("bynder_usage_sync_rate_limited_total").increment(0);
    metrics::counter!("bynder_usage_sync_token_renewals_total").increment(0);
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Help text and units, rendered as `# HELP` lines.
fn describe() {
    describe_counter!(
        "bynder_usage_sync_requests_total",
        "Requests sent to Bynder, by HTTP method and status (\"error\" when no answer came)"
    );
    describe_histogram!(
        "bynder_usage_sync_request_duration_seconds",
        Unit::Seconds,
        "Time from sending a request to Bynder to its answer's headers, by HTTP method"
    );
    describe_counter!(
        "bynder_usage_sync_rate_limited_total",
        "429 answers from Bynder; each one pauses all sending for limits.block_pause"
    );
    describe_counter!(
        "bynder_usage_sync_token_renewals_total",
        "OAuth access tokens obtained (at expiry, or once after a 401)"
    );
    describe_counter!(
        "bynder_usage_sync_runs_total",
        "Finished runs (reconcile, verify, queue drain) by outcome; \"error\" when a run failed \
         before recording one"
    );
    describe_counter!(
        "bynder_usage_sync_operations_total",
        "Attempts at queued operations, by action (upsert, delete) and result (done, retry, dead)"
    );
    describe_gauge!(
        "bynder_usage_sync_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last reconcile that converged or found nothing to do"
    );
    describe_gauge!(
        "bynder_usage_sync_queue_pending",
        "Operations waiting in the queue (to send, or to retry after a backoff)"
    );
    describe_gauge!(
        "bynder_usage_sync_queue_in_flight",
        "Operations being sent right now (left over after a crash until the next start)"
    );
    describe_gauge!(
        "bynder_usage_sync_dead_letters",
        "Operations Bynder rejected for good; see the status page or `queue list --dead`"
    );
    describe_gauge!(
        "bynder_usage_sync_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest operation that is not a dead letter; 0 when the queue is empty"
    );
    describe_gauge!(
        "bynder_usage_sync_rate_limit_paused",
        "1 while a Bynder rate-limit block (429) pauses all sending"
    );
    describe_gauge!("bynder_usage_sync_ready", "1 when /readyz answers 200");
    describe_gauge!(
        "bynder_usage_sync_build_info",
        "Always 1; the labels name the version and the commit built"
    );
    describe_gauge!(
        "bynder_usage_sync_next_run_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the next scheduled run, by schedule (reconcile, verify)"
    );
}

/// Sets `bynder_usage_sync_last_success_timestamp_seconds` from the run history, so the gauge survives a
/// restart instead of being absent until the next success.
pub async fn seed_last_success(store: &Store) -> Result<(), sqlx::Error> {
    let runs = store.recent_runs(100).await?;
    let last = runs
        .iter()
        .filter(|r| {
            // A drain, or a plan of only the changed assets, does not say all of Bynder matches.
            !matches!(r.command.as_str(), "drain" | "changes")
                && matches!(r.outcome.as_deref(), Some("converged" | "nothing_to_do"))
        })
        .filter_map(|r| r.finished_at.as_deref())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .max();
    if let Some(t) = last {
        metrics::gauge!("bynder_usage_sync_last_success_timestamp_seconds")
            .set(t.timestamp() as f64);
    }
    Ok(())
}

/// What the scrape-time gauges show.
pub struct Snapshot {
    pub queue: store::QueueSummary,
    pub paused: bool,
    pub ready: bool,
}

/// Sets the scrape-time gauges and renders everything in the Prometheus text format.
pub fn render(handle: &PrometheusHandle, snapshot: &Snapshot) -> String {
    let queue = &snapshot.queue;
    metrics::gauge!("bynder_usage_sync_queue_pending").set(queue.pending as f64);
    metrics::gauge!("bynder_usage_sync_queue_in_flight").set(queue.in_flight as f64);
    metrics::gauge!("bynder_usage_sync_dead_letters").set(queue.dead as f64);
    let oldest = queue
        .oldest_pending_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64)
        .map(|ms| (ms / 1000.0).max(0.0))
        .unwrap_or(0.0);
    metrics::gauge!("bynder_usage_sync_queue_oldest_age_seconds").set(oldest);
    metrics::gauge!("bynder_usage_sync_rate_limit_paused")
        .set(f64::from(u8::from(snapshot.paused)));
    metrics::gauge!("bynder_usage_sync_ready").set(f64::from(u8::from(snapshot.ready)));
    process_collector().collect();
    // Histograms keep samples until upkeep folds them in; a scrape is the natural moment.
    handle.run_upkeep();
    handle.render()
}

/// Sets `bynder_usage_sync_next_run_timestamp_seconds{schedule=label}` from `schedule`, and
/// returns that time (`None`: the schedule never fires).
pub fn set_next_run(label: &'static str, schedule: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let next = crate::config::next_fire(schedule, chrono::Utc::now())?;
    metrics::gauge!("bynder_usage_sync_next_run_timestamp_seconds", "schedule" => label)
        .set(next.timestamp() as f64);
    Some(next)
}

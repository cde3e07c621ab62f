//! One reconcile run: read the CMS rows, plan against the recorded state and the queue, write the
//! plan to the queue in one transaction, then drain the queue against Bynder.
//!
//! Data flows one way: CMS rows → plan → queue → client → recorded state. The plan is a merge of
//! three streams sorted by (asset_id, uri), so memory does not grow with the table. An operation
//! is finished only once Bynder confirmed it, in the same transaction that updates the recorded
//! state; anything in flight when the process dies is read back before it is sent again.

use std::sync::Arc;

use anyhow::Context as _;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::bynder::{self, Client, SyncAnswer};
use crate::profile::{Fact, PortalProfile};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::config::{Config, RetrySettings, Strategy};
use crate::files::{LockError, Modes, RunLock};
use crate::model::{folded_key, key_order, same_asset, AssetId, Reference, SkipReason, UsageUri};
use crate::plan::{decide, Change, Decision, Desired, Queued, Target};
use crate::queue::{self, Next, RunEffect};
use crate::source::Source;
use crate::store::{self, Operation, RunCounts, SourceRow, Store, SyncBatch, SyncOpOutcome};
use crate::verify::{verify_assets, VerifyReport, VerifyStop};

/// How many rows of each kind a report keeps when not asked for everything.
pub const REPORT_SAMPLE: usize = 20;

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Name recorded in the run history (`resync`, `demo`…).
    pub command: &'static str,
    pub dry_run: bool,
    pub allow_mass_delete: bool,
    /// Keep every planned item in the report (for `--json`), not just a sample.
    pub keep_all_items: bool,
    /// Read Bynder back for every managed asset first and repair drift (`--verify`).
    pub verify: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            command: "resync",
            dry_run: false,
            allow_mass_delete: false,
            keep_all_items: false,
            verify: false,
        }
    }
}

/// Everything a run needs.
#[derive(Clone)]
pub struct Context {
    pub config: Config,
    pub store: Store,
    pub source: Source,
    pub client: Arc<Client>,
    /// What the daemon learned about this portal; the sending side reads and extends it.
    pub profile: Arc<PortalProfile>,
}

impl Context {
    /// The same connections and credentials with another configuration (a reload).
    pub fn with_config(&self, config: Config) -> Context {
        Context {
            config,
            ..self.clone()
        }
    }
}

/// How a run ended. Callers branch on it (exit codes, daemon health).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "message")]
pub enum RunOutcome {
    /// Bynder already matched: nothing was sent.
    NothingToDo,
    /// Everything planned or queued went through.
    Converged,
    /// Some operations of this run failed: they wait in the queue or became dead letters.
    Partial,
    /// The plan would delete more usages than `sync.max_deletes` allows; nothing was queued.
    MassDeleteRefused(String),
    /// The portal could not be reached; the operations stay queued.
    Unreachable(String),
    /// Bynder rejected the credentials; the operations stay queued.
    CredentialsRejected(String),
    /// `--dry-run`: the plan was shown, nothing changed.
    DryRun,
}

impl RunOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            RunOutcome::NothingToDo => "nothing_to_do",
            RunOutcome::Converged => "converged",
            RunOutcome::Partial => "partial",
            RunOutcome::MassDeleteRefused(_) => "mass_delete_refused",
            RunOutcome::Unreachable(_) => "unreachable",
            RunOutcome::CredentialsRejected(_) => "credentials_rejected",
            RunOutcome::DryRun => "dry_run",
        }
    }
}

/// One planned change, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedItem {
    pub asset_id: String,
    pub uri: String,
    pub change: Change,
    /// The note the usage will carry (absent for deletes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional: Option<String>,
}

/// A row that was not used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SkippedRow {
    pub asset_id: String,
    pub uri: String,
    pub reason: String,
}

/// What the plan found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlanReport {
    pub rows_read: u64,
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    pub verifies: u64,
    /// Queued operations made unnecessary by the CMS (e.g. a create whose row is gone again).
    pub cancelled: u64,
    /// Operations already queued from earlier runs, still to send.
    pub already_queued: u64,
    /// Dead letters left alone because their row did not change.
    pub dead_letters: u64,
    pub skipped: u64,
    pub items: Vec<PlannedItem>,
    pub skipped_rows: Vec<SkippedRow>,
    /// Whether `items` and `skipped_rows` hold everything or a sample.
    pub complete: bool,
}

/// What sending achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SendReport {
    pub succeeded: u64,
    /// Attempts that failed without making a dead letter: each was retried with backoff later in
    /// the run, or left queued for the next run (`left_pending`).
    pub failed_attempts: u64,
    /// Operations that became dead letters in this run.
    pub dead: u64,
    /// Operations still queued when the run ended.
    pub left_pending: u64,
    pub requests: u64,
}

/// The result of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub run_id: Option<i64>,
    #[serde(flatten)]
    pub outcome: RunOutcome,
    pub plan: PlanReport,
    pub sent: SendReport,
    /// Dead letters in the queue after the run (new and old; `sent.dead` counts the new).
    pub dead_letters: i64,
    /// What `--verify` found, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
}

/// Progress callbacks, so the CLI can draw a bar or print lines while the library stays silent.
pub trait Progress: Send + Sync {
    fn planned(&self, _total: u64) {}
    fn advanced(&self, _done: u64) {}
    fn finished(&self) {}
    /// Polled before each claim: when true, the drain stops taking operations and returns once
    /// those in flight are done (the daemon's graceful shutdown).
    fn stop_requested(&self) -> bool {
        false
    }
}

struct NoProgress;
impl Progress for NoProgress {}

/// Runs one reconcile with no progress display.
pub async fn reconcile_once(ctx: &Context, options: &RunOptions) -> anyhow::Result<RunReport> {
    reconcile_with_progress(ctx, options, Arc::new(NoProgress)).await
}

/// Runs one reconcile: plan, queue, send.
#[tracing::instrument(skip_all, fields(command = options.command, dry_run = options.dry_run))]
pub async fn reconcile_with_progress(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<RunReport> {
    let span = crate::telemetry::run_span(options.command, options.dry_run, options.verify);
    let result = reconcile_in_span(ctx, options, progress)
        .instrument(span.clone())
        .await;
    crate::telemetry::record_run(&span, &result);
    result
}

/// [`reconcile_with_progress`] inside the run's span.
async fn reconcile_in_span(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<RunReport> {
    if options.dry_run {
        if !options.verify {
            return Ok(RunReport {
                run_id: None,
                outcome: RunOutcome::DryRun,
                plan: plan_run(ctx, options, false).await?.0,
                sent: SendReport::default(),
                dead_letters: ctx.store.queue_summary().await?.dead,
                verify: None,
            });
        }
        // The drift repair rewrites the recorded state before planning: done on a private copy,
        // the plan shows what a real `--verify` run would send, and nothing real changes.
        let (_folder, snapshot) = ctx.store.snapshot(&ctx.config.database).await?;
        let scratch = Context {
            store: snapshot,
            ..ctx.clone()
        };
        let (verify, stop) = verify_assets(&scratch).await?;
        let outcome = match stop {
            None => RunOutcome::DryRun,
            Some(VerifyStop::CredentialsRejected) => credentials_rejected(ctx),
        };
        let plan = plan_run(&scratch, options, false).await?.0;
        let dead_letters = scratch.store.queue_summary().await?.dead;
        scratch.store.close().await;
        return Ok(RunReport {
            run_id: None,
            outcome,
            plan,
            sent: SendReport::default(),
            dead_letters,
            verify: Some(verify),
        });
    }

    let _lock = run_lock(ctx, options.command).await?;
    let recovered = ctx.store.recover_in_flight().await?;
    if recovered > 0 {
        tracing::warn!(recovered, "operations were in flight when a previous run stopped; they are read back before anything is re-sent");
    }
    let run_id = ctx.store.start_run(options.command).await?;
    crate::telemetry::record_run_id(run_id);
    match run_started(ctx, options, progress, run_id).await {
        Ok(report) => Ok(report),
        Err(error) => {
            // Leave an outcome in the run history, so `status` does not show it as running.
            let message = format!("{error:#}");
            if let Err(e) = ctx
                .store
                .finish_run(run_id, "failed", &RunCounts::default(), Some(&message))
                .await
            {
                tracing::warn!(error = %e, "could not record the failed run");
            }
            metrics::counter!("bynder_usage_sync_runs_total", "outcome" => "failed").increment(1);
            Err(error)
        }
    }
}

/// The part of a run after its record was started: verify, plan, send, record the outcome.
async fn run_started(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
    run_id: i64,
) -> anyhow::Result<RunReport> {
    let requests_before = ctx.client.requests_sent();

    let mut verify = None;
    let mut verify_stopped = false;
    if options.verify {
        let (report, stop) = verify_assets(ctx).await?;
        verify = Some(report);
        verify_stopped = stop.is_some();
    }
    let (plan, refused) = plan_run(ctx, options, true).await?;
    let (outcome, sent) = if verify_stopped {
        (credentials_rejected(ctx), SendReport::default())
    } else if let Some(why) = refused {
        (RunOutcome::MassDeleteRefused(why), SendReport::default())
    } else {
        let queued = ctx.store.queue_summary().await?.pending;
        progress.planned(queued as u64);
        let (stop, sent) = drain(ctx, run_id, progress.as_ref()).await?;
        progress.finished();
        let outcome = drain_outcome(ctx, stop, &sent).await?;
        (outcome, sent)
    };
    record_run(
        ctx,
        run_id,
        true,
        requests_before,
        outcome,
        plan,
        sent,
        verify,
    )
    .await
}

/// How a drain that stopped with `stop` (or ran out of work) ends the run.
async fn drain_outcome(
    ctx: &Context,
    stop: Option<RunEffect>,
    sent: &SendReport,
) -> anyhow::Result<RunOutcome> {
    let summary = ctx.store.queue_summary().await?;
    Ok(match stop {
        Some(RunEffect::StopCredentials) => credentials_rejected(ctx),
        Some(RunEffect::StopFatal(m)) => {
            RunOutcome::Unreachable(format!("{m}; the changes stay queued for the next run"))
        }
        Some(RunEffect::StopUnreachable(last)) => RunOutcome::Unreachable(format!(
            "{last} (tried {} times; the changes stay queued for the next run)",
            ctx.config.retry.max_attempts
        )),
        // Not stopping effects: drain never keeps them, but a run that had them is partial at most.
        Some(RunEffect::Continue | RunEffect::Paused { .. }) => RunOutcome::Partial,
        // Judged by what this run did: dead letters left from earlier runs wait for a human
        // (their own gauge and warning) and do not make every later run partial.
        None if summary.pending > 0 || summary.in_flight > 0 || sent.dead > 0 => {
            RunOutcome::Partial
        }
        None if sent.succeeded == 0 && sent.failed_attempts == 0 => RunOutcome::NothingToDo,
        None => RunOutcome::Converged,
    })
}

/// Completes the run's record, metrics and log line, and builds its report. `reconciled`: the
/// run planned from the CMS rows (a plain drain of the queue did not).
#[allow(clippy::too_many_arguments)]
async fn record_run(
    ctx: &Context,
    run_id: i64,
    reconciled: bool,
    requests_before: u64,
    outcome: RunOutcome,
    plan: PlanReport,
    mut sent: SendReport,
    verify: Option<VerifyReport>,
) -> anyhow::Result<RunReport> {
    let summary = ctx.store.queue_summary().await?;
    sent.left_pending = summary.pending as u64;
    sent.requests = ctx.client.requests_sent() - requests_before;
    let counts = RunCounts {
        creates: plan.creates as i64,
        updates: plan.updates as i64,
        deletes: plan.deletes as i64,
        skipped_rows: plan.skipped as i64,
        succeeded: sent.succeeded as i64,
        failed: (sent.dead + sent.left_pending) as i64,
        requests: sent.requests as i64,
    };
    let message = match &outcome {
        RunOutcome::MassDeleteRefused(m)
        | RunOutcome::Unreachable(m)
        | RunOutcome::CredentialsRejected(m) => Some(m.as_str()),
        _ => None,
    };
    ctx.store
        .finish_run(run_id, outcome.label(), &counts, message)
        .await?;
    let pruned = ctx.store.prune_runs(ctx.config.runs.keep).await?;
    if pruned > 0 {
        tracing::debug!(pruned, "old runs removed from the history (runs.keep)");
    }
    metrics::counter!("bynder_usage_sync_runs_total", "outcome" => outcome.label()).increment(1);
    // Only a run that read the CMS (not a plain drain of the queue) can say Bynder matches it.
    if reconciled && matches!(outcome, RunOutcome::Converged | RunOutcome::NothingToDo) {
        metrics::gauge!("bynder_usage_sync_last_success_timestamp_seconds")
            .set(chrono::Utc::now().timestamp() as f64);
    }
    tracing::info!(
        run_id,
        outcome = outcome.label(),
        creates = plan.creates,
        updates = plan.updates,
        deletes = plan.deletes,
        skipped = plan.skipped,
        succeeded = sent.succeeded,
        requests = sent.requests,
        "run finished"
    );
    Ok(RunReport {
        run_id: Some(run_id),
        outcome,
        plan,
        sent,
        dead_letters: summary.dead,
        verify,
    })
}

fn credentials_rejected(ctx: &Context) -> RunOutcome {
    RunOutcome::CredentialsRejected(format!(
        "Bynder rejected the credentials (401). Fix: {}",
        ctx.client.credentials().rejection_fix()
    ))
}

/// The run lock of this state database, waited for at most `database.lock_timeout`.
async fn run_lock(ctx: &Context, what: &str) -> Result<RunLock, LockError> {
    let database = &ctx.config.database;
    RunLock::acquire(
        ctx.store.path(),
        Modes::new(database.group_shared),
        database.lock_timeout,
        what,
    )
    .await
}

/// Sends what is already queued, without planning: the daemon calls it between reconciles so a
/// retry does not wait for the next schedule. Takes the run lock like a reconcile and records a
/// run named `drain`, but only when something is pending; `None` when nothing was.
#[tracing::instrument(skip_all)]
pub async fn drain_queue_once(
    ctx: &Context,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<Option<RunReport>> {
    let _lock = run_lock(ctx, "drain").await?;
    let recovered = ctx.store.recover_in_flight().await?;
    if recovered > 0 {
        tracing::warn!(recovered, "operations were in flight when a previous run stopped; they are read back before anything is re-sent");
    }
    if ctx.store.queue_summary().await?.pending == 0 {
        return Ok(None);
    }
    let span = crate::telemetry::run_span("drain", false, false);
    let run = async {
        let run_id = ctx.store.start_run("drain").await?;
        crate::telemetry::record_run_id(run_id);
        let requests_before = ctx.client.requests_sent();
        let (stop, sent) = drain(ctx, run_id, progress.as_ref()).await?;
        let outcome = drain_outcome(ctx, stop, &sent).await?;
        record_run(
            ctx,
            run_id,
            false,
            requests_before,
            outcome,
            PlanReport::default(),
            sent,
            None,
        )
        .await
    };
    let result = run.instrument(span.clone()).await;
    crate::telemetry::record_run(&span, &result);
    result.map(Some)
}

// ---- planning -------------------------------------------------------------------------------

type Key = (String, String);

/// One desired key from the source.
struct DesiredRow {
    key: Key,
    additional: Option<String>, // None: hold (invalid row)
}

/// Reads the source in key order, turning invalid rows into reports.
struct DesiredStream<'a> {
    rows: BoxStream<'a, Result<SourceRow, sqlx::Error>>,
    last: Option<Key>,
    uri_prefixes: Vec<String>,
    uri_schemes: Vec<String>,
    /// What reading the source means, for errors (`source.query` or the table, and the file).
    reading: &'a str,
}

impl DesiredStream<'_> {
    async fn next(
        &mut self,
        report: &mut PlanReport,
        keep_all: bool,
    ) -> anyhow::Result<Option<DesiredRow>> {
        while let Some(row) = self
            .rows
            .try_next()
            .await
            .context(self.reading.to_owned())?
        {
            report.rows_read += 1;
            let skip = |reason: SkipReason, report: &mut PlanReport| {
                let (asset_id, uri) = row.raw.display_key();
                report.skipped += 1;
                if keep_all || report.skipped_rows.len() < REPORT_SAMPLE {
                    report.skipped_rows.push(SkippedRow {
                        asset_id,
                        uri,
                        reason: reason.to_string(),
                    });
                }
            };
            if !row.text_keys {
                skip(SkipReason::NotText, report);
                continue;
            }
            let parsed = Reference::parse(&row.raw, &self.uri_prefixes, &self.uri_schemes);
            let (key, additional) = match parsed {
                Ok(r) => (
                    (r.asset_id.as_str().to_owned(), r.uri.as_str().to_owned()),
                    Some(r.additional),
                ),
                Err(reason) => {
                    let key = key_of(&row);
                    skip(reason.clone(), report);
                    match (key, reason) {
                        // The key is fine but the rest of the row is not: hold what Bynder has.
                        (
                            Some(key),
                            SkipReason::TooLong {
                                field: "additional",
                                ..
                            },
                        )
                        | (Some(key), SkipReason::ControlCharacter("additional"))
                        | (Some(key), SkipReason::NotUtf8("additional")) => (key, None),
                        _ => continue,
                    }
                }
            };
            if let Some(last) = &self.last {
                match key_order((&key.0, &key.1), (&last.0, &last.1)) {
                    std::cmp::Ordering::Equal if key.0 == last.0 => {
                        skip(SkipReason::Duplicate, report);
                        continue;
                    }
                    std::cmp::Ordering::Equal => {
                        skip(SkipReason::CaseVariant(last.0.clone()), report);
                        continue;
                    }
                    std::cmp::Ordering::Less => {
                        anyhow::bail!("internal error: source rows are not in key order")
                    }
                    std::cmp::Ordering::Greater => {}
                }
            }
            self.last = Some(key.clone());
            return Ok(Some(DesiredRow { key, additional }));
        }
        Ok(None)
    }
}

fn key_of(row: &SourceRow) -> Option<Key> {
    let text = |v: &Option<Vec<u8>>| {
        v.as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_owned)
    };
    let asset = AssetId::parse(&text(&row.raw.asset_id)?).ok()?;
    let uri = UsageUri::parse(&text(&row.raw.uri)?).ok()?;
    Some((asset.as_str().to_owned(), uri.as_str().to_owned()))
}

/// Plans the run by merging the source, the recorded state and the queue. When `write`, the
/// decisions are written to the queue in one transaction, unless the mass-delete guard refuses
/// (the reason is returned and nothing is written).
async fn plan_run(
    ctx: &Context,
    options: &RunOptions,
    write: bool,
) -> anyhow::Result<(PlanReport, Option<String>)> {
    let keep_all = options.keep_all_items;
    let prefixes = &ctx.config.sync.uri_prefixes;
    let mut report = PlanReport {
        complete: keep_all,
        ..PlanReport::default()
    };
    let mut desired = DesiredStream {
        rows: ctx.source.stream_rows(),
        last: None,
        uri_prefixes: prefixes.clone(),
        uri_schemes: ctx.config.sync.uri_schemes.clone(),
        reading: ctx.source.reading(),
    };
    let mut recorded = ctx.store.stream_recorded();
    let mut queued = ctx.store.stream_queued();

    let mut d_head = desired.next(&mut report, keep_all).await?;
    let mut r_head = recorded.try_next().await?;
    let mut q_head = queued.try_next().await?;
    let mut tx = if write {
        Some(ctx.store.pool().begin().await?)
    } else {
        None
    };
    let mut valid_rows = 0u64;

    loop {
        let keys = [
            d_head
                .as_ref()
                .map(|d| (d.key.0.as_str(), d.key.1.as_str())),
            r_head.as_ref().map(|(a, u, _)| (a.as_str(), u.as_str())),
            q_head.as_ref().map(|(a, u, _)| (a.as_str(), u.as_str())),
        ]
        .into_iter()
        .flatten()
        .min_by(|a, b| key_order(*a, *b))
        .map(|(a, u)| (a.to_owned(), u.to_owned()));
        let Some(key) = keys else { break };
        let is_key = |a: &str, u: &str| key_order((a, u), (&key.0, &key.1)).is_eq();

        let d = if d_head.as_ref().is_some_and(|d| is_key(&d.key.0, &d.key.1)) {
            let taken = d_head.take();
            d_head = desired.next(&mut report, keep_all).await?;
            taken
        } else {
            None
        };
        let r = if r_head.as_ref().is_some_and(|(a, u, _)| is_key(a, u)) {
            let taken = r_head.take().map(|(_, _, additional)| additional);
            r_head = recorded.try_next().await?;
            taken
        } else {
            None
        };
        let q: Option<Queued> = if q_head.as_ref().is_some_and(|(a, u, _)| is_key(a, u)) {
            let taken = q_head.take().map(|(_, _, q)| q);
            q_head = queued.try_next().await?;
            taken
        } else {
            None
        };

        // Keys outside the prefixes are not ours, whatever the recorded state says (the prefixes
        // may have been narrowed since): never touch them.
        if !crate::model::is_managed_uri(&key.1, prefixes) {
            // The drain sends whatever is queued: an operation queued before the prefixes were
            // narrowed (a pending one, or a dead letter `queue retry` could revive) must go.
            if q.is_some() {
                report.cancelled += 1;
                if let Some(tx) = tx.as_mut() {
                    store::cancel(tx, &key.0, &key.1).await?;
                }
            }
            continue;
        }
        let desired_state = match &d {
            Some(DesiredRow {
                additional: Some(a),
                ..
            }) => {
                valid_rows += 1;
                Desired::Present(a)
            }
            Some(DesiredRow {
                additional: None, ..
            }) => Desired::Hold,
            None => Desired::Absent,
        };
        let decision = decide(desired_state, r.as_deref(), q.as_ref());
        match decision {
            Decision::Nothing => {
                if let Some(q) = &q {
                    if q.dead {
                        report.dead_letters += 1;
                    } else {
                        report.already_queued += 1;
                        push_item(
                            &mut report,
                            keep_all,
                            &key,
                            queued_change(q, r.is_some()),
                            &q.target,
                        );
                    }
                }
            }
            Decision::Cancel => {
                report.cancelled += 1;
                if let Some(tx) = tx.as_mut() {
                    store::cancel(tx, &key.0, &key.1).await?;
                }
            }
            Decision::Enqueue { target, change } => {
                match change {
                    Change::Create => report.creates += 1,
                    Change::Update => report.updates += 1,
                    Change::Delete => report.deletes += 1,
                    Change::Verify => report.verifies += 1,
                }
                push_item(&mut report, keep_all, &key, change, &target);
                if let Some(tx) = tx.as_mut() {
                    store::enqueue(tx, &key.0, &key.1, &target).await?;
                }
            }
        }
    }
    drop((desired, recorded, queued));

    let refused = mass_delete_refusal(ctx, options, &report, valid_rows);
    if let Some(tx) = tx {
        if refused.is_some() {
            tx.rollback().await?;
        } else {
            tx.commit().await.context("writing the plan to the queue")?;
        }
    }
    if let Some(why) = &refused {
        tracing::warn!("{why}");
    }
    Ok((report, refused))
}

fn queued_change(q: &Queued, recorded: bool) -> Change {
    match (&q.target, recorded) {
        (_, _) if q.uncertain => Change::Verify,
        (Target::Delete, _) => Change::Delete,
        (Target::Upsert(_), true) => Change::Update,
        (Target::Upsert(_), false) => Change::Create,
    }
}

fn push_item(report: &mut PlanReport, keep_all: bool, key: &Key, change: Change, target: &Target) {
    if keep_all || report.items.len() < REPORT_SAMPLE {
        report.items.push(PlannedItem {
            asset_id: key.0.clone(),
            uri: key.1.clone(),
            change,
            additional: match target {
                Target::Upsert(a) => Some(a.clone()),
                Target::Delete => None,
            },
        });
    }
}

/// The guard against a truncated CMS table: too many deletes, or every row gone.
fn mass_delete_refusal(
    ctx: &Context,
    options: &RunOptions,
    report: &PlanReport,
    valid_rows: u64,
) -> Option<String> {
    if options.allow_mass_delete || report.deletes == 0 {
        return None;
    }
    let max = ctx.config.sync.max_deletes;
    if report.deletes > max {
        return Some(format!(
            "refusing to delete {} usages in one run (sync.max_deletes = {max}); nothing was sent. \
             If the CMS table really lost these rows on purpose, run again with --allow-mass-delete",
            report.deletes
        ));
    }
    if valid_rows == 0 {
        return Some(format!(
            "cms_asset_references has no usable rows, so every one of the {} recorded usages would be deleted; \
             nothing was sent. If the table is empty on purpose, run again with --allow-mass-delete",
            report.deletes
        ));
    }
    None
}

// ---- sending --------------------------------------------------------------------------------

/// How this run sends: the sync endpoint (with its current batch size) or per-usage calls.
/// Shared by the workers, since any of them may learn that the portal lacks the sync endpoint
/// or finds a batch too large.
struct Mode {
    sync: AtomicBool,
    /// `sync.strategy = "auto"`: fall back to per-usage calls when the sync endpoint is missing.
    auto: bool,
    batch_size: AtomicUsize,
}

impl Mode {
    /// The configured strategy, narrowed by what the portal profile says: in `auto`, a portal
    /// known to lack the sync endpoint, or whose sync answers confirm nothing, gets per-usage
    /// calls (their answers are certain, so nothing needs a read-back).
    fn new(config: &Config, profile: &PortalProfile) -> Self {
        let auto = config.sync.strategy == Strategy::Auto;
        let mut sync = config.sync.strategy != Strategy::PerUsage;
        if auto && profile.sync_endpoint_missing() {
            tracing::debug!(
                "the portal profile says the sync endpoint is missing: per-usage calls"
            );
            sync = false;
        } else if auto && profile.sync_answer_empty() {
            tracing::debug!(
                "the portal profile says sync answers confirm nothing: per-usage calls"
            );
            sync = false;
        }
        Mode {
            sync: AtomicBool::new(sync),
            auto,
            batch_size: AtomicUsize::new(config.sync.batch_size),
        }
    }

    fn uses_sync(&self) -> bool {
        self.sync.load(Ordering::Relaxed)
    }

    fn fall_back(&self, why: &str) {
        if self.sync.swap(false, Ordering::Relaxed) {
            tracing::warn!("{why}: sending per-usage calls for the rest of this run");
        }
    }

    /// Halves the batch size; false when it is already 1.
    fn halve(&self) -> bool {
        let current = self.batch_size.load(Ordering::Relaxed);
        if current <= 1 {
            return false;
        }
        let half = current / 2;
        self.batch_size.store(half, Ordering::Relaxed);
        tracing::info!(
            batch_size = half,
            "the portal found a sync batch too large; halving it"
        );
        true
    }
}

/// What one unit of work achieved.
#[derive(Debug, Default)]
struct Tally {
    done: u64,
    failed: u64,
    dead: u64,
    effects: Vec<RunEffect>,
}

impl Tally {
    fn add(&mut self, dead: bool, effect: RunEffect) {
        if dead {
            self.dead += 1;
        } else {
            self.failed += 1;
        }
        if effect != RunEffect::Continue {
            self.effects.push(effect);
        }
    }
}

/// Drains the queue with bounded concurrency until nothing is due for this run.
async fn drain(
    ctx: &Context,
    run_id: i64,
    progress: &dyn Progress,
) -> anyhow::Result<(Option<RunEffect>, SendReport)> {
    let concurrency = ctx.config.limits.concurrency;
    let max_attempts = ctx.config.retry.max_attempts;
    let mode = Arc::new(Mode::new(&ctx.config, &ctx.profile));
    let mut workers: JoinSet<anyhow::Result<Tally>> = JoinSet::new();
    let mut sent = SendReport::default();
    let mut stop: Option<RunEffect> = None;
    let mut done = 0u64;

    loop {
        while stop.is_none() && !progress.stop_requested() && workers.len() < concurrency {
            let client = ctx.client.clone();
            let store = ctx.store.clone();
            let retry = ctx.config.retry.clone();
            if mode.uses_sync() {
                let size = mode.batch_size.load(Ordering::Relaxed);
                match ctx
                    .store
                    .claim_sync_batch(run_id, max_attempts, size)
                    .await?
                {
                    Some(batch) => {
                        let mode = mode.clone();
                        let profile = ctx.profile.clone();
                        workers.spawn(
                            async move {
                                attempt_batch(&client, &store, &retry, &mode, &profile, batch).await
                            }
                            .instrument(crate::telemetry::current_run_span()),
                        );
                    }
                    None => break,
                }
            } else {
                match ctx.store.claim_next(run_id, max_attempts).await? {
                    Some(op) => {
                        workers.spawn(
                            async move { attempt(&client, &store, &retry, op).await }
                                .instrument(crate::telemetry::current_run_span()),
                        );
                    }
                    None => break,
                }
            }
        }
        if workers.is_empty() {
            if stop.is_some() || progress.stop_requested() {
                break;
            }
            match ctx.store.next_retry_at(run_id, max_attempts).await? {
                Some(at) => {
                    let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    continue;
                }
                None => break,
            }
        }
        let next_retry = ctx.store.next_retry_at(run_id, max_attempts).await?;
        let joined = match next_retry {
            Some(at) if stop.is_none() => {
                let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    joined = workers.join_next() => joined,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            _ => workers.join_next().await,
        };
        let Some(joined) = joined else { continue };
        let tally = joined.context("a worker panicked")??;
        sent.succeeded += tally.done;
        sent.dead += tally.dead;
        sent.failed_attempts += tally.failed;
        if tally.done + tally.dead > 0 {
            done += tally.done + tally.dead;
            progress.advanced(done);
        }
        for effect in tally.effects {
            match effect {
                RunEffect::Continue => {}
                RunEffect::Paused { until } => {
                    ctx.store
                        .set_setting("rate_limit_paused_until", Some(&store::format_time(until)))
                        .await?;
                }
                effect => stop = stop.or(Some(effect)),
            }
        }
    }
    if ctx.client.gate().paused_until().is_none() {
        ctx.store
            .set_setting("rate_limit_paused_until", None)
            .await?;
    }
    Ok((stop, sent))
}

fn action_label(target: &Target) -> &'static str {
    match target {
        Target::Upsert(_) => "upsert",
        Target::Delete => "delete",
    }
}

/// One attempt at one operation with per-usage calls; persists its outcome.
#[tracing::instrument(skip_all, fields(op = op.id, asset_id = %op.asset_id, uri = %op.uri))]
async fn attempt(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    op: Operation,
) -> anyhow::Result<Tally> {
    let mut uncertain = op.uncertain;
    let result = match &op.target {
        Target::Delete => match client.delete_usage(&op.asset_id, &op.uri).await {
            Ok(()) => {
                store.complete_delete(&op).await?;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Target::Upsert(additional) => {
            upsert(client, store, &op, additional, &mut uncertain, None).await?
        }
    };
    let mut tally = Tally::default();
    match result {
        Ok(()) => {
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                .increment(1);
            tally.done = 1;
        }
        Err(error) => {
            let (dead, effect) = fail(client, store, retry, &op, &error, uncertain).await?;
            tally.add(dead, effect);
        }
    }
    Ok(tally)
}

/// Records a failed attempt: back to pending with a backoff, or dead with its reason.
async fn fail(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    op: &Operation,
    error: &bynder::Error,
    uncertain: bool,
) -> anyhow::Result<(bool, RunEffect)> {
    let now = chrono::Utc::now();
    let pause_until = client
        .gate()
        .paused_until()
        .map(|t| {
            now + chrono::Duration::from_std(t - tokio::time::Instant::now()).unwrap_or_default()
        })
        .unwrap_or(now);
    let verdict = queue::verdict(
        error,
        op.run_attempts as u32,
        uncertain,
        retry,
        now,
        rand::random::<f64>(),
        pause_until,
    );
    let action = action_label(&op.target);
    match &verdict.next {
        Next::Retry {
            at,
            uncertain,
            counts,
        } => {
            tracing::debug!(%error, "attempt failed; will retry");
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action, "result" => "retry")
                .increment(1);
            store
                .fail_operation(op.id, false, *uncertain, *at, *counts, &error.to_string())
                .await?;
            Ok((false, verdict.effect))
        }
        Next::Dead { reason } => {
            tracing::warn!(asset_id = %op.asset_id, uri = %op.uri, %reason, "operation moved to the dead letters");
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action, "result" => "dead")
                .increment(1);
            store
                .fail_operation(op.id, true, false, now, true, reason)
                .await?;
            Ok((true, verdict.effect))
        }
    }
}

/// Puts claimed operations back, untried, for another way of sending them.
async fn release(store: &Store, ops: &[Operation], why: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    for op in ops {
        store
            .fail_operation(op.id, false, op.uncertain, now, false, why)
            .await?;
    }
    Ok(())
}

/// One sync-endpoint request for a batch of uris; persists its outcome. A change counts as done
/// only when the answer confirms it; the rest is settled by reading Bynder back ([`settle`]).
#[tracing::instrument(skip_all, fields(uris = batch.uris.len(), usages = batch.listing.len()))]
async fn attempt_batch(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    mode: &Mode,
    profile: &PortalProfile,
    batch: SyncBatch,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let answer = match client.sync_usages(&batch.uris, &batch.listing).await {
        Ok(answer) => answer,
        Err(error) => {
            fail_batch(
                client, store, retry, mode, profile, batch, error, &mut tally,
            )
            .await?;
            return Ok(tally);
        }
    };
    profile
        .learn(Fact::SyncEndpoint, "yes", "a sync request was answered")
        .await?;
    // Keys are compared ignoring the asset id's case: a portal may answer ids re-cased.
    let kept_uris: HashSet<&str> = batch.listing.iter().map(|u| u.uri.as_str()).collect();
    let mut outcomes = vec![SyncOpOutcome::Unsettled; batch.ops.len()];
    let mut rejected_listed = Vec::new();
    match &answer {
        SyncAnswer::Full(result) => {
            profile
                .learn(Fact::SyncAnswer, "full", "a sync answer listed its outcome")
                .await?;
            learn_id_case(profile, &batch, result).await?;
            let mut upserted: HashMap<(String, String), Option<String>> = HashMap::new();
            for a in &result.accepted {
                upserted.entry(folded_key(&a.asset_id, &a.uri)).or_default();
            }
            for c in &result.created {
                let id = c.id.as_ref().map(|id| match id {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                upserted.insert(folded_key(&c.asset_id, &c.uri), id);
            }
            let removed: HashSet<(String, String)> = result
                .removed
                .iter()
                .map(|r| folded_key(&r.asset_id, &r.uri))
                .collect();
            let rejected: HashMap<(String, String), &str> = result
                .rejected
                .iter()
                .map(|r| (folded_key(&r.asset_id, &r.uri), r.reason.as_str()))
                .collect();
            let op_keys: HashSet<(String, String)> = batch
                .ops
                .iter()
                .map(|op| folded_key(&op.asset_id, &op.uri))
                .collect();
            rejected_listed = batch
                .listing
                .iter()
                .filter(|u| {
                    let key = folded_key(&u.asset_id, &u.uri);
                    rejected.contains_key(&key) && !op_keys.contains(&key)
                })
                .map(|u| (u.asset_id.clone(), u.uri.clone()))
                .collect();
            for (op, outcome) in batch.ops.iter().zip(outcomes.iter_mut()) {
                let key = folded_key(&op.asset_id, &op.uri);
                // An uncertain key may hold duplicates the answer would not show: read it back.
                if op.uncertain {
                    continue;
                }
                *outcome = match &op.target {
                    Target::Upsert(_) if rejected.contains_key(&key) => {
                        SyncOpOutcome::Rejected(rejected[&key].to_owned())
                    }
                    Target::Upsert(additional) => match upserted.get(&key) {
                        Some(usage_id) => SyncOpOutcome::Upserted {
                            additional: additional.clone(),
                            usage_id: usage_id.clone(),
                        },
                        None => SyncOpOutcome::Unsettled,
                    },
                    Target::Delete if removed.contains(&key) => {
                        if kept_uris.contains(op.uri.as_str()) {
                            profile
                                .learn(
                                    Fact::SyncRemovesOmitted,
                                    "yes",
                                    "a sync answer listed an omitted asset as removed",
                                )
                                .await?;
                        }
                        SyncOpOutcome::Removed
                    }
                    Target::Delete => SyncOpOutcome::Unsettled,
                };
            }
        }
        SyncAnswer::Unconfirmed(what) => {
            tracing::info!(answer = %what, "the sync answer confirms nothing; the batch is read back");
            profile
                .learn(
                    Fact::SyncAnswer,
                    "empty",
                    &format!("a sync request was answered {what}"),
                )
                .await?;
            if mode.auto {
                mode.fall_back(&format!(
                    "the portal's sync answers confirm nothing ({what}), and per-usage answers do"
                ));
            }
        }
    }
    store
        .complete_sync_batch(&batch, &outcomes, &rejected_listed)
        .await?;
    let mut unsettled = Vec::new();
    for (op, outcome) in batch.ops.into_iter().zip(outcomes) {
        match outcome {
            SyncOpOutcome::Unsettled => {
                let omitted =
                    matches!(op.target, Target::Delete) && kept_uris.contains(op.uri.as_str());
                unsettled.push((op, omitted));
            }
            SyncOpOutcome::Rejected(_) => {
                metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "dead")
                    .increment(1);
                tracing::warn!(asset_id = %op.asset_id, uri = %op.uri, "Bynder rejected the usage; moved to the dead letters");
                tally.dead += 1;
            }
            _ => {
                metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                    .increment(1);
                tally.done += 1;
            }
        }
    }
    settle(client, store, retry, profile, unsettled, &mut tally).await?;
    Ok(tally)
}

/// A sync request that failed: the endpoint may be missing, the batch too large, or the failure
/// transient; the batch's operations are released or fail accordingly.
#[allow(clippy::too_many_arguments)]
async fn fail_batch(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    mode: &Mode,
    profile: &PortalProfile,
    batch: SyncBatch,
    error: bynder::Error,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    match error.status().map(|s| s.as_u16()) {
        Some(status @ (404 | 405 | 501)) if mode.auto => {
            profile
                .learn(
                    Fact::SyncEndpoint,
                    "no",
                    &format!("the sync endpoint answered {status}"),
                )
                .await?;
            mode.fall_back(&format!("the portal has no sync endpoint ({error})"));
            release(store, &batch.ops, "the sync endpoint is not available").await?;
        }
        Some(413) if mode.halve() => {
            release(store, &batch.ops, "the sync batch was too large").await?;
        }
        Some(400) if mode.auto => {
            mode.fall_back(&format!("the portal refused a sync batch ({error})"));
            release(store, &batch.ops, "the sync batch was refused").await?;
        }
        _ => {
            let maybe_applied = matches!(
                error.reaction(),
                bynder::Reaction::Retry {
                    maybe_applied: true
                }
            );
            for op in &batch.ops {
                // The batch may have been applied: the next attempt reads back first.
                let uncertain = op.uncertain || maybe_applied;
                let (dead, effect) = fail(client, store, retry, op, &error, uncertain).await?;
                tally.add(dead, effect);
            }
        }
    }
    Ok(())
}

/// Learns whether the portal answers asset ids as they were sent or re-cased.
async fn learn_id_case(
    profile: &PortalProfile,
    batch: &SyncBatch,
    result: &bynder::SyncResult,
) -> anyhow::Result<()> {
    let sent: HashMap<(String, String), &str> = batch
        .listing
        .iter()
        .map(|u| (folded_key(&u.asset_id, &u.uri), u.asset_id.as_str()))
        .collect();
    let answered = result
        .accepted
        .iter()
        .map(|a| (&a.asset_id, &a.uri))
        .chain(result.created.iter().map(|c| (&c.asset_id, &c.uri)));
    for (asset_id, uri) in answered {
        if let Some(ours) = sent.get(&folded_key(asset_id, uri)) {
            if *ours != asset_id.as_str() {
                profile
                    .learn(
                        Fact::AssetIdCase,
                        "recased",
                        &format!("sent {ours}, answered {asset_id}"),
                    )
                    .await?;
                return Ok(());
            }
            if ours.bytes().any(|b| b.is_ascii_alphabetic()) {
                profile
                    .learn(
                        Fact::AssetIdCase,
                        "preserved",
                        "a sync answer repeated an asset id as sent",
                    )
                    .await?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Settles operations a sync answer did not confirm, by the means that is certain: one read-back
/// per asset (`GET ?asset_id&integration_id`), then a create, or an explicit `DELETE` naming the
/// uri, where Bynder does not hold what the operation asks for. `omitted`: a delete of an asset
/// left out of a uri that keeps other usages, which the portal's sync may or may not remove;
/// where the profile says it does not, the delete is sent at once without a read-back.
async fn settle(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    profile: &PortalProfile,
    ops: Vec<(Operation, bool)>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut by_asset: BTreeMap<String, Vec<(Operation, bool)>> = BTreeMap::new();
    for (op, omitted) in ops {
        by_asset
            .entry(op.asset_id.to_ascii_lowercase())
            .or_default()
            .push((op, omitted));
    }
    for (_, ops) in by_asset {
        let known_kept = |(op, omitted): &(Operation, bool)| {
            *omitted && !op.uncertain && profile.sync_keeps_omitted()
        };
        let found = if ops.iter().all(known_kept) {
            None
        } else {
            match client.list_usages(&ops[0].0.asset_id).await {
                Ok(found) => Some(found),
                Err(error) => {
                    for (op, _) in &ops {
                        let uncertain = op.uncertain || matches!(op.target, Target::Upsert(_));
                        let (dead, effect) =
                            fail(client, store, retry, op, &error, uncertain).await?;
                        tally.add(dead, effect);
                    }
                    continue;
                }
            }
        };
        for (op, omitted) in ops {
            let on_uri: Option<Vec<bynder::Usage>> = found.as_ref().map(|found| {
                found
                    .iter()
                    .filter(|u| {
                        u.uri == op.uri
                            && (u.asset_id.is_empty() || same_asset(&u.asset_id, &op.asset_id))
                    })
                    .cloned()
                    .collect()
            });
            let mut uncertain = op.uncertain;
            let result = match (&op.target, on_uri) {
                (Target::Delete, on_uri) => {
                    if let (Some(on_uri), true, false) = (&on_uri, omitted, op.uncertain) {
                        let (value, evidence) = if on_uri.is_empty() {
                            (
                                "yes",
                                "a read-back found an omitted asset removed by the sync",
                            )
                        } else {
                            (
                                "no",
                                "a read-back found an omitted asset still held after the sync",
                            )
                        };
                        profile
                            .learn(Fact::SyncRemovesOmitted, value, evidence)
                            .await?;
                    }
                    if on_uri.is_some_and(|u| u.is_empty()) {
                        store.complete_delete(&op).await?;
                        Ok(())
                    } else {
                        match client.delete_usage(&op.asset_id, &op.uri).await {
                            Ok(()) => {
                                store.complete_delete(&op).await?;
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                (Target::Upsert(additional), on_uri) => {
                    uncertain = true;
                    upsert(client, store, &op, additional, &mut uncertain, on_uri).await?
                }
            };
            match result {
                Ok(()) => {
                    metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                        .increment(1);
                    tally.done += 1;
                }
                Err(error) => {
                    let (dead, effect) = fail(client, store, retry, &op, &error, uncertain).await?;
                    tally.add(dead, effect);
                }
            }
        }
    }
    Ok(())
}

/// Makes Bynder hold exactly one usage of ours for the key, with `additional`. When `uncertain`,
/// Bynder is read back first (or `found`, the usages already read back for the key, is used).
async fn upsert(
    client: &Client,
    store: &Store,
    op: &Operation,
    additional: &str,
    uncertain: &mut bool,
    found: Option<Vec<bynder::Usage>>,
) -> anyhow::Result<Result<(), bynder::Error>> {
    macro_rules! bynder {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    if *uncertain {
        // An earlier request may have reached Bynder: look before sending anything.
        let found: Vec<_> = match found {
            Some(found) => found,
            None => bynder!(client.list_usages(&op.asset_id).await)
                .into_iter()
                .filter(|u| {
                    u.uri == op.uri
                        && (u.asset_id.is_empty() || same_asset(&u.asset_id, &op.asset_id))
                })
                .collect(),
        };
        if let [only] = found.as_slice() {
            if only.additional == additional {
                store
                    .complete_upsert(op, additional, Some(&only.id))
                    .await?;
                return Ok(Ok(()));
            }
        }
        if !found.is_empty() {
            bynder!(client.delete_usage(&op.asset_id, &op.uri).await);
        }
        store.forget_recorded(&op.asset_id, &op.uri).await?;
        *uncertain = false;
    } else if store
        .recorded_additional(&op.asset_id, &op.uri)
        .await?
        .is_some()
    {
        // Bynder has no update: remove the old usage, then create the new one.
        bynder!(client.delete_usage(&op.asset_id, &op.uri).await);
        store.forget_recorded(&op.asset_id, &op.uri).await?;
    }
    match client.create_usage(&op.asset_id, &op.uri, additional).await {
        Ok(usage) => {
            store
                .complete_upsert(op, additional, Some(&usage.id))
                .await?;
            Ok(Ok(()))
        }
        Err(e) => {
            if matches!(
                e.reaction(),
                bynder::Reaction::Retry {
                    maybe_applied: true
                }
            ) {
                *uncertain = true;
            }
            Ok(Err(e))
        }
    }
}

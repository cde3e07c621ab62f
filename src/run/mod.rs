//! One run, as the command line, the scheduler and the tests start it: [`reconcile_once`] (read
//! the CMS rows, plan against the recorded state and the queue, write the plan to the queue in one
//! transaction, then drain the queue against Bynder; or skip the merge when nothing can have
//! changed), [`changes_once`] (the same for only the assets the change log names) and
//! [`drain_queue_once`] (send what is due),
//! with the run lock that keeps runs from overlapping, the run history, the outcome callers branch
//! on and the report they print.
//!
//! Data flows one way: CMS rows → plan ([`crate::plan::merge`]) → queue → client ([`crate::queue`])
//! → recorded state.

use std::sync::Arc;

use tracing::Instrument as _;

use crate::telemetry::count;

pub mod error;
mod planning;

pub use self::error::RunError;
pub use self::planning::CHANGED_ASSETS_PER_PLAN;
use self::planning::{plan_step, Planned, Planning};

use crate::app::Context;
use crate::files::{FileLock, LockError, LockTimeout, Modes};
use crate::plan::merge::{plan_run, PlanOptions, Scope};
use crate::queue::drain::drain;
use crate::queue::RunEffect;
use crate::store::lock::{AdvisoryLock, LockKind};
use crate::store::RunCounts;
use crate::verify::{verify_assets, VerifyReport, VerifyStop};

pub use crate::plan::merge::{PlanReport, PlannedItem, SkippedRow, REPORT_SAMPLE};
pub use crate::queue::drain::{Progress, SendReport};

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
    /// Skip the full merge when nothing can have changed since the last full pass
    /// (`--if-changed`, the daemon's scheduled reconcile); see [`unchanged_since_full_pass`].
    pub if_changed: bool,
}

impl RunOptions {
    /// What planning needs of these options; `write`: queue the plan (not a dry run's preview).
    pub(crate) fn plan(&self, write: bool) -> PlanOptions {
        PlanOptions {
            keep_all_items: self.keep_all_items,
            allow_mass_delete: self.allow_mass_delete,
            write,
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            command: "resync",
            dry_run: false,
            allow_mass_delete: false,
            keep_all_items: false,
            verify: false,
            if_changed: false,
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

struct NoProgress;

impl Progress for NoProgress {}

/// Runs one reconcile with no progress display.
pub async fn reconcile_once(ctx: &Context, options: &RunOptions) -> Result<RunReport, RunError> {
    reconcile_with_progress(ctx, options, Arc::new(NoProgress)).await
}

/// Runs one reconcile: plan, queue, send.
#[tracing::instrument(skip_all, fields(command = options.command, dry_run = options.dry_run))]
pub async fn reconcile_with_progress(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
) -> Result<RunReport, RunError> {
    let span = crate::telemetry::run_span(options.command, options.dry_run, options.verify);
    let result = reconcile_in_span(ctx, options, progress)
        .instrument(span.clone())
        .await;
    record_run_span(&span, result.as_ref().ok());
    result
}

/// [`reconcile_with_progress`] inside the run's span.
async fn reconcile_in_span(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
) -> Result<RunReport, RunError> {
    if options.dry_run {
        if !options.verify {
            return Ok(RunReport {
                run_id: None,
                outcome: RunOutcome::DryRun,
                plan: plan_run(ctx, options.plan(false), &Scope::FULL).await?.0,
                sent: SendReport::default(),
                dead_letters: ctx.store.queue_summary().await?.dead,
                verify: None,
            });
        }
        // The drift repair rewrites the recorded state before planning: done on a private copy,
        // the plan shows what a real `--verify` run would send, and nothing real changes.
        let (copy, snapshot) = ctx.store.snapshot(&ctx.config.database).await?;
        let scratch = Context {
            store: snapshot,
            ..ctx.clone()
        };
        let report = async {
            let (verify, stop) = verify_assets(&scratch).await?;
            let outcome = match stop {
                None => RunOutcome::DryRun,
                Some(VerifyStop::CredentialsRejected) => credentials_rejected(ctx),
            };
            let plan = plan_run(&scratch, options.plan(false), &Scope::FULL)
                .await?
                .0;
            let dead_letters = scratch.store.queue_summary().await?.dead;
            Ok(RunReport {
                run_id: None,
                outcome,
                plan,
                sent: SendReport::default(),
                dead_letters,
                verify: Some(verify),
            })
        }
        .await;
        // The copy goes whatever happened: a PostgreSQL one would otherwise stay behind.
        scratch.store.close().await;
        copy.discard().await;
        return report;
    }

    locked_run(ctx, options, progress, false)
        .await
        .map(|report| report.expect("a full run always runs"))
}

/// Takes the run lock and runs: a full pass, or (`changes`) a plan of what the change log names,
/// `None` when it names nothing.
async fn locked_run(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
    changes: bool,
) -> Result<Option<RunReport>, RunError> {
    let _lock = run_lock(ctx, options.command).await?;
    let planning = if changes {
        match ctx.store.pending_changes(CHANGED_ASSETS_PER_PLAN).await? {
            Some(changes) => Planning::Changes(changes),
            None => return Ok(None),
        }
    } else {
        Planning::Full
    };
    let recovered = ctx.store.recover_in_flight().await?;
    if recovered > 0 {
        tracing::warn!(recovered, "operations were in flight when a previous run stopped; they are read back before anything is re-sent");
    }
    let run_id = ctx.store.start_run(options.command).await?;
    crate::telemetry::record_run_id(run_id);
    match run_started(ctx, options, progress, run_id, planning).await {
        Ok(report) => Ok(Some(report)),
        Err(error) => {
            // Leave an outcome in the run history, so `status` does not show it as running.
            let message = crate::text::error_chain(&error);
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

/// Plans what the change log names so far (the daemon calls it within a fraction of a second of
/// a CMS write), queues it and sends it, under the run lock like any run; recorded as a run named
/// `changes`. `None`: the log was empty, or the source is not the captured table.
#[tracing::instrument(skip_all)]
pub async fn changes_once(
    ctx: &Context,
    progress: Arc<dyn Progress>,
) -> Result<Option<RunReport>, RunError> {
    if !ctx.source.captures_changes() {
        return Ok(None);
    }
    let options = RunOptions {
        command: "changes",
        ..RunOptions::default()
    };
    let span = crate::telemetry::run_span(options.command, false, false);
    let result = locked_run(ctx, &options, progress, true)
        .instrument(span.clone())
        .await;
    match &result {
        Ok(None) => {}
        Ok(Some(report)) => record_run_span(&span, Some(report)),
        Err(_) => record_run_span(&span, None),
    }
    result
}

/// The part of a run after its record was started: verify, plan, send, record the outcome.
async fn run_started(
    ctx: &Context,
    options: &RunOptions,
    progress: Arc<dyn Progress>,
    run_id: i64,
    planning: Planning,
) -> Result<RunReport, RunError> {
    let requests_before = ctx.client.requests_sent();

    let mut verify = None;
    let mut verify_stopped = false;
    if options.verify {
        let (report, stop) = verify_assets(ctx).await?;
        verify = Some(report);
        verify_stopped = stop.is_some();
    }
    let Planned {
        plan,
        refused,
        full,
        send,
    } = plan_step(ctx, options, planning).await?;
    let (outcome, sent) = if verify_stopped {
        (credentials_rejected(ctx), SendReport::default())
    } else if !send {
        let why = refused.expect("a plan not sent was refused");
        (RunOutcome::MassDeleteRefused(why), SendReport::default())
    } else {
        let queued = ctx.store.queue_summary().await?.pending;
        progress.planned(queued as u64);
        let (stop, sent) = drain(ctx, run_id, progress.as_ref()).await?;
        progress.finished();
        let outcome = match refused {
            // Sent what was not held back; the refusal is what the operator must see.
            Some(why) => RunOutcome::MassDeleteRefused(why),
            None => drain_outcome(ctx, stop, &sent).await?,
        };
        (outcome, sent)
    };
    record_run(
        ctx,
        run_id,
        full,
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
) -> Result<RunOutcome, RunError> {
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
/// run planned from all the CMS rows (a plain drain of the queue, or a plan of only the changed
/// assets, did not).
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
) -> Result<RunReport, RunError> {
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

/// The run lock, held while a run plans and sends (released when dropped).
#[allow(dead_code)]
enum RunLock {
    File(FileLock),
    Server(AdvisoryLock),
}

/// The run lock of this state database, waited for at most `database.lock_timeout`: a file
/// lock beside a SQLite file, an advisory lock in a PostgreSQL database.
async fn run_lock(ctx: &Context, what: &str) -> Result<RunLock, LockError> {
    let database = &ctx.config.database;
    let Some(pool) = ctx.store.postgres_pool() else {
        let file = ctx.store.file().expect("a SQLite store has a file");
        return FileLock::acquire(
            file,
            Modes::new(database.group_shared),
            database.lock_timeout,
            what,
        )
        .await
        .map(RunLock::File);
    };
    let failed = |source| LockError::Database {
        database: ctx.store.describe(),
        source,
    };
    match AdvisoryLock::acquire(pool, LockKind::Run, what, database.lock_timeout)
        .await
        .map_err(failed)?
    {
        Ok(lock) => Ok(RunLock::Server(lock)),
        Err(holder) => Err(LockTimeout {
            lock: format!("(an advisory lock in {})", ctx.store.describe()),
            waited: database.lock_timeout,
            holder,
        }
        .into()),
    }
}

/// Sends what is already queued, without planning: the daemon calls it between reconciles so a
/// retry does not wait for the next schedule. Takes the run lock like a reconcile and records a
/// run named `drain`, but only when something is pending; `None` when nothing was.
#[tracing::instrument(skip_all)]
pub async fn drain_queue_once(
    ctx: &Context,
    progress: Arc<dyn Progress>,
) -> Result<Option<RunReport>, RunError> {
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
    record_run_span(&span, result.as_ref().ok());
    result.map(Some)
}

/// Records how a run ended on its span: the outcome label (`failed` for an error), the plan's
/// and the sending's counts. Error messages are not recorded: they quote the portal. (Each field
/// is recorded once: a second value would be a second attribute of the same name.)
fn record_run_span(span: &tracing::Span, report: Option<&RunReport>) {
    let report = match report {
        Some(report) => report,
        None => {
            span.record("run.outcome", "failed");
            span.record("otel.status_code", "error");
            return;
        }
    };
    let outcome = &report.outcome;
    span.record("run.outcome", outcome.label());
    let plan = &report.plan;
    let sent = &report.sent;
    span.record("run.creates", count(plan.creates));
    span.record("run.updates", count(plan.updates));
    span.record("run.deletes", count(plan.deletes));
    span.record("run.skipped_rows", count(plan.skipped));
    span.record("run.succeeded", count(sent.succeeded));
    span.record("run.failed_attempts", count(sent.failed_attempts));
    span.record("run.dead_letters", count(sent.dead));
    span.record("run.left_pending", count(sent.left_pending));
    span.record("run.requests", count(sent.requests));
    let failed = matches!(
        outcome,
        RunOutcome::Unreachable(_) | RunOutcome::CredentialsRejected(_)
    );
    span.record("otel.status_code", if failed { "error" } else { "ok" });
}

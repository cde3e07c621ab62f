//! `run`: the daemon. Owns the schedule (a reconcile on `sync.schedule`, drift repair on
//! `sync.verify_schedule`, the queue drained in between), the watcher of the change log (a change
//! run within a fraction of a second of a CMS write), the one worker that runs those jobs one
//! at a time, the graceful shutdown, and the systemd notifications (READY, STATUS, WATCHDOG,
//! STOPPING).
//!
//! It decides nothing about usages: every run is `run`'s, the endpoints are `http`'s, and
//! the health they report is `health`'s (the worker writes it).
//!
//! Runs never overlap: the cron jobs only wake the worker (a tick that arrives while a run is
//! going is kept, once, for when it ends), and every run takes the run lock beside the database,
//! so a manual `resync` waits for the daemon's run and the daemon for it. The lock is released
//! between runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::app::Context;
use crate::bynder::Reaction;
use crate::config::{env_var, ConfigError, ConfigSource, ServerSettings, SyncSettings};
use crate::health::{CredentialState, Health};
use crate::run::RunError;
use crate::run::{self, Progress, RunOptions, RunOutcome, RunReport};
use crate::store;
use crate::text::error_chain;

/// How often the worker looks for queued operations whose retry is due (one indexed query).
pub const QUEUE_POLL: Duration = Duration::from_secs(1);

/// How often the watcher looks at the end of the change log (one look at its primary key).
pub const CHANGES_POLL: Duration = Duration::from_millis(100);

/// How often it looks while PostgreSQL notifies it of every committed CMS write: only for a
/// notification lost to a reconnect, and for change runs due again.
pub const CHANGES_POLL_NOTIFIED: Duration = Duration::from_secs(1);

/// How long the watcher polls at [`CHANGES_POLL`] after its notifications failed, before it
/// listens again.
const NOTIFICATIONS_RETRY: Duration = Duration::from_secs(5);

/// How long the watcher lets a burst of CMS writes gather after the first one it sees, so that
/// they are planned and sent together.
pub const CHANGES_COALESCE: Duration = Duration::from_millis(200);

/// The options of the scheduled drift repair (`sync.verify_schedule`): a reconcile that first
/// reads Bynder back for every managed asset, as `resync --verify` does.
fn verify_options() -> RunOptions {
    RunOptions {
        command: "verify",
        verify: true,
        ..RunOptions::default()
    }
}

/// The options of the scheduled reconcile (`sync.schedule`): it skips the full merge when nothing
/// can have changed since the last full pass (change capture planned every write since).
fn reconcile_options() -> RunOptions {
    RunOptions {
        command: "reconcile",
        if_changed: true,
        ..RunOptions::default()
    }
}

/// The options of the reconcile at start-up: always a full pass.
fn startup_options() -> RunOptions {
    RunOptions {
        if_changed: false,
        ..reconcile_options()
    }
}

// ---- start-up -------------------------------------------------------------------------------

/// Binds `server.listen`. Failing to is a configuration problem (exit 78): a port another
/// process holds, an address this host does not have, or a port below 1024.
pub async fn bind(settings: &ServerSettings) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(settings.listen).await.map_err(|e| {
        ConfigError::new(format!(
            "cannot listen on {} (`server.listen`, env {}): {e}. Fix: choose a free port and an \
             address of this host, e.g. \"127.0.0.1:9464\"",
            settings.listen,
            env_var("server.listen")
        ))
    })
}

/// A future that resolves at the first SIGTERM or SIGINT. The handlers are installed when this
/// is called, so a signal that arrives during start-up is not lost.
pub fn termination_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping");
    })
}

/// SIGHUP: read the configuration again and apply what can change while the daemon runs.
pub struct Reloader {
    source: ConfigSource,
    hangup: tokio::signal::unix::Signal,
}

impl Reloader {
    /// Installs the SIGHUP handler now: from here on a SIGHUP no longer ends the process.
    pub fn install(source: ConfigSource) -> std::io::Result<Reloader> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Reloader {
            source,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) {
        self.hangup.recv().await;
    }
}

/// A part of the daemon that failed on its own (the daemon then stops).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Metrics(#[from] crate::metrics::InstallError),
    /// The scheduler could not start, or a schedule could not be added (`what` says which).
    #[error("{what}")]
    Scheduler {
        what: String,
        #[source]
        source: tokio_cron_scheduler::JobSchedulerError,
    },
    #[error("reading the listening address")]
    Address(#[source] std::io::Error),
    #[error("the worker stopped unexpectedly")]
    Worker(#[source] Option<tokio::task::JoinError>),
    #[error("the HTTP server stopped unexpectedly")]
    ServerStopped,
    #[error("the HTTP server failed")]
    Server(#[source] std::io::Error),
    #[error("the HTTP server panicked")]
    ServerPanicked(#[source] tokio::task::JoinError),
    #[error(transparent)]
    LostLeadership(#[from] crate::leadership::LostLeadership),
    #[error("the leadership task stopped unexpectedly")]
    Leadership(#[source] tokio::task::JoinError),
}

/// Runs the daemon until `shutdown` resolves, then stops gracefully: no new work, requests in
/// flight get `daemon.shutdown_timeout` to finish, and operations still in flight after that are
/// read back at the next start. Returns an error only when a part of the daemon died on its own.
pub async fn run_until_stopped(
    ctx: Context,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloader: Reloader,
) -> Result<(), DaemonError> {
    let ctx = Arc::new(ctx);
    let (contexts, contexts_rx) = watch::channel(ctx.clone());
    let metrics = crate::metrics::install()?;
    if let Err(e) = crate::metrics::seed_last_success(&ctx.store).await {
        tracing::warn!("cannot read the run history for the metrics: {e}");
    }
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let triggers = Arc::new(Triggers::default());
    let mut scheduler = start_scheduler(&ctx.config.sync, triggers.clone()).await?;

    let address = listener.local_addr().map_err(DaemonError::Address)?;
    let state = crate::http::AppState::new(ctx.clone(), health.clone(), metrics, stop_rx.clone());
    let mut server = Some(tokio::spawn(crate::http::serve(
        listener,
        state,
        stopped(stop_rx.clone()),
    )));
    tracing::info!(%address, "listening on {address}: status page at http://{address}/, /healthz, /readyz, /metrics");

    // With a PostgreSQL state database several daemons may run: the worker waits until this one
    // leads. A SQLite file has one daemon, which leads at once.
    let (leading_tx, leading_rx) = watch::channel(ctx.store.postgres_pool().is_none());
    let mut leadership = ctx.store.postgres_pool().cloned().map(|pool| {
        tokio::spawn(crate::leadership::lead(
            pool,
            health.clone(),
            leading_tx,
            stop_rx.clone(),
        ))
    });
    let worker = Worker {
        contexts: contexts_rx,
        health: health.clone(),
        triggers: triggers.clone(),
        stop: stop_rx.clone(),
        leading: leading_rx,
        drain_suspended: false,
        queue_unreadable: false,
        changes_failures: 0,
    };
    let mut worker = Some(tokio::spawn(worker.run()));
    let watcher = ctx.source.captures_changes().then(|| {
        tokio::spawn(watch_changes(
            ctx.store.clone(),
            triggers.clone(),
            stop_rx.clone(),
        ))
    });
    let watchdog = sd_notify::watchdog_enabled()
        .map(|period| tokio::spawn(feed_watchdog(ctx.store.clone(), period, stop_rx.clone())));
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("running; first reconcile started"),
    ]);

    let mut failure = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = reloader.next() => {
                let current = contexts.borrow().clone();
                if let Some(next) = reload(&current, &reloader.source, &mut scheduler, &triggers).await {
                    contexts.send_replace(Arc::new(next));
                }
            }
            joined = async { worker.as_mut().expect("spawned").await } => {
                worker = None;
                failure = Some(DaemonError::Worker(joined.err()));
                break;
            }
            joined = async { leadership.as_mut().expect("spawned").await }, if leadership.is_some() => {
                leadership = None;
                failure = match joined {
                    Ok(Ok(())) => None,
                    Ok(Err(lost)) => Some(lost.into()),
                    Err(e) => Some(DaemonError::Leadership(e)),
                };
                if failure.is_some() {
                    break;
                }
            }
            joined = async { server.as_mut().expect("spawned").await } => {
                server = None;
                failure = Some(match joined {
                    Ok(Ok(())) => DaemonError::ServerStopped,
                    Ok(Err(e)) => DaemonError::Server(e),
                    Err(e) => DaemonError::ServerPanicked(e),
                });
                break;
            }
        }
    }

    // A daemon that lost its leader lock cannot know whether another leads by now: not one more
    // request, so no grace. What it had in flight is read back by the next leader.
    let lost_leadership = matches!(failure, Some(DaemonError::LostLeadership(_)));
    let grace = if lost_leadership {
        Duration::ZERO
    } else {
        contexts.borrow().config.daemon.shutdown_timeout
    };
    if lost_leadership {
        tracing::warn!("shutting down at once: requests in flight are abandoned, another daemon may lead by now; the next leader reads their operations back from Bynder, never sends them twice");
    } else {
        tracing::info!(
            ?grace,
            "shutting down: no new work; requests in flight may finish"
        );
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    stop_tx.send_replace(true);
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!("stopping the scheduler: {e}");
    }
    let deadline = tokio::time::Instant::now() + grace;
    if let Some(worker) = worker {
        if !join_by(worker, deadline).await && !lost_leadership {
            tracing::warn!(
                ?grace,
                "requests still in flight after daemon.shutdown_timeout were abandoned; their \
                 operations are read back from Bynder at the next start, never sent twice"
            );
        }
    }
    if let Some(server) = server {
        join_by(server, deadline).await;
    }
    if let Some(watchdog) = watchdog {
        join_by(watchdog, deadline).await;
    }
    if let Some(watcher) = watcher {
        join_by(watcher, deadline).await;
    }
    if let Some(leadership) = leadership {
        join_by(leadership, deadline).await;
    }
    let close = async {
        ctx.source.close().await;
        ctx.store.close().await;
    };
    if tokio::time::timeout(Duration::from_secs(2), close)
        .await
        .is_err()
    {
        tracing::warn!("the databases did not close within 2s");
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads the configuration again and applies what can change at run time: the log level, the
/// schedules, the limits, retry and sync settings (from the next run on). Sections read only at
/// start are named in a warning and keep their running values; an invalid file changes nothing.
/// `None`: nothing to apply.
async fn reload(
    current: &Context,
    source: &ConfigSource,
    scheduler: &mut JobScheduler,
    triggers: &Arc<Triggers>,
) -> Option<Context> {
    tracing::info!(config = %source.path().display(), "SIGHUP received: reloading the configuration");
    notify(&[NotifyState::Reloading]);
    let outcome = reload_config(current, source, scheduler, triggers).await;
    notify(&[NotifyState::Ready]);
    outcome
}

async fn reload_config(
    current: &Context,
    source: &ConfigSource,
    scheduler: &mut JobScheduler,
    triggers: &Arc<Triggers>,
) -> Option<Context> {
    let new = match crate::config::load_config(source) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("the configuration was not reloaded, the running one stays: {e}");
            return None;
        }
    };
    for warning in &new.warnings {
        tracing::warn!("{warning}");
    }
    let reload = current.config.reload(new);
    if !reload.needs_restart.is_empty() {
        tracing::warn!(
            sections = reload.needs_restart.join(", "),
            "these settings changed but apply only after a restart (systemctl restart \
             bynder-usage-sync); their running values stay"
        );
    }
    if reload.applied.is_empty() {
        tracing::info!("configuration reloaded: no run-time setting changed");
        return None;
    }
    let config = reload.config;
    if reload.applied.contains(&"log.level") {
        if let Err(e) = crate::logging::set_level(&config.log.level) {
            tracing::warn!("log.level not changed: {e}");
        }
    }
    if reload
        .applied
        .iter()
        .any(|k| *k == "sync.schedule" || *k == "sync.verify_schedule")
    {
        match start_scheduler(&config.sync, triggers.clone()).await {
            Ok(next) => {
                let mut old = std::mem::replace(scheduler, next);
                if let Err(e) = old.shutdown().await {
                    tracing::warn!("stopping the previous schedule: {e}");
                }
            }
            Err(e) => {
                tracing::error!(
                    "the configuration was not reloaded, the running one stays: {}",
                    error_chain(&e)
                );
                return None;
            }
        }
    }
    current
        .client
        .gate()
        .set_limits(config.limits.requests_per_second, config.limits.block_pause);
    tracing::info!(
        applied = reload.applied.join(", "),
        "configuration reloaded; runs from now on use it"
    );
    Some(current.with_config(config))
}

/// Waits for a task until `deadline`, then aborts it. Returns whether it ended on its own.
async fn join_by<T>(mut task: JoinHandle<T>, deadline: tokio::time::Instant) -> bool {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(_) => true,
        Err(_) => {
            task.abort();
            let _ = task.await;
            false
        }
    }
}

/// Resolves once the stop signal is raised (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Tells systemd (`Type=notify`); does nothing when not started by it.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Pings systemd's watchdog at half its period while the database answers, so a daemon whose
/// runtime or database is stuck gets restarted.
async fn feed_watchdog(store: store::Store, period: Duration, mut stop: watch::Receiver<bool>) {
    let every = period / 2;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let alive = tokio::time::timeout(every, store.alive())
            .await
            .is_ok_and(|r| r.is_ok());
        if alive {
            notify(&[NotifyState::Watchdog]);
        } else {
            tracing::warn!("the state database did not answer; the systemd watchdog is not fed");
        }
    }
}

// ---- schedule -------------------------------------------------------------------------------

/// Wake-ups from the cron jobs. A `Notify` keeps one permit, so ticks that arrive during a run
/// collapse into one run after it.
#[derive(Default)]
struct Triggers {
    reconcile: Notify,
    verify: Notify,
    /// The change log has entries the worker has not been woken for.
    changes: Notify,
    /// When a change run failed (a CMS transaction holding the database's lock past
    /// `database.busy_timeout`, say): when the watcher wakes the worker again for the same entries.
    changes_retry: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Triggers {
    /// Takes the retry of a failed change run if it is due.
    fn take_due_retry(&self) -> bool {
        let mut retry = self.changes_retry.lock().expect("not poisoned");
        let due = retry.is_some_and(|at| tokio::time::Instant::now() >= at);
        if due {
            *retry = None;
        }
        due
    }
}

/// How long after its `failures`-th failure in a row a change run is tried again: 1 s, doubling,
/// at most a minute.
fn changes_retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Watches the end of the change log and wakes the worker for new entries, once a burst has had
/// [`CHANGES_COALESCE`] to gather. It looks every [`CHANGES_POLL`] on SQLite; on PostgreSQL it
/// looks when the server notifies it of a committed write, and every [`CHANGES_POLL_NOTIFIED`]
/// besides. Entries a change run left in the log (a refused mass delete, a failed run) wake it
/// again only when more arrive; the next scheduled reconcile sees them too.
async fn watch_changes(
    store: store::Store,
    triggers: Arc<Triggers>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen: Option<i64> = None;
    let mut unreadable = false;
    let notified = Arc::new(tokio::sync::Notify::new());
    let listening = tokio::sync::watch::Sender::new(false);
    let _listener = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(listen_for_changes(
        store.clone(),
        notified.clone(),
        listening.clone(),
    )));
    let mut tick = tokio::time::interval(CHANGES_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looked = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = notified.notified() => {}
            _ = tick.tick() => {
                // Told of every commit, the log needs a look only now and then.
                if *listening.borrow() && looked.elapsed() < CHANGES_POLL_NOTIFIED {
                    continue;
                }
            }
        }
        looked = tokio::time::Instant::now();
        let latest = match store.latest_change().await {
            Ok(latest) => {
                unreadable = false;
                latest
            }
            Err(e) => {
                if !unreadable {
                    tracing::warn!("cannot read the change log: {e:#}");
                }
                unreadable = true;
                // A log table dropped by hand makes every CMS write fail (the triggers write
                // it): put it back.
                match store.ensure_capture().await {
                    Ok(true) => tracing::warn!(
                        "the change log or its triggers were missing and were put back; the \
                         next full pass covers what was written meanwhile"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::debug!("cannot put the change log back: {e:#}"),
                }
                continue;
            }
        };
        let Some(latest) = latest else { continue };
        // Unchanged since the last wake: nothing new. Not "not above it": in PostgreSQL a CMS
        // transaction that took its sequence number first may commit after one that took a
        // later number was planned, and its entry then shows up below what was seen.
        if seen == Some(latest) {
            // Nothing new; the entries a failed change run left are tried again when due.
            if triggers.take_due_retry() {
                triggers.changes.notify_one();
            }
            continue;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(CHANGES_COALESCE) => {}
        }
        // Everything up to here is planned by the run this wakes (it reads the log's end itself).
        seen = store.latest_change().await.ok().flatten().or(Some(latest));
        triggers.changes.notify_one();
    }
}

/// Wakes the watcher at every notification of a committed CMS write (PostgreSQL), telling
/// `listening` while they come; on SQLite there are none and it returns at once. When they fail
/// (the server gone, a reconnect refused), the watcher polls at its fast pace meanwhile.
async fn listen_for_changes(
    store: store::Store,
    notified: Arc<tokio::sync::Notify>,
    listening: watch::Sender<bool>,
) {
    let mut warned = false;
    loop {
        let failure = match store.change_notifications().await {
            Ok(None) => return,
            Ok(Some(mut notifications)) => {
                listening.send_replace(true);
                if warned {
                    tracing::info!("notified of CMS writes by PostgreSQL again");
                    warned = false;
                }
                // Written before LISTEN took effect: one look at the log covers it.
                notified.notify_one();
                loop {
                    if let Err(e) = notifications.next().await {
                        break e;
                    }
                    notified.notify_one();
                }
            }
            Err(e) => e,
        };
        listening.send_replace(false);
        if warned {
            tracing::debug!("cannot listen for notifications of CMS writes yet: {failure}");
        } else {
            tracing::warn!(
                "cannot listen for PostgreSQL's notifications of CMS writes ({failure}); looking \
                 at the change log every {CHANGES_POLL:?} until it can again"
            );
            warned = true;
        }
        tokio::time::sleep(NOTIFICATIONS_RETRY).await;
    }
}

async fn start_scheduler(
    sync: &SyncSettings,
    triggers: Arc<Triggers>,
) -> Result<JobScheduler, DaemonError> {
    let failed = |what: String| move |source| DaemonError::Scheduler { what, source };
    let scheduler = JobScheduler::new()
        .await
        .map_err(failed("starting the scheduler".into()))?;
    let add = |schedule: &str, key: &str, label: &'static str, pick: fn(&Triggers) -> &Notify| {
        let triggers = triggers.clone();
        let owned = schedule.to_owned();
        Job::new_async(schedule, move |_, _| {
            let triggers = triggers.clone();
            let schedule = owned.clone();
            Box::pin(async move {
                crate::metrics::set_next_run(label, &schedule);
                pick(&triggers).notify_one()
            })
        })
        .map_err(failed(format!("`{key}` = {schedule:?} is not a schedule")))
    };
    scheduler
        .add(add(&sync.schedule, "sync.schedule", "reconcile", |t| {
            &t.reconcile
        })?)
        .await
        .map_err(failed("scheduling the reconcile".into()))?;
    scheduler
        .add(add(
            &sync.verify_schedule,
            "sync.verify_schedule",
            "verify",
            |t| &t.verify,
        )?)
        .await
        .map_err(failed("scheduling the drift repair".into()))?;
    scheduler
        .start()
        .await
        .map_err(failed("starting the scheduler".into()))?;
    let when = |next: Option<DateTime<Utc>>| {
        next.map_or_else(
            || "never".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        )
    };
    tracing::info!(
        schedule = %sync.schedule,
        verify_schedule = %sync.verify_schedule,
        next_reconcile = %when(crate::metrics::set_next_run("reconcile", &sync.schedule)),
        next_verify = %when(crate::metrics::set_next_run("verify", &sync.verify_schedule)),
        "scheduled (cron, seconds first, UTC)"
    );
    Ok(scheduler)
}

// ---- the worker -----------------------------------------------------------------------------

/// One job of the worker.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// The full pass at start-up.
    StartupReconcile,
    Reconcile,
    Verify,
    /// Plan and send what the change log names.
    Changes,
    /// Send queued operations whose retry is due, if any.
    Drain,
}

/// Runs the jobs one at a time.
struct Worker {
    /// The current context: a configuration reload replaces it between runs.
    contexts: watch::Receiver<Arc<Context>>,
    health: Arc<Health>,
    triggers: Arc<Triggers>,
    stop: watch::Receiver<bool>,
    /// Whether this daemon leads (see [`crate::leadership`]): it works only then.
    leading: watch::Receiver<bool>,
    /// After a run that could not reach the portal or had its credentials rejected, queued
    /// operations wait for the next scheduled reconcile rather than being retried every poll.
    drain_suspended: bool,
    /// Whether the last look at the queue failed (logged once, not every poll).
    queue_unreadable: bool,
    /// Change runs that failed in a row (their retry waits longer each time).
    changes_failures: u32,
}

/// Lets the drain know the daemon is stopping.
struct StopFlag(watch::Receiver<bool>);

impl Progress for StopFlag {
    fn stop_requested(&self) -> bool {
        *self.0.borrow()
    }
}

impl Worker {
    fn ctx(&self) -> Arc<Context> {
        self.contexts.borrow().clone()
    }

    async fn run(mut self) {
        // A standby waits until it leads; it sends nothing before.
        let mut leading = self.leading.clone();
        tokio::select! {
            biased;
            () = stopped(self.stop.clone()) => return,
            led = leading.wait_for(|l| *l) => if led.is_err() { return },
        }
        // A reconcile at start catches up with what changed while the daemon was down and resumes
        // whatever the queue holds.
        let mut next = Some(Work::StartupReconcile);
        loop {
            let work = match next.take() {
                Some(work) => work,
                None => {
                    let stop = self.stop.clone();
                    tokio::select! {
                        biased;
                        () = stopped(stop) => return,
                        () = self.triggers.verify.notified() => Work::Verify,
                        () = self.triggers.reconcile.notified() => Work::Reconcile,
                        () = self.triggers.changes.notified() => Work::Changes,
                        () = tokio::time::sleep(QUEUE_POLL) => Work::Drain,
                    }
                }
            };
            if *self.stop.borrow() {
                return;
            }
            self.perform(work).await;
        }
    }

    async fn perform(&mut self, work: Work) {
        let progress: Arc<dyn Progress> = Arc::new(StopFlag(self.stop.clone()));
        let ctx = self.ctx();
        match work {
            Work::Drain => {
                if self.drain_suspended {
                    return;
                }
                let due = ctx.store.has_due_operations().await;
                if let Err(e) = &due {
                    if !self.queue_unreadable {
                        tracing::warn!("cannot read the queue: {e:#}");
                    }
                }
                self.queue_unreadable = due.is_err();
                if !due.unwrap_or(false) {
                    return;
                }
                match self
                    .until_stopped(run::drain_queue_once(&ctx, progress))
                    .await
                {
                    None | Some(Ok(None)) => {}
                    Some(Ok(Some(report))) => self.observe("drain", &report).await,
                    Some(Err(e)) => self.observe_error("drain", e).await,
                }
            }
            Work::Changes => {
                if self.drain_suspended {
                    // The portal was unreachable or refused the credentials: the change waits
                    // in the log for the next scheduled reconcile, as queued operations do.
                    return;
                }
                match self.until_stopped(run::changes_once(&ctx, progress)).await {
                    None => {}
                    Some(Ok(report)) => {
                        self.changes_failures = 0;
                        if let Some(report) = report {
                            self.observe("changes", &report).await;
                        }
                    }
                    Some(Err(e)) => {
                        self.changes_failures += 1;
                        let delay = changes_retry_delay(self.changes_failures);
                        *self.triggers.changes_retry.lock().expect("not poisoned") =
                            Some(tokio::time::Instant::now() + delay);
                        tracing::warn!(?delay, "the change run is tried again after {delay:?}");
                        self.observe_error("changes", e).await;
                    }
                }
            }
            Work::StartupReconcile | Work::Reconcile | Work::Verify => {
                let options = match work {
                    Work::Verify => verify_options(),
                    Work::StartupReconcile => startup_options(),
                    _ => reconcile_options(),
                };
                match self.until_stopped(self.credentials_usable()).await {
                    Some(true) => {}
                    Some(false) => {
                        self.drain_suspended = true;
                        return;
                    }
                    None => return,
                }
                let run = run::reconcile_with_progress(&ctx, &options, progress);
                match self.until_stopped(run).await {
                    None => {}
                    Some(Ok(report)) => self.observe(options.command, &report).await,
                    Some(Err(e)) => self.observe_error(options.command, e).await,
                }
            }
        }
    }

    /// Runs a job; once the stop signal is raised, waits only while operations are in flight
    /// (the drain no longer claims new ones), not while the run merely sleeps until a retry is
    /// due. `None`: the run was left behind at shutdown.
    async fn until_stopped<T>(&self, run: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(run);
        tokio::select! {
            out = &mut run => return Some(out),
            () = stopped(self.stop.clone()) => {}
        }
        loop {
            tokio::select! {
                out = &mut run => return Some(out),
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    if let Ok(queue) = self.ctx().store.queue_summary().await {
                        if queue.in_flight == 0 {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Whether a run may send: asks Bynder who we are (`GET /api/v4/currentUser/`, one cheap
    /// request) unless the credentials were accepted already. A 401 skips the run, so a revoked
    /// token costs one request per scheduled tick instead of one per queued operation.
    async fn credentials_usable(&self) -> bool {
        if self.health.credentials() == CredentialState::Accepted {
            return true;
        }
        match self.ctx().client.current_user().await {
            Ok(_) => {
                self.health.set_credentials(CredentialState::Accepted);
                true
            }
            Err(e) if matches!(e.reaction(), Reaction::CredentialsRejected) => {
                let message = format!(
                    "Bynder rejected the credentials (401). Fix: {}",
                    self.ctx().client.credentials().rejection_fix()
                );
                tracing::error!("{message}; the daemon keeps running and checks again at the next scheduled reconcile");
                self.health
                    .set_credentials(CredentialState::Rejected(message));
                false
            }
            // Authenticated, but without the current.user:read scope: the credentials work.
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 403) => {
                self.health.set_credentials(CredentialState::Accepted);
                true
            }
            // Unreachable, or any other trouble: the run finds out and reports it.
            Err(e) => {
                tracing::debug!("checking the credentials: {e}");
                true
            }
        }
    }

    async fn observe(&mut self, command: &'static str, report: &RunReport) {
        self.health.record_run(command, report);
        self.drain_suspended = matches!(
            report.outcome,
            RunOutcome::Unreachable(_) | RunOutcome::CredentialsRejected(_)
        );
        if let RunOutcome::CredentialsRejected(m) | RunOutcome::Unreachable(m) = &report.outcome {
            tracing::error!(command, "{m}");
        }
        if report.sent.dead > 0 {
            tracing::warn!(
                command,
                dead_letters = report.sent.dead,
                "Bynder refused operations for good; they wait as dead letters: see \
                 `bynder-usage-sync queue list --dead`"
            );
        }
        self.publish_status(command, report.outcome.label()).await;
    }

    async fn observe_error(&mut self, command: &'static str, error: RunError) {
        tracing::error!(command, "run failed: {}", error_chain(&error));
        metrics::counter!("bynder_usage_sync_runs_total", "outcome" => "error").increment(1);
        self.health.record_error(command, &error);
        self.publish_status(command, "error").await;
    }

    /// systemd's STATUS line (`systemctl status` shows it).
    async fn publish_status(&self, command: &str, outcome: &str) {
        let queue = match self.ctx().store.queue_summary().await {
            Ok(q) => format!("{} queued, {} dead letter(s)", q.pending, q.dead),
            Err(_) => "queue unreadable".to_owned(),
        };
        let status = format!(
            "last {command}: {outcome} at {}; {queue}",
            Utc::now().format("%Y-%m-%d %H:%M:%SZ")
        );
        notify(&[NotifyState::Status(&status)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_failed_change_run_is_tried_again_sooner_first_then_at_most_every_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| changes_retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn the_scheduled_jobs_are_recorded_under_their_own_names() {
        assert_eq!(reconcile_options().command, "reconcile");
        assert_eq!(startup_options().command, "reconcile");
        assert_eq!(verify_options().command, "verify");
        // Only the scheduled reconcile may skip the merge; the one at start always merges.
        assert!(reconcile_options().if_changed && !startup_options().if_changed);
        assert!(verify_options().verify && !reconcile_options().verify);
        assert!(!verify_options().dry_run && !reconcile_options().dry_run);
    }
}

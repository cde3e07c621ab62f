//! The command line: argument definitions, one function per subcommand, and the mapping of
//! failures to the documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::auth::Credentials;
use crate::bynder::Client;
use crate::config::{load_config, Config, ConfigError, ConfigSource, LogFormat};
use crate::gate::Gate;
use crate::plan::Change;
use crate::reconcile::{self, Context, Progress, RunOptions, RunOutcome, RunReport};
use crate::store::{self, open_store, OpenMode, StoreError};
use crate::text::printable;

/// Keeps Bynder's asset-usage records ("Asset Tracking") true to what a CMS uses.
#[derive(Debug, Parser)]
#[command(name = "bynder-usage-sync", version, about, long_about = None)]
pub struct Cli {
    /// The TOML config file [default: /etc/bynder-usage-sync/config.toml]
    #[arg(
        long,
        global = true,
        env = "BYNDER_USAGE_SYNC_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,

    /// More log detail: -v for debug, -vv for trace (over log.level and RUST_LOG).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with_all = ["quiet", "log_level"])]
    pub verbose: u8,

    /// Less log detail: -q for warnings and errors only, -qq for errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "log_level")]
    pub quiet: u8,

    /// The log filter for this command, e.g. "debug" or "bynder_usage_sync=trace" (over
    /// log.level and RUST_LOG).
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log filter the command line asks for, if any.
    fn log_override(&self) -> Option<String> {
        if let Some(level) = &self.log_level {
            return Some(level.clone());
        }
        match (self.verbose, self.quiet) {
            (0, 0) => None,
            (1, _) => Some("debug".to_owned()),
            (v, _) if v >= 2 => Some("trace".to_owned()),
            (_, 1) => Some("warn".to_owned()),
            _ => Some("error".to_owned()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the state database and the cms_asset_references table, or bring them up to date.
    Migrate,
    /// Make Bynder's usages for the integration match cms_asset_references, once.
    Resync {
        /// Show what would be sent, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the full report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Send deletes even when more than sync.max_deletes are planned or the table is empty.
        #[arg(long)]
        allow_mass_delete: bool,
        /// First read Bynder back for every managed asset and repair drift (usages removed or
        /// added by hand, duplicates, wrong notes).
        #[arg(long)]
        verify: bool,
        /// Exit 0 when nothing would change (or changed) and 10 when something would (or did),
        /// so scripts and monitoring can alert on drift. Error exit codes still win.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Show the state database: last runs, queue, dead letters, rate-limit pause.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and manage the durable queue of operations and its dead letters.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Run a full demonstration against the bundled simulated portal (no Bynder account needed).
    Demo,
    /// Run as a service: reconcile on sync.schedule, repair drift on sync.verify_schedule, drain
    /// the queue in between; serve /healthz, /readyz, /metrics and a status page on server.listen.
    /// Stops gracefully on SIGTERM or SIGINT.
    Run,
    /// Ask the running daemon's /healthz (or /readyz) on server.listen; exit 0 when it answers 200
    /// (a container HEALTHCHECK that needs no other tool).
    Healthcheck {
        /// Check readiness (/readyz) instead of liveness (/healthz).
        #[arg(long)]
        ready: bool,
    },
    /// Validate the config, reach the portal, authenticate, and show who the daemon acts as
    /// and which scopes it got.
    Check(crate::admin::CheckArgs),
    /// Send one authenticated request to any API path and print {request, status, headers,
    /// body} as JSON (credentials redacted).
    Raw(crate::admin::RawArgs),
    /// Find out how the portal behaves where Bynder's documentation is silent, with one existing
    /// asset and usages on reserved probe uris (urn:bynder-usage-sync:probe:…) that are removed
    /// again; prints a table and stores the portal profile. Exit 0, or 3 when something it
    /// created could not be removed.
    Probe(crate::probe::ProbeArgs),
    /// One-time logins that store credentials in the state database.
    Auth {
        #[command(subcommand)]
        command: crate::admin::AuthCommand,
    },
    /// Show or check the configuration, offline.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Print a shell completion script, e.g. `bynder-usage-sync completions bash >
    /// /etc/bash_completion.d/bynder-usage-sync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Copy the state database, consistently, while the daemon runs (SQLite's VACUUM INTO), to
    /// a new file (never overwritten; private like the state itself), and check the copy.
    Backup {
        /// The new file to write, e.g. /var/backups/bynder-usage-sync-$(date +%F).db
        path: PathBuf,
    },
    /// Print the manual page (roff) covering every subcommand, e.g. `bynder-usage-sync man |
    /// man -l -`.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// The effective configuration after defaults, the file and the environment, each value with
    /// where it came from (default, file, env); every secret shown as [redacted].
    Show {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration without touching the network or the database: exit 0 when it
    /// is valid, 78 naming the problem when not.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// List queued operations, or only the dead letters.
    List {
        /// Only dead letters (operations Bynder rejected for good).
        #[arg(long)]
        dead: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into the queue; the next run sends them again.
    Retry {
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// The ids of the dead letters to retry (see `queue list --dead`).
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
    },
    /// Delete dead letters. A row that still asks for the change is planned again by the next run.
    Purge {
        /// Purge the dead letters (required: pending operations are never purged).
        #[arg(long, required = true)]
        dead: bool,
    },
}

/// Documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Converged, or nothing to do.
    Ok = 0,
    /// Unexpected error, portal unreachable after retries included.
    Unexpected = 1,
    /// Invalid command line (clap's own code for argument errors).
    Usage = 2,
    /// Finished, but some operations failed and wait in the queue or as dead letters (or the
    /// mass-delete guard held the run back).
    Partial = 3,
    /// Bynder rejected the credentials.
    Credentials = 4,
    /// With `--detailed-exitcode`: something would change (dry run) or changed.
    Changes = 10,
    /// Another process held the run lock longer than `database.lock_timeout` (EX_TEMPFAIL).
    Busy = 75,
    /// Configuration error (EX_CONFIG).
    Config = 78,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A failure that ends the process with a message and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(StoreError),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Busy(crate::files::LockTimeout),
    /// A command line that names something that does not exist.
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Unexpected(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<crate::files::LockError>() {
            Ok(crate::files::LockError::Timeout(timeout)) => Failure::Busy(timeout),
            Ok(other) => Failure::Unexpected(other.into()),
            Err(e) => Failure::Unexpected(e),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Missing(_)
            | StoreError::NotMigrated(_)
            | StoreError::MigrationsNotRun(_)
            | StoreError::Open { .. } => Failure::Setup(e),
            other => Failure::Unexpected(other.into()),
        }
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Unexpected(anyhow::Error::new(e).context("state database"))
    }
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Config(_) | Failure::Setup(_) => Exit::Config,
            Failure::Credentials(_) => Exit::Credentials,
            Failure::Busy(_) => Exit::Busy,
            Failure::Usage(_) => Exit::Usage,
            Failure::Unreachable(_) | Failure::Unexpected(_) => Exit::Unexpected,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<Exit, Failure> {
    let source = match &cli.config {
        Some(p) => ConfigSource::Explicit(p.clone()),
        None => ConfigSource::Default,
    };
    let log_override = cli.log_override();
    let start = |source: &ConfigSource| start(source, log_override.as_deref());
    match cli.command {
        Command::Config { action } => {
            init_tracing(
                log_override.as_deref().unwrap_or("warn"),
                LogFormat::Text,
                log_override.is_some(),
                None,
            );
            config_command(&source, action)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                shell,
                &mut command,
                "bynder-usage-sync",
                &mut std::io::stdout(),
            );
            Ok(Exit::Ok)
        }
        Command::Backup { path } => {
            let config = start(&source)?;
            backup(config, &path).await
        }
        Command::Man => {
            print_man_page().map_err(anyhow::Error::from)?;
            Ok(Exit::Ok)
        }
        Command::Demo => {
            init_tracing(
                log_override.as_deref().unwrap_or("warn"),
                LogFormat::Text,
                log_override.is_some(),
                None,
            );
            crate::demo::run_demo().await.map_err(Failure::Unexpected)
        }
        Command::Migrate => {
            let config = start(&source)?;
            let store = open_store(&config.database, OpenMode::Create).await?;
            println!(
                "state database {} is ready (table cms_asset_references present)",
                store.path().display()
            );
            store.close().await;
            Ok(Exit::Ok)
        }
        Command::Resync {
            dry_run,
            json,
            allow_mass_delete,
            verify,
            detailed_exitcode,
        } => {
            let config = start(&source)?;
            let options = RunOptions {
                command: if verify { "verify" } else { "resync" },
                dry_run,
                allow_mass_delete,
                keep_all_items: json,
                verify,
            };
            resync(config, options, json, detailed_exitcode).await
        }
        Command::Status { json } => {
            let config = start(&source)?;
            status(config, json).await
        }
        Command::Queue { action } => {
            let config = start(&source)?;
            queue(config, action).await
        }
        Command::Check(args) => crate::admin::check(start(&source)?, args).await,
        Command::Raw(args) => crate::admin::raw(start(&source)?, args).await,
        Command::Probe(args) => {
            let ctx = build_context(start(&source)?).await?;
            let exit = crate::probe::probe(&ctx, &args).await;
            ctx.store.close().await;
            exit
        }
        Command::Auth { command } => crate::admin::auth(start(&source)?, command).await,
        Command::Run => {
            // First: a SIGHUP during start-up must not end the process.
            let reloader =
                crate::daemon::Reloader::install(source.clone()).map_err(anyhow::Error::from)?;
            let config = start(&source)?;
            let stop = crate::daemon::termination_signal().map_err(anyhow::Error::from)?;
            let listener = crate::daemon::bind(&config.server).await?;
            let ctx = build_context(config).await?;
            crate::daemon::run_until_stopped(ctx, listener, stop, reloader).await?;
            Ok(Exit::Ok)
        }
        Command::Healthcheck { ready } => {
            let config = start(&source)?;
            let path = if ready { "/readyz" } else { "/healthz" };
            crate::http::probe(config.server.listen, path).await?;
            Ok(Exit::Ok)
        }
    }
}

/// Loads the config and sets up logging from it (or from the command line's `-v`, `-q`,
/// `--log-level`).
fn start(source: &ConfigSource, log_override: Option<&str>) -> Result<Config, Failure> {
    let config = load_config(source)?;
    init_tracing(
        log_override.unwrap_or(&config.log.level),
        config.log.format,
        log_override.is_some(),
        Some(&config.telemetry),
    );
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// Logs go to stderr (see [`crate::logging`]), and with `telemetry` configured spans and log
/// records to a collector too. `forced`: the level comes from the command line and wins over
/// `RUST_LOG`.
pub fn init_tracing(
    level: &str,
    format: LogFormat,
    forced: bool,
    telemetry: Option<&crate::config::TelemetrySettings>,
) {
    crate::logging::init(level, format, forced, telemetry);
}

/// `backup PATH`: a consistent copy of the state database, checked before it is called done.
async fn backup(config: Config, path: &std::path::Path) -> Result<Exit, Failure> {
    if path.exists() {
        return Err(Failure::Usage(format!(
            "{} already exists; a backup never overwrites a file. Fix: give a new file name",
            path.display()
        )));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Failure::Usage(format!(
                "the folder {} does not exist. Fix: create it, or give a path in an existing folder",
                parent.display()
            )));
        }
    }
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let mode = crate::files::Modes::new(config.database.group_shared).file;
    let copied = store.copy_to(path, mode).await;
    store.close().await;
    copied.map_err(|e| {
        let _ = std::fs::remove_file(path);
        Failure::Unexpected(anyhow::anyhow!(
            "the backup to {} failed: {e}. Fix: check that folder's free space and permissions",
            path.display()
        ))
    })?;
    let copy = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display())).await?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&copy)
        .await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cms_asset_references")
        .fetch_one(&copy)
        .await?;
    copy.close().await;
    if integrity != "ok" {
        return Err(Failure::Unexpected(anyhow::anyhow!(
            "the backup {} does not pass SQLite's integrity check ({integrity}); do not rely on it",
            path.display()
        )));
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "backed up {} to {} ({size} bytes, {rows} CMS row(s), integrity ok). To restore: stop the \
         daemon, copy the backup over database.path and delete the -wal and -shm files beside it",
        config.database.path.display(),
        path.display()
    );
    Ok(Exit::Ok)
}

/// `config show` and `config check`: offline, no database, no network.
fn config_command(source: &ConfigSource, action: ConfigAction) -> Result<Exit, Failure> {
    let explained = crate::config::show::explain(source)?;
    for warning in &explained.warnings {
        eprintln!("warning: {warning}");
    }
    match action {
        ConfigAction::Show { json: true } => println!(
            "{}",
            serde_json::to_string_pretty(&explained).map_err(anyhow::Error::from)?
        ),
        ConfigAction::Show { json: false } => {
            print!("{}", crate::config::show::render_text(&explained))
        }
        ConfigAction::Check => println!(
            "configuration valid ({}; {} warning(s))",
            explained.file.as_deref().map_or_else(
                || "no config file, environment only".to_owned(),
                |f| format!("file {f}")
            ),
            explained.warnings.len()
        ),
    }
    Ok(Exit::Ok)
}

/// The manual page: the main page, then a section per subcommand (nested ones too) with its
/// synopsis, description and options.
fn print_man_page() -> std::io::Result<()> {
    use std::io::Write;
    let command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut out)?;
    fn sections(out: &mut Vec<u8>, parent: &str, command: &clap::Command) -> std::io::Result<()> {
        for sub in command.get_subcommands().filter(|c| c.get_name() != "help") {
            let name = format!("{parent} {}", sub.get_name());
            writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
            let man = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
            man.render_synopsis_section(out)?;
            man.render_description_section(out)?;
            man.render_options_section(out)?;
            sections(out, &name, sub)?;
        }
        Ok(())
    }
    sections(&mut out, "bynder-usage-sync", &command)?;
    std::io::stdout().write_all(&out)
}

/// Builds the run context: store, credentials, client.
pub async fn build_context(config: Config) -> Result<Context, Failure> {
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let credentials = Credentials::load(&config, Some(&store), gate.clone()).await?;
    let client = Client::new(&config, credentials, gate)
        .map_err(|e| ConfigError::new(format!("{e}. Fix: check bynder.ca_file")))?;
    let source = crate::source::open_source(&config)
        .await
        .map_err(|crate::source::SourceError::Config(e)| e)?;
    let profile = crate::profile::PortalProfile::load(&store, config.bynder.base_url.as_str())
        .await
        .map_err(Failure::from)?;
    Ok(Context {
        config,
        store,
        source,
        client: Arc::new(client),
        profile: Arc::new(profile),
    })
}

async fn resync(
    config: Config,
    options: RunOptions,
    json: bool,
    detailed_exitcode: bool,
) -> Result<Exit, Failure> {
    let ctx = build_context(config).await?;
    let progress: Arc<dyn Progress> = if json || options.dry_run {
        Arc::new(Quiet)
    } else {
        Arc::new(Bar::new())
    };
    let report = reconcile::reconcile_with_progress(&ctx, &options, progress).await?;
    ctx.store.close().await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
        );
    } else {
        print_report(&report);
    }
    let exit = outcome_exit(&report.outcome)?;
    let p = &report.plan;
    let drift = report.verify.as_ref().map_or(0, |v| v.drift());
    let changes =
        p.creates + p.updates + p.deletes + p.verifies + p.already_queued + p.cancelled + drift;
    if detailed_exitcode && exit == Exit::Ok && changes > 0 {
        return Ok(Exit::Changes);
    }
    Ok(exit)
}

/// The exit code for a run's outcome. Dead letters left from earlier runs do not change it: the
/// outcome already says whether this run made new ones.
pub fn outcome_exit(outcome: &RunOutcome) -> Result<Exit, Failure> {
    match outcome {
        RunOutcome::CredentialsRejected(m) => Err(Failure::Credentials(m.clone())),
        RunOutcome::Unreachable(m) => Err(Failure::Unreachable(m.clone())),
        RunOutcome::Partial | RunOutcome::MassDeleteRefused(_) => Ok(Exit::Partial),
        RunOutcome::Converged | RunOutcome::NothingToDo | RunOutcome::DryRun => Ok(Exit::Ok),
    }
}

/// Prints a run report for people.
pub fn print_report(report: &RunReport) {
    let p = &report.plan;
    let title = if matches!(report.outcome, RunOutcome::DryRun) {
        "Plan (dry run, nothing sent)"
    } else {
        "Plan"
    };
    println!(
        "{title}: {} create(s), {} update(s), {} delete(s), {} read-back(s); {} already queued, {} cancelled; \
         {} row(s) read, {} skipped",
        p.creates, p.updates, p.deletes, p.verifies, p.already_queued, p.cancelled, p.rows_read, p.skipped
    );
    let groups = [
        (Change::Create, "Creates", p.creates),
        (Change::Update, "Updates (delete, then create)", p.updates),
        (Change::Delete, "Deletes", p.deletes),
        (
            Change::Verify,
            "Read-backs (outcome of an earlier request unknown)",
            p.verifies,
        ),
    ];
    for (change, title, count) in groups {
        let items: Vec<_> = p.items.iter().filter(|i| i.change == change).collect();
        if items.is_empty() {
            continue;
        }
        println!("{title} ({count}):");
        for item in &items {
            let note = item
                .additional
                .as_deref()
                .filter(|a| !a.is_empty())
                .map(|a| format!(" ({a})"))
                .unwrap_or_default();
            println!("  {} {}{}", item.asset_id, item.uri, note);
        }
        if count > items.len() as u64 && !p.complete {
            println!("  … and more (use --json for all)");
        }
    }
    if let Some(v) = &report.verify {
        println!(
            "Drift check: {} asset(s) read back; {} missing, {} extra, {} duplicated, {} with a wrong note; {} unreadable",
            v.assets_checked, v.missing, v.extra, v.duplicates, v.wrong_additional, v.unreadable
        );
    }
    if p.skipped > 0 {
        println!("Skipped rows (never sent):");
        for row in &p.skipped_rows {
            println!(
                "  asset_id={:?} uri={:?}: {}",
                row.asset_id, row.uri, row.reason
            );
        }
        if p.skipped > p.skipped_rows.len() as u64 {
            println!("  … and {} more", p.skipped - p.skipped_rows.len() as u64);
        }
    }
    if !matches!(report.outcome, RunOutcome::DryRun) {
        let s = &report.sent;
        println!(
            "Sent: {} operation(s) done, {} failed attempt(s), {} new dead letter(s), {} still queued; {} request(s)",
            s.succeeded, s.failed_attempts, s.dead, s.left_pending, s.requests
        );
    }
    let result = match &report.outcome {
        RunOutcome::NothingToDo => "nothing to do: Bynder already matches".to_owned(),
        RunOutcome::Converged => "converged: Bynder matches cms_asset_references".to_owned(),
        RunOutcome::Partial => {
            "partial: some operations wait in the queue or as dead letters (see `status`)"
                .to_owned()
        }
        RunOutcome::DryRun => "dry run: nothing was sent".to_owned(),
        RunOutcome::MassDeleteRefused(m)
        | RunOutcome::Unreachable(m)
        | RunOutcome::CredentialsRejected(m) => m.clone(),
    };
    println!("Result: {}", printable(&result));
    let new = report.sent.dead as i64;
    let earlier = (report.dead_letters - new).max(0);
    if new > 0 {
        println!("Dead letters: {new} new in this run (see `bynder-usage-sync queue list --dead`)");
    }
    if earlier > 0 {
        println!(
            "Warning: {earlier} dead letter(s) from earlier runs still wait for a human: see \
             `bynder-usage-sync queue list --dead`, then `queue retry` or `queue purge --dead`"
        );
    }
}

/// The portal profile as `status` and `probe` print it.
pub fn print_profile(facts: &[crate::profile::Learned]) {
    if facts.is_empty() {
        println!(
            "Portal profile: nothing learned yet (runs learn as they go; `probe` learns it all)"
        );
        return;
    }
    println!("Portal profile:");
    for l in facts {
        println!(
            "  {:<58} {:<12} learned {} ({})",
            l.fact.question(),
            printable(&l.value),
            l.learned_at,
            printable(&l.evidence)
        );
    }
}

async fn status(config: Config, json: bool) -> Result<Exit, Failure> {
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let cms_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cms_asset_references")
        .fetch_one(store.pool())
        .await?;
    let recorded = store.recorded_count().await?;
    let queue = store.queue_summary().await?;
    let runs = store.recent_runs(10).await?;
    let dead = store.list_operations(true).await?;
    let paused_until = store
        .setting("rate_limit_paused_until")
        .await?
        .filter(|t| t.as_str() > store::now_text().as_str());
    let auth_warning = crate::auth::status_warning(&config.auth, &store).await?;
    let profile = crate::profile::PortalProfile::load(&store, config.bynder.base_url.as_str())
        .await?
        .facts();
    store.close().await;
    if json {
        let value = serde_json::json!({
            "portal": config.bynder.base_url.as_str(),
            "integration_id": config.bynder.integration_id,
            "database": config.database.path,
            "cms_rows": cms_rows,
            "recorded_usages": recorded,
            "queue": queue,
            "rate_limit_paused_until": paused_until,
            "auth_warning": auth_warning,
            "dead_letters": dead,
            "runs": runs,
            "portal_profile": profile,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(anyhow::Error::from)?
        );
        return Ok(Exit::Ok);
    }
    println!(
        "Portal:       {} (integration {})",
        config.bynder.base_url, config.bynder.integration_id
    );
    println!("Database:     {}", config.database.path.display());
    println!("CMS rows:     {cms_rows}");
    println!("Recorded:     {recorded} usage(s) known to be in Bynder");
    let oldest = queue
        .oldest_pending_at
        .as_deref()
        .map(|t| {
            let age = chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .and_then(|at| {
                    (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
                        .to_std()
                        .ok()
                })
                .map(|d| {
                    humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                        .to_string()
                })
                .unwrap_or_else(|| "?".to_owned());
            format!(", the oldest waiting for {age} (since {t})")
        })
        .unwrap_or_default();
    println!(
        "Queue:        {} pending, {} in flight, {} dead letter(s){oldest}",
        queue.pending, queue.in_flight, queue.dead
    );
    match &paused_until {
        Some(t) => println!("Rate limit:   PAUSED until {t} (Bynder answered 429)"),
        None => println!("Rate limit:   not paused"),
    }
    if let Some(warning) = &auth_warning {
        println!("Auth:         WARNING: {warning}");
    }
    print_profile(&profile);
    if runs.is_empty() {
        println!("Runs:         none yet");
    } else {
        println!("Last runs:");
        for r in &runs {
            println!(
                "  #{:<4} {} {:<8} {:<20} +{} ~{} -{} ok {} failed {} skipped {} requests {}{}",
                r.id,
                r.started_at,
                r.command,
                r.outcome.as_deref().unwrap_or("running/stopped"),
                r.creates,
                r.updates,
                r.deletes,
                r.succeeded,
                r.failed,
                r.skipped_rows,
                r.requests,
                r.message
                    .as_deref()
                    .map(|m| format!("\n         {}", printable(m)))
                    .unwrap_or_default()
            );
        }
    }
    if !dead.is_empty() {
        println!("Dead letters (retried when their row changes):");
        for op in &dead {
            println!(
                "  {} {}: {}",
                op.asset_id,
                op.uri,
                printable(op.last_error.as_deref().unwrap_or("?"))
            );
        }
    }
    Ok(Exit::Ok)
}

async fn queue(config: Config, action: QueueAction) -> Result<Exit, Failure> {
    let store = open_store(&config.database, OpenMode::Existing).await?;
    match action {
        QueueAction::List { dead, json } => {
            let ops = store.list_operations(dead).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ops).map_err(anyhow::Error::from)?
                );
            } else if ops.is_empty() {
                println!(
                    "{}",
                    if dead {
                        "no dead letters"
                    } else {
                        "the queue is empty"
                    }
                );
            } else {
                println!(
                    "{:>6}  {:<9} {:<7} {:>8}  {:<36} uri / last error",
                    "id", "state", "action", "attempts", "asset_id"
                );
                for op in &ops {
                    let action = match op.target {
                        crate::plan::Target::Upsert(_) => "upsert",
                        crate::plan::Target::Delete => "delete",
                    };
                    println!(
                        "{:>6}  {:<9} {:<7} {:>8}  {:<36} {}",
                        op.id, op.state, action, op.attempts, op.asset_id, op.uri
                    );
                    if let Some(e) = &op.last_error {
                        println!("{:>6}  {}", "", printable(e));
                    }
                }
            }
        }
        QueueAction::Retry { all, ids } => {
            // All or nothing: a mistyped id must not re-queue the others behind the user's back.
            let wrong = store.not_dead_letters(&ids).await?;
            if !wrong.is_empty() {
                store.close().await;
                let named: Vec<String> = wrong
                    .iter()
                    .map(|(id, state)| match state {
                        None => format!("{id} (no such operation)"),
                        Some(state) => format!("{id} (not a dead letter but {state})"),
                    })
                    .collect();
                return Err(Failure::Usage(format!(
                    "cannot re-queue {}; nothing was re-queued. Fix: use the ids `bynder-usage-sync \
                     queue list --dead` shows, or --all",
                    named.join(", ")
                )));
            }
            let n = store
                .retry_dead(if all { None } else { Some(&ids) })
                .await?;
            println!("{n} dead letter(s) re-queued; the next run sends them");
        }
        QueueAction::Purge { dead: _ } => {
            let n = store.purge_dead().await?;
            println!("{n} dead letter(s) purged");
        }
    }
    store.close().await;
    Ok(Exit::Ok)
}

struct Quiet;
impl Progress for Quiet {}

/// A progress bar on a terminal, plain lines otherwise.
struct Bar {
    bar: ProgressBar,
    terminal: bool,
}

impl Bar {
    fn new() -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} sending [{bar:30}] {pos}/{len} operations ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar { bar, terminal }
    }
}

impl Progress for Bar {
    fn planned(&self, total: u64) {
        self.bar.set_length(total);
        if !self.terminal && total > 0 {
            eprintln!("sending {total} operation(s)");
        }
    }
    fn advanced(&self, done: u64) {
        self.bar.set_position(done);
        if !self.terminal && done.is_multiple_of(1000) {
            eprintln!("  {done} operation(s) done");
        }
    }
    fn finished(&self) {
        self.bar.finish_and_clear();
    }
}

//! The command line: the argument definitions and the dispatch of each subcommand to its own
//! file (`resync`, `status`, `queue`, `check`, `raw`, `login`, `probe`, `demo`, `backup`,
//! `config`), and the exit codes every failure maps to (`exit`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::build_context;
use crate::config::{load_config, Config, ConfigSource, LogFormat};
use crate::run::RunOptions;
use crate::store::{open_store, OpenMode};

mod backup;
mod check;
mod config;
mod demo;
mod exit;
mod healthcheck;
mod login;
mod probe;
mod queue;
mod raw;
mod resync;
mod status;

pub use self::exit::{Exit, Failure};
pub use self::resync::{outcome_exit, print_report};

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
        /// Skip the full merge when nothing can have changed since the last full pass (every
        /// write to cms_asset_references since went through the change-capture triggers and was
        /// planned); the queue is still sent. For cron jobs; a plain resync always merges all.
        #[arg(long, conflicts_with_all = ["verify", "dry_run"])]
        if_changed: bool,
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
        action: queue::QueueAction,
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
    Check(check::CheckArgs),
    /// Send one authenticated request to any API path and print {request, status, headers,
    /// body} as JSON (credentials redacted).
    Raw(raw::RawArgs),
    /// Find out how the portal behaves where Bynder's documentation is silent, with one existing
    /// asset and usages on reserved probe uris (urn:bynder-usage-sync:probe:…) that are removed
    /// again; prints a table and stores the portal profile. Exit 0, or 3 when something it
    /// created could not be removed.
    Probe(probe::ProbeArgs),
    /// One-time logins that store credentials in the state database.
    Auth {
        #[command(subcommand)]
        command: login::AuthCommand,
    },
    /// Show or check the configuration, offline.
    Config {
        #[command(subcommand)]
        action: config::ConfigAction,
    },
    /// Print a shell completion script, e.g. `bynder-usage-sync completions bash >
    /// /etc/bash_completion.d/bynder-usage-sync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Copy a SQLite state database, consistently, while the daemon runs (SQLite's VACUUM INTO),
    /// to a new file (never overwritten; private like the state itself), and check the copy. A
    /// PostgreSQL state database is backed up with the server's tools (pg_dump)
    Backup {
        /// The new file to write, e.g. /var/backups/bynder-usage-sync-$(date +%F).db
        path: PathBuf,
    },
    /// Print the manual page (roff) covering every subcommand, e.g. `bynder-usage-sync man |
    /// man -l -`.
    Man,
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
            config::config_command(&source, action)
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
            backup::backup(config, &path).await
        }
        Command::Man => {
            config::print_man_page().map_err(anyhow::Error::from)?;
            Ok(Exit::Ok)
        }
        Command::Demo => {
            init_tracing(
                log_override.as_deref().unwrap_or("warn"),
                LogFormat::Text,
                log_override.is_some(),
                None,
            );
            demo::run_demo().await.map_err(Failure::Unexpected)
        }
        Command::Migrate => {
            let config = start(&source)?;
            let store = open_store(&config.database, OpenMode::Create).await?;
            println!(
                "state database {} is ready (table cms_asset_references present)",
                store.describe()
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
            if_changed,
        } => {
            let config = start(&source)?;
            let options = RunOptions {
                command: if verify { "verify" } else { "resync" },
                dry_run,
                allow_mass_delete,
                keep_all_items: json,
                verify,
                if_changed,
            };
            resync::resync(config, options, json, detailed_exitcode).await
        }
        Command::Status { json } => {
            let config = start(&source)?;
            status::status(config, json).await
        }
        Command::Queue { action } => {
            let config = start(&source)?;
            queue::queue(config, action).await
        }
        Command::Check(args) => check::check(start(&source)?, args).await,
        Command::Raw(args) => raw::raw(start(&source)?, args).await,
        Command::Probe(args) => {
            let ctx = build_context(start(&source)?).await?;
            let exit = probe::probe(&ctx, &args).await;
            ctx.store.close().await;
            exit
        }
        Command::Auth { command } => login::auth(start(&source)?, command).await,
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
            healthcheck::probe(config.server.listen, path).await?;
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

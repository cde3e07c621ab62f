//! `resync`: one reconcile from the command line, its progress bar, its report for people (or
//! JSON) and the exit code its outcome maps to.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::{Exit, Failure};
use crate::app::build_context;
use crate::config::Config;
use crate::plan::Change;
use crate::run::{self, Progress, RunOptions, RunOutcome, RunReport};
use crate::text::printable;

pub async fn resync(
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
    let report = run::reconcile_with_progress(&ctx, &options, progress).await?;
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
    if let Some(at) = &p.unchanged_since {
        println!(
            "Nothing changed since the full pass at {at} (--if-changed): the merge was skipped"
        );
    }
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

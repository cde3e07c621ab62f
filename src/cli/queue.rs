//! `queue list` and `queue retry`: the durable queue and its dead letters, from the command line.

use super::{Exit, Failure};
use crate::config::Config;
use crate::store::{open_store, OpenMode};
use crate::text::printable;

#[derive(Debug, clap::Subcommand)]
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

pub async fn queue(config: Config, action: QueueAction) -> Result<Exit, Failure> {
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

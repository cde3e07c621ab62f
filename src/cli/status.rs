//! `status`: what the state database says — last runs, the queue, dead letters, a rate-limit
//! pause, the portal profile — for people or as JSON.

use super::{Exit, Failure};
use crate::config::Config;
use crate::store::{self, open_store, OpenMode};
use crate::text::printable;

pub async fn status(config: Config, json: bool) -> Result<Exit, Failure> {
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let cms_rows = store.cms_row_count().await?;
    let recorded = store.recorded_count().await?;
    let queue = store.queue_summary().await?;
    let runs = store.recent_runs(10).await?;
    let capture = store.capture_summary().await?;
    let dead = store.list_operations(true).await?;
    let paused_until = store
        .setting("rate_limit_paused_until")
        .await?
        .filter(|t| t.as_str() > store::now_text().as_str());
    let auth_warning = crate::auth::status_warning(&config.auth, &store).await?;
    let profile = crate::profile::PortalProfile::load(&store, config.bynder.base_url.as_str())
        .await?
        .facts();
    // Several daemons may share a PostgreSQL state database: which one leads.
    let leader = match store.postgres_pool() {
        Some(pool) => Some(
            store::lock::holder(pool, store::lock::LockKind::Leader)
                .await?
                .unwrap_or_else(|| "none (no daemon is running)".to_owned()),
        ),
        None => None,
    };
    let database = store.describe();
    store.close().await;
    if json {
        let value = serde_json::json!({
            "portal": config.bynder.base_url.as_str(),
            "integration_id": config.bynder.integration_id,
            "database": database,
            "leader": leader,
            "cms_rows": cms_rows,
            "recorded_usages": recorded,
            "queue": queue,
            "change_capture": capture,
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
    println!("Database:     {database}");
    if let Some(leader) = &leader {
        println!("Leader:       {}", printable(leader));
    }
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
    let changes = if !config.source.is_state_table() {
        "off (a custom source keeps to sync.schedule)".to_owned()
    } else if !capture.triggers_installed {
        "TRIGGERS MISSING (the next full pass or `migrate` puts them back)".to_owned()
    } else {
        format!(
            "on; {} log entr{} not yet planned; last full pass {}",
            capture.unplanned_entries,
            if capture.unplanned_entries == 1 {
                "y"
            } else {
                "ies"
            },
            capture.last_full_pass.as_deref().unwrap_or("never")
        )
    };
    println!("Changes:      {changes}");
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

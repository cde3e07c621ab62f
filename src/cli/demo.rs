//! `demo`: the whole product on a laptop with no Bynder account. Starts the simulated portal,
//! fills a fresh database with sample CMS rows, resyncs, changes rows, resyncs again, and shows
//! what the portal holds — including another integration's usage that is never touched.

use std::sync::Arc;

use anyhow::Context as _;

use super::{print_report, Exit};
use crate::app::build_context;
use crate::config::Config;
use crate::run::{reconcile_with_progress, Progress, RunOptions, RunOutcome};
use crate::simulator::{Options, Simulator};
use crate::store::{open_store, CmsRow, OpenMode};
use crate::text::printable;

const TOKEN: &str = "demo-permanent-token";
const INTEGRATION: &str = "8e2a8a4f-0d1c-4c51-9d1e-5f6b0c1d2e3f";
const OTHER_INTEGRATION: &str = "b242c16d-70f4-4101-8df5-87b35bbe56f0";

fn asset(n: u32) -> String {
    format!("C078E8EE-C13A-4DA5-86EC8D6F3353{n:04X}")
}

fn page(n: u32) -> String {
    format!("https://cms.example/pages/{n}")
}

struct Lines;
impl Progress for Lines {
    fn planned(&self, total: u64) {
        if total > 0 {
            println!("  sending {total} operation(s) to the portal…");
        }
    }
    fn advanced(&self, done: u64) {
        if done.is_multiple_of(10) {
            println!("  … {done} done");
        }
    }
}

/// Runs the demonstration; prints as it goes.
pub async fn run_demo() -> anyhow::Result<Exit> {
    let portal = Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..Options::default()
    })
    .await
    .context("starting the simulated portal")?;
    let dir = tempfile::Builder::new()
        .prefix("bynder-usage-sync-demo-")
        .tempdir()?;
    let db = dir.path().join("state.db");
    println!("Simulated Bynder portal: {}", portal.base_url());
    println!("State database:          {}", db.display());
    println!("Integration id:          {INTEGRATION}\n");

    let config = Config::for_portal(&portal.base_url(), INTEGRATION, TOKEN, &db)?;
    let store = open_store(&config.database, OpenMode::Create).await?;
    // Someone else's usage of one of our assets: it must survive everything below.
    portal.seed_usage(
        OTHER_INTEGRATION,
        &asset(1),
        "https://wordpress.example/?p=7",
        "WordPress post",
    );

    println!("1. The CMS writes 24 references (12 assets on 8 pages) into cms_asset_references.");
    let rows: Vec<CmsRow> = (0..24u32)
        .map(|n| CmsRow {
            asset_id: asset(n % 12),
            uri: page(n % 8),
            additional: Some(format!("hero image, page {}", n % 8)),
        })
        .collect();
    store.insert_cms_rows(&rows).await?;
    let ctx = build_context(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let progress: Arc<dyn Progress> = Arc::new(Lines);
    let options = RunOptions {
        command: "demo",
        ..RunOptions::default()
    };

    println!("\n2. First resync:");
    let first = reconcile_with_progress(&ctx, &options, progress.clone()).await?;
    print_report(&first);

    println!("\n3. The CMS changes: 2 notes edited, 3 references removed, 2 added, 1 bad row.");
    let cms = &ctx.store;
    cms.set_cms_additional(&asset(0), &page(0), "teaser, moved below the fold")
        .await?;
    cms.set_cms_additional(&asset(1), &page(1), "gallery")
        .await?;
    cms.delete_cms_uri(&page(7)).await?;
    let added = |a: u32, p: u32| CmsRow {
        asset_id: asset(a),
        uri: page(p),
        additional: Some("new block".to_owned()),
    };
    let bad = CmsRow {
        asset_id: "not an id!".to_owned(),
        uri: "https://cms.example/x".to_owned(),
        additional: None,
    };
    cms.insert_cms_rows(&[added(20, 2), added(21, 3), bad])
        .await?;

    println!("\n4. Second resync:");
    let second = reconcile_with_progress(&ctx, &options, progress.clone()).await?;
    print_report(&second);

    println!("\n5. Third resync, nothing changed:");
    let third = reconcile_with_progress(&ctx, &options, progress).await?;
    print_report(&third);

    println!("\n6. What the portal now holds:");
    for u in portal.usages() {
        let owner = if u.integration_id == INTEGRATION {
            "ours "
        } else {
            "other"
        };
        println!(
            "  [{owner}] {} {:<36} {}",
            printable(&u.asset_id),
            printable(&u.uri),
            printable(&u.additional)
        );
    }
    let ours = portal.usages_for(INTEGRATION).len();
    let rows = ctx.store.cms_rows_with_bynder_ids().await?;
    let converged =
        ours as i64 == rows && third.outcome == RunOutcome::NothingToDo && third.sent.requests == 0;
    println!(
        "\n{} usage(s) of ours for {} valid row(s); the other integration's usage is untouched; \
         the last resync sent {} request(s).",
        ours, rows, third.sent.requests
    );
    ctx.store.close().await;
    portal.shutdown().await;
    if converged {
        println!("Demo finished: Bynder matches the CMS.");
        println!("{NEXT_STEPS}");
        Ok(Exit::Ok)
    } else {
        println!("Demo finished, but the portal does not match the CMS: this is a bug.");
        Ok(Exit::Unexpected)
    }
}

/// What the demo suggests trying next: the daemon with its status page, against a real portal.
const NEXT_STEPS: &str = "
Try next:
  1. Point a config at your portal: cp config/example.toml my.toml, then set bynder.base_url,
     bynder.integration_id, the token and database.path (`config check --config my.toml`
     validates it offline; `check --config my.toml` also reaches the portal).
  2. bynder-usage-sync --config my.toml migrate && bynder-usage-sync --config my.toml resync --dry-run
  3. bynder-usage-sync --config my.toml run
     then open http://127.0.0.1:9464/ (the status page; /healthz, /readyz and /metrics beside it).
  4. bynder-usage-sync --config my.toml probe --asset <an asset id> learns how your portal behaves.";

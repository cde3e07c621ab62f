//! Change capture: a write to `cms_asset_references` reaches Bynder within seconds while the
//! daemon runs on its default schedule (every 5 minutes, so nothing but change capture can have
//! sent it), bursts are coalesced, a bulk load goes out in a few batches, the mass-delete guard
//! holds, custom sources keep the schedule alone, and a scheduled reconcile skips the full merge
//! only when nothing can have changed.

use std::time::Duration;

use bynder_usage_sync::app::build_context;
use bynder_usage_sync::config::{load_config, ConfigSource};
use bynder_usage_sync::run::{self, RunOutcome};

use crate::common::*;
use crate::daemon::{converged, daemon_sections, eventually};
use crate::in_process::spawn_daemon;

/// The daemon on its defaults (the schedule every 5 minutes), with a port of its own.
fn defaults() -> Setup {
    Setup {
        extra: daemon_sections("5s"),
        ..Setup::default()
    }
}

/// Runs of the history by command, oldest first: (command, outcome).
async fn runs(app: &App) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT command, outcome FROM runs ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn log_entries(app: &App) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cms_changes")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn requests(app: &App) -> u64 {
    let c = app.portal.counters();
    c.by_route
        .iter()
        .filter(|(route, _)| route.contains("/api/media/usage"))
        .map(|(_, n)| n)
        .sum()
}

/// Waits until the daemon's reconcile at start-up has finished.
async fn started(daemon: &crate::in_process::SpawnedDaemon, app: &App) {
    eventually(
        daemon,
        "the reconcile at start-up",
        Duration::from_secs(20),
        || async {
            runs(app)
                .await
                .iter()
                .any(|(c, o)| c == "reconcile" && o.is_some())
        },
    )
    .await;
}

#[tokio::test]
async fn a_cms_write_reaches_bynder_within_seconds_without_waiting_for_the_schedule() {
    let app = spawn_app_with(defaults()).await;
    app.insert(&asset(1), &page(1), Some("hero")).await;
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;
    app.assert_converged().await;

    // One row at a time, as an editor saves: an insert, a changed note, a move, a delete.
    app.insert(&asset(2), &page(2), Some("teaser")).await;
    eventually(
        &daemon,
        "the new row in Bynder",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'hero, resized' WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    eventually(
        &daemon,
        "the changed note in Bynder",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    app.exec(&format!(
        "UPDATE cms_asset_references SET uri = '{}' WHERE asset_id = '{}'",
        page(3),
        asset(2)
    ))
    .await;
    eventually(
        &daemon,
        "the moved usage in Bynder",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    eventually(
        &daemon,
        "the deleted usage gone from Bynder",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    assert_eq!(app.ours().len(), 1);

    let history = runs(&app).await;
    assert_eq!(
        history.iter().filter(|(c, _)| c == "reconcile").count(),
        1,
        "only the reconcile at start-up ran; the schedule is every 5 minutes: {history:?}"
    );
    assert!(
        history
            .iter()
            .any(|(c, o)| c == "changes" && o.as_deref() == Some("converged")),
        "{history:?}"
    );
    // Settled entries are trimmed.
    eventually(
        &daemon,
        "an empty change log",
        Duration::from_secs(10),
        || async { log_entries(&app).await == 0 },
    )
    .await;
    daemon.stop().await.expect("the daemon stops cleanly");
}

/// REGRESSION: a change run that failed on the CMS's write lock (held past
/// `database.busy_timeout`) was never tried again; the row waited for the next schedule.
#[tokio::test]
async fn a_change_run_that_fails_on_a_held_lock_is_tried_again() {
    let app = spawn_app_with(defaults()).await;
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    std::fs::write(
        &app.config_path,
        config.replace(
            "path = \"state.db\"",
            "path = \"state.db\"\nbusy_timeout = \"1s\"",
        ),
    )
    .unwrap();
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;

    // The CMS commits a row, then holds the write lock for 3 s: the change run the row wakes
    // cannot record itself and fails after 1 s.
    use sqlx::Connection as _;
    let mut cms = sqlx::SqliteConnection::connect(&format!("sqlite://{}", app.db_path.display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO cms_asset_references (asset_id, uri) VALUES (?, ?)")
        .bind(asset(1))
        .bind(page(1))
        .execute(&mut cms)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut cms)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the CMS's long transaction, not a wait for the daemon
    sqlx::query("ROLLBACK").execute(&mut cms).await.unwrap();

    eventually(
        &daemon,
        "the row in Bynder after the lock",
        Duration::from_secs(15),
        || converged(&app),
    )
    .await;
    assert_eq!(app.ours().len(), 1);
    daemon.stop().await.expect("the daemon stops cleanly");
}

/// REGRESSION: a `cms_changes` table dropped by hand made every CMS write fail (the triggers
/// write it) until the next full pass.
#[tokio::test]
async fn a_dropped_change_log_is_put_back_by_the_running_daemon() {
    let app = spawn_app_with(defaults()).await;
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;
    app.exec("DROP TABLE cms_changes").await;
    // Each attempt on a new connection: one that ran the DROP keeps its own view of the schema
    // and does not see a table another connection created until it reloads it.
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", app.db_path.display());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cms = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let written = sqlx::query(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, NULL)",
        )
        .bind(asset(1))
        .bind(page(1))
        .execute(&mut cms)
        .await;
        match written {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the CMS still cannot write: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        &daemon,
        "the row in Bynder",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    daemon.stop().await.expect("the daemon stops cleanly");
}

#[tokio::test]
async fn a_burst_of_single_row_writes_is_coalesced_and_a_bulk_load_goes_out_in_a_few_batches() {
    let app = spawn_app_with(defaults()).await;
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;

    // 300 rows, each its own transaction, as fast as the CMS can write them.
    for n in 1..=300 {
        app.insert(&asset(n), &page(n % 7), None).await;
    }
    eventually(
        &daemon,
        "the burst in Bynder",
        Duration::from_secs(20),
        || converged(&app),
    )
    .await;
    let after_burst = requests(&app);
    assert!(
        after_burst <= 30,
        "300 writes within a moment go out in a few batches, not one request each: {after_burst} requests"
    );

    // 5,000 rows in one transaction: more assets than a change run plans alone, so one plan of
    // everything, sent in batches of the sync endpoint.
    let mut values = Vec::new();
    for n in 1_000..6_000 {
        values.push(format!("('{}', '{}', 'bulk')", asset(n), page(n % 500)));
    }
    app.exec(&format!(
        "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES {}",
        values.join(", ")
    ))
    .await;
    eventually(
        &daemon,
        "the bulk load in Bynder",
        Duration::from_secs(60),
        || converged(&app),
    )
    .await;
    let bulk = requests(&app) - after_burst;
    assert!(
        bulk <= 60,
        "20,000 rows go out in batches of the sync endpoint: {bulk} requests"
    );
    daemon.stop().await.expect("the daemon stops cleanly");
}

#[tokio::test]
async fn a_mass_delete_seen_by_change_capture_is_refused_and_waits_in_the_log() {
    let app = spawn_app_with(Setup {
        sync: "max_deletes = 3".to_owned(),
        ..defaults()
    })
    .await;
    for n in 1..=10 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;
    app.assert_converged().await;

    app.exec("DELETE FROM cms_asset_references WHERE rowid % 2 = 0")
        .await;
    eventually(
        &daemon,
        "a refused change run",
        Duration::from_secs(10),
        || async {
            runs(&app)
                .await
                .iter()
                .any(|(c, o)| c == "changes" && o.as_deref() == Some("mass_delete_refused"))
        },
    )
    .await;
    assert_eq!(app.ours().len(), 10, "nothing was deleted");
    assert!(
        log_entries(&app).await > 0,
        "the refused changes stay in the log"
    );
    daemon.stop().await.expect("the daemon stops cleanly");
    // `status` shows them waiting.
    let out = app.run(&["status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let capture = &status["change_capture"];
    assert_eq!(capture["triggers_installed"], true);
    assert!(
        capture["unplanned_entries"].as_i64().unwrap() > 0,
        "{capture}"
    );
    assert!(capture["last_full_pass"].is_string(), "{capture}");
    let out = app.run(&["status"]).await;
    assert!(stdout(&out).contains("not yet planned"), "{}", stdout(&out));

    // The operator confirms: the full pass sends the deletes and settles the log.
    let out = app.run(&["resync", "--allow-mass-delete"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
    assert_eq!(log_entries(&app).await, 0);
}

#[tokio::test]
async fn a_table_emptied_a_little_at_a_time_is_refused_like_a_truncation() {
    let app = spawn_app_with(Setup {
        sync: "max_deletes = 3".to_owned(),
        ..defaults()
    })
    .await;
    for n in 1..=10 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let daemon = spawn_daemon(&app).await;
    started(&daemon, &app).await;

    // Two deletes: within the limit, sent.
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id IN ('{}', '{}')",
        asset(1),
        asset(2)
    ))
    .await;
    eventually(
        &daemon,
        "the first deletes sent",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    // Two more, in another transaction: four since the last reconcile, over the limit of 3.
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id IN ('{}', '{}')",
        asset(3),
        asset(4)
    ))
    .await;
    eventually(
        &daemon,
        "a refused change run",
        Duration::from_secs(10),
        || async {
            runs(&app)
                .await
                .iter()
                .any(|(c, o)| c == "changes" && o.as_deref() == Some("mass_delete_refused"))
        },
    )
    .await;
    assert_eq!(app.ours().len(), 8, "the second deletes wait");
    // REGRESSION: a refused delete held back every later write until the next reconcile.
    app.insert(&asset(20), &page(20), None).await;
    eventually(
        &daemon,
        "an unrelated row in Bynder",
        Duration::from_secs(10),
        || async { app.ours().iter().any(|(a, _, _)| *a == asset(20)) },
    )
    .await;
    assert_eq!(app.ours().len(), 9, "the held deletes still wait");
    daemon.stop().await.expect("the daemon stops cleanly");

    // A reconcile decides on the whole table (two deletes, within the limit) and starts counting
    // again.
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
}

#[tokio::test]
async fn a_custom_source_query_is_not_planned_by_change_capture() {
    let app = spawn_app_with(Setup {
        extra: "[source]\nquery = \"SELECT asset_id, uri, additional FROM cms_asset_references\"\n"
            .to_owned(),
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), None).await;
    let source = ConfigSource::Explicit(app.config_path.clone());
    let ctx = build_context(load_config(&source).unwrap()).await.unwrap();
    let progress = std::sync::Arc::new(NoProgress);
    let report = run::changes_once(&ctx, progress).await.unwrap();
    assert!(report.is_none(), "a custom query keeps the schedule alone");
    assert!(app.ours().is_empty());
    ctx.store.close().await;
    // REGRESSION: the triggers kept logging writes no run ever trimmed; a full pass does now.
    assert!(log_entries(&app).await > 0);
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(log_entries(&app).await, 0, "the full pass settled the log");
}

struct NoProgress;

impl run::Progress for NoProgress {}

#[tokio::test]
async fn a_change_run_plans_only_the_changed_assets_and_settles_the_log() {
    let app = spawn_app().await;
    for n in 1..=5 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    // Bynder loses a usage behind our back: only a full pass with a read-back would see it, and
    // a plan of other assets must not touch it.
    app.insert(&asset(9), &page(9), Some("new")).await;
    let source = ConfigSource::Explicit(app.config_path.clone());
    let ctx = build_context(load_config(&source).unwrap()).await.unwrap();
    let report = run::changes_once(&ctx, std::sync::Arc::new(NoProgress))
        .await
        .unwrap()
        .expect("the log named an asset");
    assert_eq!(report.outcome, RunOutcome::Converged);
    assert_eq!(report.plan.creates, 1);
    assert_eq!(
        report.plan.rows_read, 1,
        "only the changed asset's rows were read"
    );
    assert_eq!(log_entries(&app).await, 0);
    assert!(run::changes_once(&ctx, std::sync::Arc::new(NoProgress))
        .await
        .unwrap()
        .is_none());
    ctx.store.close().await;
    app.assert_converged().await;
}

#[tokio::test]
async fn if_changed_skips_the_merge_only_while_nothing_can_have_changed() {
    let app = spawn_app().await;
    for n in 1..=5 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    let plan = |out: &std::process::Output| -> serde_json::Value {
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["plan"].clone()
    };
    let if_changed = || app.run(&["resync", "--if-changed", "--json"]);

    let out = if_changed().await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        plan(&out)["unchanged_since"].is_string(),
        "{}",
        stdout(&out)
    );
    assert_eq!(plan(&out)["rows_read"], 0);

    // A write through the triggers: the log is not empty, so the merge runs.
    app.insert(&asset(6), &page(6), None).await;
    let out = if_changed().await;
    assert!(plan(&out)["unchanged_since"].is_null());
    assert_eq!(plan(&out)["creates"], 1);
    app.assert_converged().await;
    assert!(if_changed().await.status.success());
    assert!(plan(&if_changed().await)["unchanged_since"].is_string());

    // An edit that bypasses the triggers changes the schema: the merge runs, and the
    // triggers are put back.
    app.exec("DROP TRIGGER cms_changes_after_insert").await;
    app.insert(&asset(7), &page(7), None).await;
    let out = if_changed().await;
    assert!(plan(&out)["unchanged_since"].is_null(), "{}", stdout(&out));
    assert_eq!(plan(&out)["creates"], 1);
    app.assert_converged().await;
    app.insert(&asset(8), &page(8), None).await;
    assert!(log_entries(&app).await > 0, "the trigger is back");
    let out = if_changed().await;
    assert_eq!(plan(&out)["creates"], 1);

    // REGRESSION: entries deleted from the log by hand made a change look settled.
    app.exec(&format!(
        "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('{}', '{}'); DELETE FROM cms_changes",
        asset(10),
        page(10)
    ))
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(8)
    ))
    .await;
    app.exec("DELETE FROM cms_changes").await;
    let out = if_changed().await;
    assert!(plan(&out)["unchanged_since"].is_null(), "{}", stdout(&out));
    assert_eq!(plan(&out)["creates"], 1);
    assert_eq!(plan(&out)["deletes"], 1);
    app.assert_converged().await;

    // A purged dead letter must be planned again: purging forgets the last full pass.
    assert!(plan(&if_changed().await)["unchanged_since"].is_string());
    let out = app.run(&["queue", "purge", "--dead"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(plan(&if_changed().await)["unchanged_since"].is_null());

    // Narrower prefixes change what is ours: the merge runs.
    assert!(plan(&if_changed().await)["unchanged_since"].is_string());
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    std::fs::write(
        &app.config_path,
        config.replace(
            "[sync]\n",
            "[sync]\nuri_prefixes = [\"https://cms.example/\"]\n",
        ),
    )
    .unwrap();
    assert!(plan(&if_changed().await)["unchanged_since"].is_null());
}

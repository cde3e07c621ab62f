//! Issue: reliability evidence — concurrency. The CMS writes `cms_asset_references` while
//! resyncs run, and two resyncs start at the same moment. (A resync during the daemon's `run`
//! belongs to the daemon suite.)

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;
use tokio::sync::watch;

use crate::common::*;
use bynder_usage_sync::simulator::Options;

/// What the CMS's writer did.
#[derive(Debug, Default)]
struct Writes {
    statements: u64,
    errors: Vec<String>,
}

/// The CMS: its own connection with the busy timeout the README asks for, writing short
/// transactions in a loop (inserts, note changes, deletes, and small multi-row transactions)
/// until told to stop.
async fn write_like_a_cms(pool: SqlitePool, seed: u64, mut stop: watch::Receiver<bool>) -> Writes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut writes = Writes::default();
    let mut round = 0u64;
    while !*stop.borrow() {
        round += 1;
        let n = rng.random_range(0..80u32);
        let result = match rng.random_range(0..4) {
            0 => sqlx::query(
                "INSERT OR REPLACE INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, ?)",
            )
            .bind(asset(n))
            .bind(page(n % 25))
            .bind(format!("w{round}"))
            .execute(&pool)
            .await
            .map(drop),
            1 => sqlx::query("UPDATE cms_asset_references SET additional = ? WHERE asset_id = ?")
                .bind(format!("u{round}"))
                .bind(asset(n))
                .execute(&pool)
                .await
                .map(drop),
            2 => sqlx::query("DELETE FROM cms_asset_references WHERE asset_id = ?")
                .bind(asset(n))
                .execute(&pool)
                .await
                .map(drop),
            _ => several_rows(&pool, n, round).await,
        };
        writes.statements += 1;
        if let Err(e) = result {
            writes.errors.push(e.to_string());
        }
        // A busy CMS: a save every few hundred microseconds, leaving the runs some CPU.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_micros(300)) => {}
            _ = stop.changed() => {}
        }
    }
    writes
}

/// A save touching several rows: one short write transaction, taken up front as a careful CMS
/// does (a deferred one that reads first can fail to upgrade).
async fn several_rows(pool: &SqlitePool, n: u32, round: u64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for k in n..n + 5 {
        sqlx::query(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, ?) \
             ON CONFLICT (asset_id, uri) DO UPDATE SET additional = excluded.additional",
        )
        .bind(asset(k % 80))
        .bind(page(k % 25))
        .bind(format!("t{round}"))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cms_writing_continuously_during_resyncs_never_sees_a_locked_database() {
    let app = spawn_app().await;
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    for n in 0..40 {
        app.insert(&asset(n), &page(n % 25), Some("start")).await;
    }
    let cms = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&app.db_path)
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let seed: u64 = rand::random();
    println!("concurrency writer seed {seed}");
    let (stop, stopped) = watch::channel(false);
    let writer = tokio::spawn(write_like_a_cms(cms, seed, stopped));

    let runs = crate::reliability::rounds_or(6) as u64;
    let mut sent = 0;
    for run in 0..runs {
        // Half the runs with each strategy, so both ways of sending meet the writer.
        let strategy = if run % 2 == 0 {
            "per_usage"
        } else {
            "sync_endpoint"
        };
        let out = app
            .run_env(
                &["resync"],
                &[("BYNDER_USAGE_SYNC_SYNC__STRATEGY", strategy)],
            )
            .await;
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run} ({strategy}): {}{err}",
            stdout(&out)
        );
        assert!(
            !err.contains("locked") && !err.contains("busy"),
            "run {run} ({strategy}): {err}"
        );
        sent += app.portal.counters().total;
        app.portal.reset_counters();
    }
    stop.send(true).unwrap();
    let writes = writer.await.unwrap();
    assert!(
        writes.errors.is_empty(),
        "the CMS's writes failed: {:?}",
        writes.errors
    );
    assert!(
        writes.statements >= runs,
        "the writer really wrote during the runs: {writes:?}"
    );
    assert!(sent > 0, "the runs had the writer's changes to send");

    // Quiet again: one more run makes the portal exactly the table.
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(app.others().len(), 1, "the other integration is untouched");
    app.portal.reset_counters();
    app.resync_expecting(0).await;
    assert_eq!(app.portal.counters().total, 0, "and nothing is left to do");
    println!(
        "figures: concurrent_cms_writes={} resyncs_during_writes={runs} locked_errors=0",
        writes.statements
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resyncs_started_at_once_both_succeed_and_send_each_change_once_per_usage() {
    two_resyncs_at_once("per_usage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resyncs_started_at_once_both_succeed_and_send_each_change_once_with_the_sync_endpoint()
{
    two_resyncs_at_once("sync_endpoint").await;
}

async fn two_resyncs_at_once(strategy: &str) {
    let rows = 40;
    let app = Arc::new(
        spawn_app_with(Setup {
            sync: format!("strategy = \"{strategy}\"\nbatch_size = 4"),
            // Slow enough that the first run is still sending when the second one is ready.
            portal: Options {
                permanent_tokens: vec![TOKEN.to_owned()],
                latency: Duration::from_millis(25),
                ..Options::default()
            },
            limits: "requests_per_second = 1000\nconcurrency = 2".to_owned(),
            ..Setup::default()
        })
        .await,
    );
    for n in 0..rows {
        app.insert(&asset(n), &page(n % 10), Some("note")).await;
    }
    let (a, b) = tokio::join!(app.run(&["resync"]), app.run(&["resync"]));
    for out in [&a, &b] {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{strategy}: {}{}",
            stdout(out),
            stderr(out)
        );
    }
    let waited = [&a, &b]
        .iter()
        .filter(|o| stderr(o).contains("another run is sending for this database"))
        .count();
    assert_eq!(
        waited, 1,
        "{strategy}: the runs overlapped and one waited for the other"
    );
    app.assert_converged().await;
    let c = app.portal.counters();
    let route = |key: &str| c.by_route.get(key).copied().unwrap_or(0);
    match strategy {
        "per_usage" => assert_eq!(
            route("POST /api/media/usage/"),
            u64::from(rows),
            "one create per row, none twice: {c:?}"
        ),
        _ => assert_eq!(
            route("POST /api/media/usage/sync"),
            10,
            "40 usages on 10 uris in batches of 4, none twice: {c:?}"
        ),
    }
    assert_eq!(
        route("DELETE /api/media/usage/"),
        0,
        "{strategy}: nothing to undo"
    );
    let second = [&a, &b]
        .into_iter()
        .find(|o| stderr(o).contains("another run is sending"))
        .unwrap();
    assert!(
        stdout(second).contains("nothing to do"),
        "{strategy}: the second run planned after the first had finished: {}",
        stdout(second)
    );
}

//! The real-time benchmarks: `cargo bench --bench realtime` (add `-- quick` for smaller sizes).
//! The release binary runs as the daemon (`bynder-usage-sync run`, on its defaults: the schedule
//! every 5 minutes) against the simulated portal on loopback with a realistic 50 ms per answer,
//! while this process writes the CMS table as a CMS would. Prints the figures BENCHMARKS.md
//! reports: the write-to-Bynder latency (one row at a time), a bulk load while running, the CPU
//! of the idle daemon, and the scheduled reconcile of a large unchanged table.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bynder_usage_sync::simulator::{Options, Simulator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

mod support;

use support::{asset, Workspace, BINARY, INTEGRATION, TOKEN};

/// The daemon's workspace: its own port, otherwise the defaults.
fn workspace(portal: &Simulator) -> Workspace {
    support::workspace(portal, "[server]\nlisten = \"127.0.0.1:0\"")
}

fn uri(i: u64) -> String {
    format!("https://cms.example/pages/{i}")
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run_all(quick));
}

async fn cms(db: &Path) -> SqliteConnection {
    let options = SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(30));
    SqliteConnection::connect_with(&options).await.unwrap()
}

async fn insert_rows(conn: &mut SqliteConnection, rows: impl Iterator<Item = (String, String)>) {
    let mut tx = conn.begin().await.unwrap();
    for (asset_id, uri) in rows {
        sqlx::query("INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, 'hero image')")
            .bind(asset_id)
            .bind(uri)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

fn start_daemon(ws: &Workspace) -> Child {
    Command::new(BINARY)
        .arg("--config")
        .arg(&ws.config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until a run named `command` has finished in the daemon's history.
async fn wait_for_run(db: &Path, command: &str) {
    let mut conn = cms(db).await;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE command = ? AND finished_at IS NOT NULL",
        )
        .bind(command)
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
        if done > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run_all(quick: bool) {
    println!(
        "realtime benchmarks ({})",
        if quick { "quick" } else { "full" }
    );
    latency_bulk_and_idle(quick).await;
    scheduled_reconcile(quick).await;
}

async fn latency_bulk_and_idle(quick: bool) {
    let portal = Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        latency: Duration::from_millis(50),
        ..Options::default()
    })
    .await
    .unwrap();
    let ws = workspace(&portal);
    let mut daemon = start_daemon(&ws);
    wait_for_run(&ws.db, "reconcile").await;
    let mut conn = cms(&ws.db).await;

    // One row at a time, as editors save: the time from the CMS's commit to the usage in Bynder.
    let writes = if quick { 10 } else { 60 };
    let mut latencies = Vec::new();
    for i in 0..writes {
        let key = (asset(7 * i), uri(i));
        insert_rows(&mut conn, std::iter::once(key.clone())).await;
        let committed = Instant::now();
        loop {
            let found = portal
                .usages_for(INTEGRATION)
                .iter()
                .any(|u| u.asset_id == key.0 && u.uri == key.1);
            if found {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(60),
                "write {i} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(committed.elapsed());
        // Editors do not save in lockstep with the daemon.
        tokio::time::sleep(Duration::from_millis(150 + (i * 37) % 400)).await;
    }
    latencies.sort();
    println!(
        "write to Bynder, one row at a time, {writes} writes, portal latency 50 ms: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 95.0).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );

    // A bulk load while the daemon runs: an export job writing transactions of 1,000 rows.
    let rows = if quick { 10_000u64 } else { 100_000 };
    let uris = rows / 5;
    let before = portal.counters().total;
    let started = Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1_000) {
        insert_rows(
            &mut conn,
            chunk
                .iter()
                .map(|i| (asset(1_000_000 + i), uri(100_000 + i % uris))),
        )
        .await;
    }
    let loaded = started.elapsed();
    let expected = writes as usize + rows as usize;
    loop {
        if portal.usages_for(INTEGRATION).len() >= expected {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the bulk load never converged"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let requests = portal.counters().total - before;
    let runs: Vec<(String, i64)> = sqlx::query_as(
        "SELECT command, count(*) FROM runs WHERE command != 'drain' GROUP BY command ORDER BY command",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    println!(
        "bulk load while running, {rows} rows on {uris} uris in transactions of 1,000: written in {:.1} s, in Bynder after {:.1} s, {requests} requests, runs {runs:?}",
        loaded.as_secs_f64(),
        converged.as_secs_f64(),
    );

    // The idle daemon: nothing to do until the next schedule.
    let idle = if quick { 10 } else { 60 };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(daemon.id());
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let used = cpu_seconds(daemon.id()) - cpu_before;
    println!(
        "idle daemon over {idle} s: {:.2} % of a core",
        100.0 * used / wall.elapsed().as_secs_f64()
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

/// The scheduled reconcile of an unchanged table: `resync --if-changed` (what the daemon's
/// scheduled reconcile runs) beside a plain `resync` (a full merge).
async fn scheduled_reconcile(quick: bool) {
    let portal = Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..Options::default()
    })
    .await
    .unwrap();
    let ws = workspace(&portal);
    let references = if quick { 100_000u64 } else { 1_000_000 };
    {
        let mut conn = cms(&ws.db).await;
        let mut tx = conn.begin().await.unwrap();
        for i in 0..references {
            let (a, u) = (asset(i), uri(i % (references / 5)));
            sqlx::query("INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, 'hero image')")
                .bind(&a)
                .bind(&u)
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("INSERT INTO recorded_usages (asset_id, uri, additional, synced_at) VALUES (?, ?, 'hero image', '2026-11-23T00:00:00.000Z')")
                .bind(&a)
                .bind(&u)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let timed = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(BINARY)
            .arg("--config")
            .arg(&ws.config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };
    // The first full pass settles the log the load filled.
    let settle = timed(&["resync"]);
    let mut full: Vec<Duration> = (0..3).map(|_| timed(&["resync"])).collect();
    let mut skipped: Vec<Duration> = (0..3).map(|_| timed(&["resync", "--if-changed"])).collect();
    full.sort();
    skipped.sort();
    println!(
        "scheduled reconcile, {references} unchanged references: --if-changed {:.3} s (median of 3), full merge {:.2} s (median of 3); first pass after the load (trims its log) {:.2} s; {} API calls",
        skipped[1].as_secs_f64(),
        full[1].as_secs_f64(),
        settle.as_secs_f64(),
        portal.counters().total,
    );
}

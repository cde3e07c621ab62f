//! The real-time benchmarks: `cargo bench --bench realtime` (add `-- quick` for smaller sizes).
//! The release binary runs as the daemon (`bynder-usage-sync run`, on its defaults: the schedule
//! every 5 minutes) against the simulated portal on loopback with a realistic 50 ms per answer,
//! while this process writes the CMS table as a CMS would. Prints the figures BENCHMARKS.md
//! reports: the write-to-Bynder latency (one row at a time), a bulk load while running, the CPU
//! of the idle daemon, the scheduled reconcile of a large unchanged table, and fail-over (two
//! daemons on one PostgreSQL state, the leader killed). Any word but `quick` runs only the
//! scenarios whose name contains it (`-- failover`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bynder_usage_sync::simulator::{Options, Simulator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

mod support;

use support::{asset, PgCluster, Workspace, BINARY, INTEGRATION, TOKEN};

/// The daemon's workspace: its own port, otherwise the defaults.
fn workspace(portal: &Simulator) -> Workspace {
    support::workspace(portal, "[server]\nlisten = \"127.0.0.1:0\"")
}

fn uri(i: u64) -> String {
    format!("https://cms.example/pages/{i}")
}

/// The scenarios, by the names a word on the command line matches.
const SCENARIOS: [&str; 4] = [
    "write-latency",
    "scheduled-reconcile",
    "postgres-write-latency",
    "failover",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    // Cargo adds `--bench`; every other word but `quick` picks scenarios by name.
    let words: Vec<&String> = args
        .iter()
        .filter(|a| *a != "quick" && !a.starts_with('-'))
        .collect();
    let selected: Vec<&str> = SCENARIOS
        .into_iter()
        .filter(|s| words.is_empty() || words.iter().any(|w| s.contains(w.as_str())))
        .collect();
    if selected.is_empty() {
        eprintln!("no scenario matches {words:?}; the scenarios: {SCENARIOS:?}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run_all(quick, &selected));
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

async fn run_all(quick: bool, selected: &[&str]) {
    println!(
        "realtime benchmarks ({}): {selected:?}",
        if quick { "quick" } else { "full" }
    );
    if selected.contains(&"write-latency") {
        latency_bulk_and_idle(quick).await;
    }
    if selected.contains(&"scheduled-reconcile") {
        scheduled_reconcile(quick).await;
    }
    if selected.contains(&"postgres-write-latency") {
        postgres_latency_and_idle(quick).await;
    }
    if selected.contains(&"failover") {
        failover(quick).await;
    }
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
        latencies.push(in_bynder_after(&portal, &key).await);
        // Editors do not save in lockstep with the daemon.
        tokio::time::sleep(Duration::from_millis(150 + (i * 37) % 400)).await;
    }
    print_latencies("", writes, latencies);

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

    print_idle_cpu("", &daemon, quick).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

/// How long after now the usage `key` shows in the portal.
async fn in_bynder_after(portal: &Simulator, key: &(String, String)) -> Duration {
    let committed = Instant::now();
    loop {
        let found = portal
            .usages_for(INTEGRATION)
            .iter()
            .any(|u| u.asset_id == key.0 && u.uri == key.1);
        if found {
            return committed.elapsed();
        }
        assert!(
            committed.elapsed() < Duration::from_secs(60),
            "the write of {key:?} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn print_latencies(backend: &str, writes: u64, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "{backend}write to Bynder, one row at a time, {writes} writes, portal latency 50 ms: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 95.0).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );
}

/// The idle daemon: nothing to do until the next schedule.
async fn print_idle_cpu(backend: &str, daemon: &Child, quick: bool) {
    let idle = if quick { 10 } else { 60 };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(daemon.id());
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let used = cpu_seconds(daemon.id()) - cpu_before;
    println!(
        "{backend}idle daemon over {idle} s: {:.2} % of a core",
        100.0 * used / wall.elapsed().as_secs_f64()
    );
}

/// For `scenario`: a throwaway PostgreSQL cluster, a portal answering after 50 ms, a daemon
/// workspace whose state (and CMS table) is a database there, with `extra` sections, and a
/// connection to it. `None` (and a line saying so) when PostgreSQL is not installed.
async fn on_postgres(
    scenario: &str,
    extra: &str,
) -> Option<(PgCluster, Simulator, Workspace, sqlx::PgPool)> {
    let Some(pg) = PgCluster::start() else {
        println!("{scenario}: skipped, PostgreSQL is not installed (Debian's postgresql package)");
        return None;
    };
    let url = pg.database(&scenario.replace('-', "_"));
    let portal = Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        latency: Duration::from_millis(50),
        ..Options::default()
    })
    .await
    .unwrap();
    let ws = support::workspace_on(
        &portal,
        &format!("{extra}\n[server]\nlisten = \"127.0.0.1:0\""),
        &format!("url = \"{url}\""),
    );
    let cms = sqlx::PgPool::connect(&url).await.unwrap();
    Some((pg, portal, ws, cms))
}

/// [`latency_bulk_and_idle`]'s one-row writes and idle CPU with the state (and the CMS table)
/// in PostgreSQL, where the server notifies the daemon of every committed write.
async fn postgres_latency_and_idle(quick: bool) {
    let Some((_pg, portal, ws, cms)) = on_postgres("postgres-write-latency", "").await else {
        return;
    };
    let mut daemon = start_daemon(&ws);
    let started = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE command = 'reconcile' AND finished_at IS NOT NULL",
        )
        .fetch_one(&cms)
        .await
        .unwrap_or(0);
        if done > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no reconcile at start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writes = if quick { 10 } else { 60 };
    let mut latencies = Vec::new();
    for i in 0..writes {
        let key = (asset(7 * i), uri(i));
        sqlx::query("INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ($1, $2, 'hero image')")
            .bind(&key.0)
            .bind(&key.1)
            .execute(&cms)
            .await
            .unwrap();
        latencies.push(in_bynder_after(&portal, &key).await);
        tokio::time::sleep(Duration::from_millis(150 + (i * 37) % 400)).await;
    }
    print_latencies("postgres: ", writes, latencies);
    print_idle_cpu("postgres: ", &daemon, quick).await;
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

/// The process id in the name of the session holding the leader lock (the daemon names itself
/// `bynder-usage-sync pid N …` there), once one holds it.
async fn leader_pid(pool: &sqlx::PgPool) -> Option<u32> {
    let name: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1112866818 LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap();
    name?
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)?
        .parse()
        .ok()
}

/// Fail-over on a PostgreSQL state: two daemons (`run`) on one database and one portal answering
/// after 50 ms. Each round the CMS writes a burst, the leader is killed with SIGKILL once it has
/// started sending it, more rows arrive, and the survivor takes over; a new replica replaces the
/// killed one. Measures, from the kill: the survivor holding the leader lock, its first request
/// to Bynder, and every row (the burst and those written after the kill) in Bynder exactly once.
async fn failover(quick: bool) {
    // Batches of 20: each burst takes several requests, so the kill falls amid them.
    let Some((_pg, portal, ws, cms)) = on_postgres("failover", "[sync]\nbatch_size = 20").await
    else {
        return;
    };
    let insert = |from: u64, count: u64| {
        let cms = cms.clone();
        async move {
            sqlx::query(
                "INSERT INTO cms_asset_references (asset_id, uri, additional) \
                 SELECT upper(lpad(to_hex(i), 8, '0')) || '-C13A-4DA5-86EC' || upper(lpad(to_hex(i), 12, '0')), \
                        'https://cms.example/pages/' || i, 'hero image' \
                 FROM generate_series($1::bigint, $2::bigint - 1) AS i",
            )
            .bind(from as i64)
            .bind((from + count) as i64)
            .execute(&cms)
            .await
            .unwrap();
        }
    };
    let mut daemons = vec![start_daemon(&ws), start_daemon(&ws)];
    let rounds = if quick { 3 } else { 10 };
    let (mut leads, mut first_requests, mut converged) = (Vec::new(), Vec::new(), Vec::new());
    let mut survivors_requests = 0;
    let mut written = 0u64;
    let mut mid_run = 0;
    for round in 0..rounds {
        // Both replicas up: one leads, and the other has had time to stand by.
        let waiting = Instant::now();
        let leader = loop {
            assert!(
                waiting.elapsed() < Duration::from_secs(60),
                "round {round}: no replica leads"
            );
            if let Some(pid) = leader_pid(&cms).await {
                if let Some(i) = daemons.iter().position(|d| d.id() == pid) {
                    break i;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // At a random point of the standby's 2 s polling cycle, or every round would measure one.
        tokio::time::sleep(Duration::from_millis(3000 + rand::random_range(0..2000))).await;
        let before = portal.counters().total;
        insert(written, 200).await;
        written += 200;
        while portal.counters().total < before + 2 {
            assert!(
                waiting.elapsed() < Duration::from_secs(120),
                "round {round}: the leader never sent the burst"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut killed = daemons.remove(leader);
        killed.kill().unwrap();
        let at_kill = Instant::now();
        killed.wait().unwrap();
        mid_run += usize::from((portal.usages_for(INTEGRATION).len() as u64) < written);
        let sent_by_the_dead = portal.counters().total;
        insert(written, 20).await;
        written += 20;
        let survivor = daemons[0].id();
        let (mut led, mut first) = (None, None);
        loop {
            if led.is_none() && leader_pid(&cms).await == Some(survivor) {
                led = Some(at_kill.elapsed());
            }
            if led.is_some() && first.is_none() && portal.counters().total > sent_by_the_dead {
                first = Some(at_kill.elapsed());
            }
            if first.is_some() && portal.usages_for(INTEGRATION).len() as u64 >= written {
                break;
            }
            assert!(
                at_kill.elapsed() < Duration::from_secs(300),
                "round {round}: the survivor never converged"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        converged.push(at_kill.elapsed());
        survivors_requests += portal.counters().total - sent_by_the_dead;
        leads.push(led.unwrap());
        first_requests.push(first.unwrap());
        let usages = portal.usages_for(INTEGRATION);
        let distinct: std::collections::HashSet<_> =
            usages.iter().map(|u| (&u.asset_id, &u.uri)).collect();
        assert_eq!(usages.len() as u64, written, "round {round}: a duplicate");
        assert_eq!(distinct.len() as u64, written, "round {round}: a duplicate");
        daemons.push(start_daemon(&ws));
    }
    for mut d in daemons {
        d.kill().unwrap();
        d.wait().unwrap();
    }
    let figures = |mut v: Vec<Duration>| {
        v.sort();
        format!(
            "p50 {:.2} s, max {:.2} s",
            percentile(&v, 50.0).as_secs_f64(),
            v.last().unwrap().as_secs_f64()
        )
    };
    println!(
        "fail-over, {rounds} SIGKILLs of the leader ({mid_run} with its burst not yet in Bynder), portal latency 50 ms: \
         the survivor leads after {}; its first request after {}; every row in Bynder once after {}; {written} rows, no duplicate; the survivors sent {:.1} requests per round",
        figures(leads),
        figures(first_requests),
        figures(converged),
        survivors_requests as f64 / rounds as f64,
    );
}

//! The benchmark suite: `cargo bench --bench reconcile` (add `-- quick` for smaller sizes, and
//! any other word to run only the scenarios whose name contains it, e.g. `-- first-sync`).
//! Drives the real release binary against the simulated portal on loopback and prints the
//! figures BENCHMARKS.md reports. Peak memory is the child's own maximum RSS, measured by a
//! fresh wrapper process per run (`getrusage(RUSAGE_CHILDREN)`), so runs do not mask each other.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bynder_usage_sync::simulator::{Options, RateLimit, Simulator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

mod support;

use support::{asset, workspace, workspace_on, PgCluster, BINARY, INTEGRATION, TOKEN};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--measure") {
        measure_child(&args[2..]);
        return;
    }
    let quick = args.iter().any(|a| a == "quick");
    // Cargo adds `--bench`; every other word but `quick` picks scenarios by name.
    let filters: Vec<String> = args[1..]
        .iter()
        .filter(|a| *a != "quick" && !a.starts_with('-'))
        .cloned()
        .collect();
    let selected = Selected(filters);
    for name in SCENARIOS {
        if !selected.runs(name) {
            println!("skipped: {name}");
        }
    }
    if !SCENARIOS.iter().any(|name| selected.runs(name)) {
        eprintln!(
            "no scenario matches {:?}; the scenarios: {SCENARIOS:?}",
            selected.0
        );
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run_all(quick, &selected));
}

/// The scenarios, by the names a filter matches.
const SCENARIOS: [&str; 6] = [
    "steady-state",
    "first-sync",
    "postgres-steady-state",
    "postgres-first-sync",
    "per-usage-rate",
    "baseline",
];

/// The scenario filter: no words runs everything, else the scenarios whose name contains one.
struct Selected(Vec<String>);

impl Selected {
    fn runs(&self, scenario: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| scenario.contains(f.as_str()))
    }

    /// Whether a PostgreSQL scenario runs.
    fn any_postgres(&self) -> bool {
        SCENARIOS
            .iter()
            .any(|s| s.starts_with("postgres") && self.runs(s))
    }
}

/// Runs the binary with `args`, then prints its exit code, wall time and peak RSS.
fn measure_child(args: &[String]) {
    let started = Instant::now();
    let status = Command::new(BINARY)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let elapsed = started.elapsed();
    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    println!(
        "exit={} elapsed_ms={} max_rss_kb={}",
        status.code().unwrap_or(-1),
        elapsed.as_millis(),
        usage.max_rss()
    );
}

struct Measured {
    exit: i32,
    elapsed: Duration,
    max_rss_mb: f64,
}

fn measured_run(config: &Path, args: &[&str]) -> Measured {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--measure")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> i64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in {text:?} / {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    Measured {
        exit: field("exit") as i32,
        elapsed: Duration::from_millis(field("elapsed_ms") as u64),
        max_rss_mb: field("max_rss_kb") as f64 / 1024.0,
    }
}

/// Fills the CMS table (and, when `recorded`, the recorded state as if already synced). The
/// change-capture triggers log every row; a first sync empties that log as part of its run.
async fn fill(db: &Path, references: u64, uris: u64, recorded: bool) {
    let options = SqliteConnectOptions::new().filename(db);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    for i in 0..references {
        let uri = format!("https://cms.example/pages/{}", i % uris);
        sqlx::query("INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, 'hero image')")
            .bind(asset(i))
            .bind(&uri)
            .execute(&mut *tx)
            .await
            .unwrap();
        if recorded {
            sqlx::query(
                "INSERT INTO recorded_usages (asset_id, uri, additional, synced_at) VALUES (?, ?, 'hero image', '2026-11-23T00:00:00.000Z')",
            )
            .bind(asset(i))
            .bind(&uri)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    if recorded {
        // Already synced: the full pass that did it settled the change log too.
        sqlx::query("DELETE FROM cms_changes")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn start_portal(options: Options) -> Simulator {
    Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..options
    })
    .await
    .unwrap()
}

async fn run_all(quick: bool, selected: &Selected) {
    println!(
        "bynder-usage-sync benchmarks ({} mode), binary {BINARY}",
        if quick { "quick" } else { "full" }
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    if selected.runs("steady-state") {
        steady_state(quick).await;
    }
    if selected.runs("first-sync") {
        first_sync(quick).await;
    }
    if selected.any_postgres() {
        match PgCluster::start() {
            Some(pg) => {
                if selected.runs("postgres-steady-state") {
                    postgres_steady_state(quick, &pg).await;
                }
                if selected.runs("postgres-first-sync") {
                    postgres_first_sync(quick, &pg).await;
                }
            }
            None => {
                println!("skipped: the PostgreSQL scenarios (no /usr/lib/postgresql/*/bin/initdb)")
            }
        }
    }
    if selected.runs("per-usage-rate") {
        per_usage_rate(quick).await;
    }
    if selected.runs("baseline") {
        baseline(quick).await;
    }
}

/// Steady state: nothing changed, so zero API calls; time and peak memory by table size.
async fn steady_state(quick: bool) {
    for references in if quick {
        vec![10_000u64, 100_000]
    } else {
        vec![100_000u64, 1_000_000]
    } {
        let portal = start_portal(Options::default()).await;
        let ws = workspace(&portal, "");
        fill(&ws.db, references, references / 5, true).await;
        let m = measured_run(&ws.config, &["resync"]);
        assert_eq!(m.exit, 0);
        println!(
            "steady_state references={references} api_calls={} elapsed_s={:.2} peak_rss_mb={:.1}",
            portal.counters().total,
            m.elapsed.as_secs_f64(),
            m.max_rss_mb
        );
    }
}

/// First sync through the sync endpoint: API calls and time.
async fn first_sync(quick: bool) {
    let (references, uris) = if quick {
        (20_000u64, 4_000u64)
    } else {
        (100_000, 20_000)
    };
    let portal = start_portal(Options::default()).await;
    let ws = workspace(&portal, "[sync]\nstrategy = \"sync_endpoint\"");
    fill(&ws.db, references, uris, false).await;
    let m = measured_run(&ws.config, &["resync"]);
    assert_eq!(m.exit, 0);
    assert_eq!(portal.usages_for(INTEGRATION).len() as u64, references);
    println!(
        "first_sync_sync_endpoint references={references} uris={uris} api_calls={} elapsed_s={:.2} peak_rss_mb={:.1}",
        portal.counters().total,
        m.elapsed.as_secs_f64(),
        m.max_rss_mb
    );
}

/// Fills a PostgreSQL state database's CMS table (and, when `recorded`, the recorded state) in
/// one statement each, with the same rows as [`fill`].
async fn fill_postgres(url: &str, references: u64, uris: u64, recorded: bool) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let rows = "SELECT upper(lpad(to_hex(i / 7), 8, '0')) || '-C13A-4DA5-86EC' || upper(lpad(to_hex(i / 7), 12, '0')) AS a, \
                'https://cms.example/pages/' || (i % $2) AS u FROM generate_series(0, $1 - 1) AS i";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO cms_asset_references (asset_id, uri, additional) SELECT a, u, 'hero image' FROM ({rows}) AS r"
    )))
    .bind(references as i64)
    .bind(uris as i64)
    .execute(&pool)
    .await
    .unwrap();
    if recorded {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO recorded_usages (asset_id, uri, additional, synced_at) \
             SELECT a, u, 'hero image', '2026-11-23T00:00:00.000Z' FROM ({rows}) AS r"
        )))
        .bind(references as i64)
        .bind(uris as i64)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("DELETE FROM cms_changes")
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    pool.close().await;
}

/// [`steady_state`] with the state in PostgreSQL.
async fn postgres_steady_state(quick: bool, pg: &PgCluster) {
    for references in if quick {
        vec![10_000u64, 100_000]
    } else {
        vec![100_000u64, 1_000_000]
    } {
        let url = pg.database(&format!("steady_{references}"));
        let portal = start_portal(Options::default()).await;
        let ws = workspace_on(&portal, "", &format!("url = \"{url}\""));
        fill_postgres(&url, references, references / 5, true).await;
        let m = measured_run(&ws.config, &["resync"]);
        assert_eq!(m.exit, 0);
        println!(
            "postgres_steady_state references={references} api_calls={} elapsed_s={:.2} peak_rss_mb={:.1}",
            portal.counters().total,
            m.elapsed.as_secs_f64(),
            m.max_rss_mb
        );
    }
}

/// [`first_sync`] with the state in PostgreSQL.
async fn postgres_first_sync(quick: bool, pg: &PgCluster) {
    let (references, uris) = if quick {
        (20_000u64, 4_000u64)
    } else {
        (100_000, 20_000)
    };
    let url = pg.database("first_sync");
    let portal = start_portal(Options::default()).await;
    let ws = workspace_on(
        &portal,
        "[sync]\nstrategy = \"sync_endpoint\"",
        &format!("url = \"{url}\""),
    );
    fill_postgres(&url, references, uris, false).await;
    let m = measured_run(&ws.config, &["resync"]);
    assert_eq!(m.exit, 0);
    assert_eq!(portal.usages_for(INTEGRATION).len() as u64, references);
    println!(
        "postgres_first_sync_sync_endpoint references={references} uris={uris} api_calls={} elapsed_s={:.2} peak_rss_mb={:.1}",
        portal.counters().total,
        m.elapsed.as_secs_f64(),
        m.max_rss_mb
    );
}

/// Bynder's own limit: 4,500 requests per 5 minutes.
const BYNDER_LIMIT: RateLimit = RateLimit {
    max_requests: 4500,
    window: Duration::from_secs(300),
};

/// per_usage under Bynder's own limit: the achieved rate.
async fn per_usage_rate(quick: bool) {
    let creates = if quick { 100u64 } else { 300 };
    let portal = start_portal(Options {
        rate_limit: Some(BYNDER_LIMIT),
        ..Options::default()
    })
    .await;
    let ws = workspace(
        &portal,
        "[sync]\nstrategy = \"per_usage\"\n[limits]\nrequests_per_second = 10",
    );
    fill(&ws.db, creates, creates, false).await;
    let m = measured_run(&ws.config, &["resync"]);
    assert_eq!(m.exit, 0);
    let c = portal.counters();
    let rate = c.total as f64 / m.elapsed.as_secs_f64();
    println!(
        "per_usage_rate configured_rps=10 requests={} elapsed_s={:.2} achieved_rps={rate:.2} ({:.0}% of configured) http_429={}",
        c.total,
        m.elapsed.as_secs_f64(),
        rate * 10.0,
        c.rate_limited
    );
}

/// Baseline: the same workload the way it is done by hand today (one GET per asset, then one
/// create per missing usage, sequentially), side by side with the daemon.
async fn baseline(quick: bool) {
    let (references, uris) = if quick { (400u64, 80u64) } else { (2_000, 400) };
    let latency = Duration::from_millis(20);
    let portal_a = start_portal(Options {
        latency,
        rate_limit: Some(BYNDER_LIMIT),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let calls = baseline_sync(&portal_a.base_url(), references, uris).await;
    let first_baseline = (calls, started.elapsed());
    let started = Instant::now();
    let calls = baseline_sync(&portal_a.base_url(), references, uris).await;
    let steady_baseline = (calls, started.elapsed());
    assert_eq!(portal_a.usages_for(INTEGRATION).len() as u64, references);

    let portal_b = start_portal(Options {
        latency,
        rate_limit: Some(BYNDER_LIMIT),
        ..Options::default()
    })
    .await;
    let ws = workspace(&portal_b, "");
    fill(&ws.db, references, uris, false).await;
    let first = measured_run(&ws.config, &["resync"]);
    let first_calls = portal_b.counters().total;
    portal_b.reset_counters();
    let steady = measured_run(&ws.config, &["resync"]);
    assert_eq!(portal_b.usages_for(INTEGRATION).len() as u64, references);
    println!("baseline_vs_daemon references={references} uris={uris} portal_latency_ms=20");
    println!(
        "  first sync : baseline api_calls={} elapsed_s={:.2} | daemon api_calls={} elapsed_s={:.2}",
        first_baseline.0,
        first_baseline.1.as_secs_f64(),
        first_calls,
        first.elapsed.as_secs_f64()
    );
    println!(
        "  no changes : baseline api_calls={} elapsed_s={:.2} | daemon api_calls={} elapsed_s={:.2}",
        steady_baseline.0,
        steady_baseline.1.as_secs_f64(),
        portal_b.counters().total,
        steady.elapsed.as_secs_f64()
    );
}

/// The hand-written way: for every asset, GET its usages, then create each missing one.
async fn baseline_sync(base_url: &str, references: u64, uris: u64) -> u64 {
    let http = reqwest::Client::new();
    let mut by_asset: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for i in 0..references {
        by_asset
            .entry(asset(i))
            .or_default()
            .push(format!("https://cms.example/pages/{}", i % uris));
    }
    let mut calls = 0;
    for (asset_id, wanted) in by_asset {
        let existing: Vec<serde_json::Value> = http
            .get(format!("{base_url}/api/media/usage/"))
            .bearer_auth(TOKEN)
            .query(&[
                ("asset_id", asset_id.as_str()),
                ("integration_id", INTEGRATION),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        calls += 1;
        for uri in wanted {
            if existing.iter().any(|u| u["uri"] == uri.as_str()) {
                continue;
            }
            let status = http
                .post(format!("{base_url}/api/media/usage/"))
                .bearer_auth(TOKEN)
                .form(&[
                    ("integration_id", INTEGRATION),
                    ("asset_id", &asset_id),
                    ("uri", &uri),
                    ("additional", "hero image"),
                ])
                .send()
                .await
                .unwrap()
                .status();
            assert!(status.is_success());
            calls += 1;
        }
    }
    calls
}

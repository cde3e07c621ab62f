//! Issue: durable retry queue, failure classes, rate limiting and crash safety.

use std::collections::HashSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common::*;
use bynder_usage_sync::simulator::{Faults, Options, RateLimit};

/// `RELIABILITY_ROUNDS` when set (the long variant, see RELIABILITY.md), else `default`: the
/// kill rounds here and the resyncs run against a writing CMS in `concurrency.rs`.
pub(crate) fn rounds_or(default: usize) -> usize {
    scaled("RELIABILITY_ROUNDS", default)
}

/// `RELIABILITY_ROWS` when set (the long variant), else `default`: the rows the fault tests sync.
fn rows_or(default: u32) -> u32 {
    scaled("RELIABILITY_ROWS", default as usize) as u32
}

fn scaled(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resyncs until one run exits 0 (faults may leave operations queued for the next run).
async fn resync_until_converged(app: &App, max_runs: usize) {
    for _ in 0..max_runs {
        let out = app.run(&["resync"]).await;
        match out.status.code() {
            Some(0) => return,
            Some(1) | Some(3) => continue,
            other => panic!("unexpected exit {other:?}: {}", stderr(&out)),
        }
    }
    panic!("no converging run within {max_runs} runs");
}

#[tokio::test]
async fn rejected_rows_become_dead_letters_and_wait_until_their_row_changes() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            missing_assets: HashSet::from([asset(2)]),
            ..Options::default()
        },
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    for n in 1..=3 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let out = app.resync_expecting(3).await;
    assert!(
        stdout(&out).contains("1 new dead letter(s)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        app.ours(),
        vec![
            (asset(1), page(1), String::new()),
            (asset(3), page(3), String::new())
        ]
    );

    let out = app.run(&["queue", "list", "--dead"]).await;
    assert!(
        stdout(&out).contains(&asset(2)) && stdout(&out).contains("does not know this asset"),
        "{}",
        stdout(&out)
    );
    let out = app.run(&["status"]).await;
    assert!(
        stdout(&out).contains("1 dead letter(s)"),
        "{}",
        stdout(&out)
    );

    // A rerun sends nothing for it, succeeds, and still says a dead letter waits.
    app.portal.reset_counters();
    let out = app.resync_expecting(0).await;
    assert!(
        stdout(&out).contains("1 dead letter(s) from earlier runs"),
        "{}",
        stdout(&out)
    );
    assert_eq!(app.portal.counters().total, 0);

    // A changed row is re-queued automatically.
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'fixed?' WHERE asset_id = '{}'",
        asset(2)
    ))
    .await;
    app.resync_expecting(3).await;
    assert_eq!(app.portal.counters().total, 1);

    // `queue retry` re-queues by hand; once the asset exists, it goes through.
    let out = app.run(&["queue", "list", "--dead", "--json"]).await;
    let dead: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = dead[0]["id"].as_i64().unwrap();
    let out = app.run(&["queue", "retry", &id.to_string()]).await;
    assert!(
        stdout(&out).contains("1 dead letter(s) re-queued"),
        "{}",
        stdout(&out)
    );
    app.portal.reset_counters();
    app.resync_expecting(3).await;
    assert_eq!(
        app.portal.counters().total,
        1,
        "the retried letter was sent once more"
    );

    let out = app.run(&["queue", "purge", "--dead"]).await;
    assert!(stdout(&out).contains("1 dead letter(s) purged"));
    let out = app.run(&["queue", "retry"]).await;
    assert_eq!(out.status.code(), Some(2), "retry needs --all or ids");
}

#[tokio::test]
async fn the_mass_delete_guard_stops_a_run_that_would_delete_everything() {
    let app = spawn_app_with(Setup {
        sync: "max_deletes = 3".to_owned(),
        ..Setup::default()
    })
    .await;
    for n in 0..5 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;

    app.exec("DELETE FROM cms_asset_references").await;
    app.portal.reset_counters();
    let out = app.resync_expecting(3).await;
    assert!(
        stdout(&out).contains("--allow-mass-delete"),
        "{}",
        stdout(&out)
    );
    assert_eq!(app.portal.counters().total, 0, "no delete is sent");
    assert_eq!(app.ours().len(), 5);

    // Fewer deletes than the limit, but the table is empty: still refused.
    app.insert(&asset(0), &page(0), Some("invalid because \u{1}"))
        .await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(app.ours().len(), 5);

    let out = app.run(&["resync", "--allow-mass-delete"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The invalid row holds its usage; everything else is gone.
    assert_eq!(app.ours(), vec![(asset(0), page(0), String::new())]);
}

#[tokio::test]
async fn a_create_and_a_delete_queued_while_the_portal_was_down_cancel_out() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = app
        .run_env(&["resync"], &[("BYNDER_USAGE_SYNC_BYNDER__BASE_URL", &url)])
        .await;
    assert_eq!(out.status.code(), Some(1));
    app.exec("DELETE FROM cms_asset_references").await;
    let out = app.resync_expecting(0).await;
    assert!(stdout(&out).contains("1 cancelled"), "{}", stdout(&out));
    assert_eq!(app.portal.counters().total, 0);
}

#[tokio::test]
async fn a_resync_converges_through_server_errors_dropped_connections_and_timeouts_per_usage() {
    converges_through_faults("per_usage").await;
}

#[tokio::test]
async fn a_resync_converges_through_server_errors_dropped_connections_and_timeouts_with_the_sync_endpoint(
) {
    converges_through_faults("sync_endpoint").await;
}

async fn converges_through_faults(strategy: &str) {
    let app = spawn_app_with(Setup {
        // Small batches: enough requests for the faults to hit many of them.
        sync: format!("strategy = \"{strategy}\"\nbatch_size = 3"),
        timeout: "300ms".to_owned(),
        retry: "initial_backoff = \"5ms\"\nmax_backoff = \"50ms\"\nmax_attempts = 8".to_owned(),
        limits: "requests_per_second = 1000\nconcurrency = 8".to_owned(),
        ..Setup::default()
    })
    .await;
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    let rows = rows_or(80);
    for n in 0..rows {
        app.insert(&asset(n), &page(n % 20), Some("first")).await;
    }
    app.portal.set_faults(Faults {
        server_error_rate: 0.2,
        drop_rate: 0.05,
        slow_rate: 0.03,
        slow_delay: Duration::from_millis(600),
        token_endpoint_down: false,
    });
    resync_until_converged(&app, 6).await;
    app.assert_converged().await;

    app.exec("UPDATE cms_asset_references SET additional = 'second' WHERE rowid % 3 = 0")
        .await;
    app.exec("DELETE FROM cms_asset_references WHERE rowid % 5 = 0")
        .await;
    for n in rows + 100..rows + 110 {
        app.insert(&asset(n), &page(n), None).await;
    }
    resync_until_converged(&app, 6).await;
    app.assert_converged().await;
    let faults = app.portal.counters().faults_injected;
    assert!(faults > 3, "faults were really injected");
    assert_eq!(app.others().len(), 1);
    println!(
        "figures: strategy={strategy} rows={rows} faults_injected={faults} duplicates_found=0 losses_found=0"
    );
}

#[tokio::test]
async fn below_the_portal_rate_limit_a_long_resync_gets_no_429() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            rate_limit: Some(RateLimit {
                max_requests: 20,
                window: Duration::from_millis(500),
            }),
            ..Options::default()
        },
        limits: "requests_per_second = 30\nblock_pause = \"1s\"".to_owned(),
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    for n in 0..60 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(app.portal.counters().rate_limited, 0);
}

#[tokio::test]
async fn above_the_portal_rate_limit_the_daemon_pauses_and_still_converges() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            rate_limit: Some(RateLimit {
                max_requests: 15,
                window: Duration::from_millis(300),
            }),
            ..Options::default()
        },
        limits: "requests_per_second = 500\nconcurrency = 4\nblock_pause = \"450ms\"".to_owned(),
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    for n in 0..45 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let out = app.resync_expecting(0).await;
    app.assert_converged().await;
    let c = app.portal.counters();
    assert!(
        c.rate_limited > 0,
        "the configured rate was above the portal's limit"
    );
    // Each block costs at most the requests already in flight when the first 429 came back:
    // during the pause itself nothing is sent.
    let blocks = c.rate_limited.div_ceil(4);
    assert!(
        c.rate_limited <= 4 * blocks && blocks <= 45 / 15 + 2,
        "{c:?}"
    );
    assert!(
        stderr(&out).contains("rate limit"),
        "the pause is logged: {}",
        stderr(&out)
    );
    println!(
        "figures: rate_limited_answers={} duplicates_found=0 losses_found=0",
        c.rate_limited
    );
}

#[tokio::test]
async fn a_resync_killed_at_random_points_always_converges_without_duplicates_per_usage() {
    survives_kills("per_usage", rounds_or(24), 60).await;
}

#[tokio::test]
async fn a_resync_killed_at_random_points_always_converges_without_duplicates_with_the_sync_endpoint(
) {
    // A round makes about 10 requests (40 usages on 10 uris, one uri per batch of 4): a kill
    // point drawn below that lands mid-run, so the guard on killed runs holds over long runs.
    survives_kills("sync_endpoint", rounds_or(20), 10).await;
}

/// SIGKILLs `rounds` resyncs, each after a random number (below `max_requests`) of requests
/// reached the portal, changing the CMS table between restarts.
async fn survives_kills(strategy: &str, rounds: usize, max_requests: u64) {
    let app = spawn_app_with(Setup {
        sync: format!("strategy = \"{strategy}\"\nbatch_size = 4"),
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            latency: Duration::from_millis(2),
            ..Options::default()
        },
        limits: "requests_per_second = 1000\nconcurrency = 4".to_owned(),
        ..Setup::default()
    })
    .await;
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(3), &page(3), "theirs");
    for n in 0..40 {
        app.insert(&asset(n), &page(n % 10), Some("v0")).await;
    }
    let seed: u64 = rand::random();
    println!("kill test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    for round in 0..rounds {
        let before = app.portal.counters().total;
        // Every round rewrites every note, so each run has ~80 requests to make before it is done.
        app.exec(&format!(
            "UPDATE cms_asset_references SET additional = 'round {round}'"
        ))
        .await;
        let kill_after = rng.random_range(0..max_requests);
        let mut child = binary()
            .arg("--config")
            .arg(&app.config_path)
            .arg("resync")
            .spawn()
            .unwrap();
        let killed = loop {
            if app.portal.counters().total >= before + kill_after {
                child.start_kill().unwrap();
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        child.wait().await.unwrap();
        kills += usize::from(killed);
        // The CMS keeps changing between restarts.
        let n = rng.random_range(0..50u32);
        match round % 3 {
            0 => app.exec(&format!("UPDATE cms_asset_references SET additional = 'v{round}' WHERE rowid % 4 = {}", n % 4)).await,
            1 => app.exec(&format!("DELETE FROM cms_asset_references WHERE asset_id = '{}'", asset(n))).await,
            _ => {
                app.exec(&format!(
                    "INSERT OR REPLACE INTO cms_asset_references (asset_id, uri, additional) VALUES ('{}', '{}', 'r{round}')",
                    asset(n),
                    page(n % 10)
                ))
                .await
            }
        }
    }
    assert!(
        kills * 5 >= rounds * 4,
        "only {kills} of {rounds} runs were killed mid-way"
    );
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(
        app.others().len(),
        1,
        "the other integration's usage survives"
    );
    // And a last run has nothing left to do.
    app.portal.reset_counters();
    app.resync_expecting(0).await;
    assert_eq!(app.portal.counters().total, 0);
    println!(
        "figures: strategy={strategy} kill_rounds={rounds} kills_mid_run={kills} duplicates_found=0 losses_found=0"
    );
}

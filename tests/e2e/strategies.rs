//! Issue: reconcile at scale — the sync endpoint, batch halving, fallback, sources, drift repair.

use std::collections::HashSet;

use crate::common::*;
use bynder_usage_sync::simulator::Options;

fn sync_setup(batch_size: usize, portal: Options) -> Setup {
    Setup {
        sync: format!("strategy = \"sync_endpoint\"\nbatch_size = {batch_size}"),
        portal,
        ..Setup::default()
    }
}

fn portal() -> Options {
    Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..Options::default()
    }
}

fn route(app: &App, key: &str) -> u64 {
    app.portal
        .counters()
        .by_route
        .get(key)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn the_sync_endpoint_converges_in_few_requests_and_follows_changes() {
    let app = spawn_app_with(sync_setup(50, portal())).await;
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    for n in 0..200 {
        app.insert(&asset(n), &page(n % 40), Some("v1")).await;
    }
    app.resync_expecting(0).await;
    app.assert_converged().await;
    let c = app.portal.counters();
    assert_eq!(c.total, 4, "200 usages on 40 uris in batches of 50: {c:?}");
    assert_eq!(route(&app, "POST /api/media/usage/sync"), 4);

    app.exec("UPDATE cms_asset_references SET additional = 'v2' WHERE rowid % 7 = 0")
        .await;
    app.exec("DELETE FROM cms_asset_references WHERE rowid % 11 = 0")
        .await;
    app.insert(&asset(500), &page(3), Some("new")).await;
    app.portal.reset_counters();
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert!(
        app.portal.counters().total <= 4,
        "{:?}",
        app.portal.counters()
    );
    assert_eq!(
        app.others().len(),
        1,
        "another integration on the same uri is never touched"
    );

    app.portal.reset_counters();
    app.resync_expecting(0).await;
    assert_eq!(app.portal.counters().total, 0);
}

#[tokio::test]
async fn a_uri_dropped_entirely_is_still_listed_so_its_usages_go() {
    let app = spawn_app_with(sync_setup(100, portal())).await;
    for n in 0..6 {
        app.insert(&asset(n), &page(n % 2), None).await;
    }
    app.resync_expecting(0).await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE uri = '{}'",
        page(1)
    ))
    .await;
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert!(app.ours().iter().all(|(_, uri, _)| *uri == page(0)));
}

#[tokio::test]
async fn rejected_assets_become_dead_letters_with_the_sync_endpoint() {
    let app = spawn_app_with(sync_setup(
        100,
        Options {
            missing_assets: HashSet::from([asset(2)]),
            ..portal()
        },
    ))
    .await;
    for n in 1..=3 {
        app.insert(&asset(n), &page(1), None).await;
    }
    app.resync_expecting(3).await;
    assert_eq!(
        app.ours(),
        vec![
            (asset(1), page(1), String::new()),
            (asset(3), page(1), String::new())
        ]
    );
    let out = app.run(&["queue", "list", "--dead"]).await;
    assert!(
        stdout(&out).contains(&asset(2)) && stdout(&out).contains("Asset not found"),
        "{}",
        stdout(&out)
    );
    // The rest of the uri keeps working, and the dead letter is not resent.
    app.insert(&asset(4), &page(1), None).await;
    app.resync_expecting(3).await;
    assert_eq!(app.ours().len(), 3);
}

#[tokio::test]
async fn a_batch_the_portal_finds_too_large_is_halved_until_it_fits() {
    // One batch at a time, so the count of refused batches is exact.
    let app = spawn_app_with(Setup {
        limits: "requests_per_second = 1000\nconcurrency = 1".to_owned(),
        ..sync_setup(
            64,
            Options {
                max_sync_usages: Some(10),
                ..portal()
            },
        )
    })
    .await;
    for n in 0..60 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    app.assert_converged().await;
    // 64 → 32 → 16 → 8: three refusals, then 8 batches of 8 usages (60 in all).
    assert_eq!(
        route(&app, "POST /api/media/usage/sync"),
        3 + 8,
        "{:?}",
        app.portal.counters()
    );
}

#[tokio::test]
async fn auto_falls_back_to_per_usage_calls_when_the_portal_has_no_sync_endpoint() {
    let app = spawn_app_with(Setup {
        portal: Options {
            sync_endpoint: false,
            ..portal()
        },
        ..Setup::default()
    })
    .await;
    for n in 0..8 {
        app.insert(&asset(n), &page(n), Some("x")).await;
    }
    let out = app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(
        route(&app, "POST /api/media/usage/sync"),
        1,
        "tried once, then per-usage for the rest of the run"
    );
    assert_eq!(route(&app, "POST /api/media/usage/"), 8);
    assert!(
        stderr(&out).contains("no sync endpoint"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn per_usage_never_calls_the_sync_endpoint() {
    let app = spawn_app_with(Setup {
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    for n in 0..5 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(route(&app, "POST /api/media/usage/sync"), 0);
    assert_eq!(route(&app, "POST /api/media/usage/"), 5);
}

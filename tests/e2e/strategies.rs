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
    // The rest of the uri keeps working, and the dead letter is not resent: a success.
    app.insert(&asset(4), &page(1), None).await;
    app.resync_expecting(0).await;
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

#[tokio::test]
async fn verify_repairs_usages_removed_added_and_edited_by_hand() {
    for strategy in ["per_usage", "sync_endpoint"] {
        let app = spawn_app_with(Setup {
            sync: format!("strategy = \"{strategy}\"\nuri_prefixes = [\"https://cms.example/\"]"),
            ..Setup::default()
        })
        .await;
        for n in 0..6 {
            app.insert(&asset(n), &page(n), Some("note")).await;
        }
        app.resync_expecting(0).await;
        let ours = app.portal.usages_for(INTEGRATION);
        // By hand in Bynder: one usage removed, one note edited (removed and re-added), one
        // extra usage of ours, one duplicate; plus usages that are not ours to touch.
        app.portal.remove_usage(&ours[0].id);
        app.portal.remove_usage(&ours[1].id);
        app.portal
            .seed_usage(INTEGRATION, &asset(1), &page(1), "edited by hand");
        app.portal.seed_usage(
            INTEGRATION,
            &asset(2),
            "https://cms.example/extra",
            "added by hand",
        );
        app.portal
            .seed_usage(INTEGRATION, &asset(3), &page(3), "note");
        app.portal.seed_usage(
            INTEGRATION,
            &asset(4),
            "https://elsewhere.example/p",
            "outside our prefixes",
        );
        app.portal
            .seed_usage(OTHER_INTEGRATION, &asset(5), &page(5), "theirs");

        // A plain resync trusts its records and sees nothing.
        app.portal.reset_counters();
        app.resync_expecting(0).await;
        assert_eq!(app.portal.counters().total, 0);

        let out = app.run(&["resync", "--verify", "--dry-run"]).await;
        assert!(
            stdout(&out).contains("1 missing, 1 extra, 1 duplicated, 1 with a wrong note"),
            "{strategy}: {}",
            stdout(&out)
        );
        let out = app.run(&["resync", "--verify"]).await;
        assert_eq!(out.status.code(), Some(0), "{strategy}: {}", stderr(&out));
        let mut expected = app.desired().await;
        expected.push((
            asset(4),
            "https://elsewhere.example/p".to_owned(),
            "outside our prefixes".to_owned(),
        ));
        expected.sort();
        assert_eq!(app.ours(), expected, "{strategy}");
        assert_eq!(app.others().len(), 1);

        // Once repaired, another verify finds no drift.
        let out = app
            .run(&["resync", "--verify", "--detailed-exitcode"])
            .await;
        assert_eq!(out.status.code(), Some(0), "{strategy}: {}", stdout(&out));
    }
}

#[tokio::test]
async fn detailed_exitcode_tells_drift_from_no_drift() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), Some("x")).await;
    let out = app
        .run(&["resync", "--dry-run", "--detailed-exitcode"])
        .await;
    assert_eq!(out.status.code(), Some(10));
    let text = stdout(&out);
    assert!(
        text.contains("Creates (1):") && text.contains(&asset(1)),
        "{text}"
    );
    app.resync_expecting(0).await;
    let out = app
        .run(&["resync", "--dry-run", "--detailed-exitcode"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    app.exec("DELETE FROM cms_asset_references").await;
    app.insert(&asset(2), &page(2), None).await;
    let out = app.run(&["resync", "--dry-run"]).await;
    let text = stdout(&out);
    assert!(
        text.contains("Creates (1):") && text.contains("Deletes (1):"),
        "{text}"
    );
}

#[tokio::test]
async fn a_custom_query_over_the_cms_database_is_read_only_and_validated() {
    let app = spawn_app().await;
    // The CMS's own database, with its own schema.
    let cms = app.dir.path().join("cms.sqlite");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", cms.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE products (id INTEGER PRIMARY KEY, slug TEXT, bynder_id TEXT COLLATE NOCASE, title TEXT, published INT)")
        .execute(&pool)
        .await
        .unwrap();
    for (id, asset_id, published) in [
        (1, asset(1), 1),
        (2, asset(2), 1),
        (3, asset(3), 0),
        (4, "bad id!".to_owned(), 1),
    ] {
        sqlx::query("INSERT INTO products VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(format!("p{id}"))
            .bind(asset_id)
            .bind(format!("Product {id}"))
            .bind(published)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let before = std::fs::read(&cms).unwrap();
    let query = "SELECT bynder_id AS asset_id, 'https://shop.example/p/' || slug AS uri, title AS additional FROM products WHERE published = 1";
    let source = [
        (
            "BYNDER_USAGE_SYNC_SOURCE__DATABASE",
            cms.display().to_string(),
        ),
        ("BYNDER_USAGE_SYNC_SOURCE__QUERY", query.to_owned()),
    ];
    let env: Vec<(&str, &str)> = source.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("1 skipped"), "{}", stdout(&out));
    assert_eq!(
        app.ours(),
        vec![
            (
                asset(1),
                "https://shop.example/p/p1".to_owned(),
                "Product 1".to_owned()
            ),
            (
                asset(2),
                "https://shop.example/p/p2".to_owned(),
                "Product 2".to_owned()
            ),
        ]
    );
    assert_eq!(
        std::fs::read(&cms).unwrap(),
        before,
        "the CMS database is never written"
    );

    // A query that fails is a configuration error naming the key.
    let broken = [(
        "BYNDER_USAGE_SYNC_SOURCE__DATABASE",
        cms.display().to_string().as_str().to_owned(),
    )];
    let env: Vec<(&str, &str)> = broken
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([(
            "BYNDER_USAGE_SYNC_SOURCE__QUERY",
            "SELECT nope FROM products",
        )])
        .collect();
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("source.query"), "{}", stderr(&out));
    // A statement that is not a SELECT is refused before it runs.
    let out = app
        .run_env(
            &["resync"],
            &[(
                "BYNDER_USAGE_SYNC_SOURCE__QUERY",
                "DELETE FROM cms_asset_references",
            )],
        )
        .await;
    assert_eq!(out.status.code(), Some(78));
}

#[tokio::test]
async fn a_table_of_many_pages_is_read_whole_and_in_order() {
    let app = spawn_app_with(Setup {
        sync: "strategy = \"sync_endpoint\"\nbatch_size = 5000".to_owned(),
        ..Setup::default()
    })
    .await;
    // 10,100 rows: more than two of the pages the table is read in.
    let mut tx = app.pool.begin().await.unwrap();
    for n in 0..10_100u32 {
        sqlx::query(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, ?)",
        )
        .bind(asset(n / 3))
        .bind(page(n % 500))
        .bind(if n % 2 == 0 { Some("even") } else { None })
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    // Keys stored as BLOBs sort after every TEXT key: reported, never sent, and the scan goes on.
    sqlx::query("INSERT INTO cms_asset_references (asset_id, uri) VALUES (CAST(? AS BLOB), ?)")
        .bind(asset(1))
        .bind("https://cms.example/blob")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let out = app.resync_expecting(0).await;
    assert!(
        stdout(&out).contains("10101 row(s) read, 1 skipped"),
        "{}",
        stdout(&out)
    );
    let mut desired = app.desired().await;
    desired.retain(|(_, uri, _)| uri != "https://cms.example/blob");
    assert_eq!(app.ours(), desired);

    app.portal.reset_counters();
    app.resync_expecting(0).await;
    assert_eq!(
        app.portal.counters().total,
        0,
        "nothing changed, nothing sent"
    );

    // Rows around the page boundaries go; their neighbours stay.
    app.exec("DELETE FROM cms_asset_references WHERE rowid IN (SELECT rowid FROM cms_asset_references ORDER BY asset_id, uri LIMIT 4 OFFSET 4998)").await;
    app.exec("DELETE FROM cms_asset_references WHERE rowid IN (SELECT rowid FROM cms_asset_references ORDER BY asset_id, uri LIMIT 2 OFFSET 9995)").await;
    app.resync_expecting(0).await;
    let mut desired = app.desired().await;
    desired.retain(|(_, uri, _)| uri != "https://cms.example/blob");
    assert_eq!(app.ours(), desired);
}

//! Issue: correct against any plausible Bynder. Where Bynder's documentation is silent the
//! simulated portal can behave either way (sync semantics exact or literal, sync answers full or
//! empty, ids re-cased, the sync endpoint missing, GET without an asset id allowed); the main
//! scenarios (first sync, incremental, deletes, a change run of only the changed assets, drift
//! repair, a crash) run under each mode, and
//! must leave no duplicate and no stale usage, send nothing on a rerun, and never touch another
//! integration's usage. Each of those runs on both state backends (`on_sqlite`, `on_postgres`,
//! as in `backends`): what the portal does must not depend on where the state is kept.

use std::time::Duration;

use crate::backends::{spawn_on, Backend, On};
use crate::common::*;
use bynder_usage_sync::simulator::{IdCase, Options, SyncAnswer, SyncSemantics};

fn options() -> Options {
    Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..Options::default()
    }
}

/// Our usages in the portal and the CMS rows, with asset ids folded to lower case: a portal
/// that re-cases ids holds the same usages under other spellings.
async fn assert_converged_ignoring_id_case(app: &On) {
    let fold = |v: Vec<(String, String, String)>| {
        let mut v: Vec<_> = v
            .into_iter()
            .map(|(a, u, n)| (a.to_ascii_lowercase(), u, n))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        fold(app.ours()),
        fold(app.desired().await),
        "the portal must hold exactly the CMS rows, once each"
    );
}

/// Runs `resync` (with `args`), expects exit 0, converged, and then a rerun that sends nothing.
async fn resync_converges(app: &On, args: &[&str], step: &str) {
    let mut all = vec!["resync"];
    all.extend_from_slice(args);
    let out = app.run(&all).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{step}: stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert_converged_ignoring_id_case(app).await;
    let before = app.portal().counters().total;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{step} rerun: {}", stderr(&out));
    assert_eq!(
        app.portal().counters().total,
        before,
        "{step}: a rerun with nothing changed sends zero requests"
    );
}

/// Runs one change run (only the assets the change log names are planned) in process, expects it
/// to converge, and then a resync that sends nothing: what it sent is what a full pass would have.
async fn change_run_converges(app: &On, step: &str) {
    use bynder_usage_sync::run::{self, RunOutcome};
    struct Quiet;
    impl run::Progress for Quiet {}
    let source = bynder_usage_sync::config::ConfigSource::Explicit(app.app.config_path.clone());
    let config = bynder_usage_sync::config::load_config(&source).unwrap();
    let ctx = bynder_usage_sync::app::build_context(config).await.unwrap();
    let report = run::changes_once(&ctx, std::sync::Arc::new(Quiet))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{step}: the change log names the changed assets"));
    ctx.store.close().await;
    assert!(
        matches!(report.outcome, RunOutcome::Converged),
        "{step}: {:?}",
        report.outcome
    );
    assert_converged_ignoring_id_case(app).await;
    let before = app.portal().counters().total;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{step} rerun: {}", stderr(&out));
    assert_eq!(
        app.portal().counters().total,
        before,
        "{step}: a full pass after the change run finds nothing to send"
    );
}

/// Kills a resync once a few requests reached the portal, then lets the next one finish.
async fn crash_and_recover(app: &On, kill_after: u64) {
    let before = app.portal().counters().total;
    let mut child = binary()
        .arg("--config")
        .arg(&app.app.config_path)
        .arg("resync")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if app.portal().counters().total >= before + kill_after {
            child.start_kill().unwrap();
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    child.wait().await.unwrap();
}

/// First sync, incremental changes, deletes (an asset leaving a page that keeps others, and a
/// page emptied), drift repaired by `--verify`, and a crash, under one portal behaviour.
async fn scenario(backend: Backend, portal: Options) {
    let app = spawn_on(
        backend,
        Setup {
            portal,
            sync: "batch_size = 4".to_owned(),
            limits: "requests_per_second = 1000\nconcurrency = 2".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    app.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    let theirs = app.others();

    // First sync: 18 rows, 6 assets on 6 pages, every page holding three assets.
    for a in 0..6u32 {
        for k in 0..3u32 {
            app.insert(&asset(a), &page((a + k) % 6), Some("v1")).await;
        }
    }
    resync_converges(&app, &[], "first sync").await;

    // Incremental: new notes, a new row.
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'v2' WHERE uri IN ('{}', '{}')",
        page(0),
        page(3)
    ))
    .await;
    app.insert(&asset(7), &page(2), Some("new")).await;
    resync_converges(&app, &[], "incremental").await;

    // Deletes: an asset leaves a page that keeps other assets; a page loses every asset.
    let kept_page = page(2);
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE uri = '{kept_page}' AND asset_id = '{}'",
        asset(7)
    ))
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE uri = '{}'",
        page(3)
    ))
    .await;
    resync_converges(&app, &[], "deletes").await;

    // Change capture: one asset's note changes and another leaves a page that keeps other
    // assets; only those two assets are planned, the pages' other usages must stay.
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'v2b' WHERE asset_id = '{}'",
        asset(0)
    ))
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}' AND uri = '{}'",
        asset(4),
        page(4)
    ))
    .await;
    change_run_converges(&app, "change run").await;

    // Drift: a usage removed by hand, a stray usage and a duplicate added under our integration.
    let ours = app.portal().usages_for(INTEGRATION);
    let victim = ours.first().expect("usages to remove").clone();
    assert!(app.portal().remove_usage(&victim.id));
    app.portal()
        .seed_usage(INTEGRATION, &asset(2), &page(5), "stray");
    let twin = ours.last().unwrap().clone();
    app.portal()
        .seed_usage(INTEGRATION, &twin.asset_id, &twin.uri, &twin.additional);
    resync_converges(&app, &["--verify"], "drift repair").await;

    // A crash mid-run, while every note changes.
    app.exec("UPDATE cms_asset_references SET additional = 'v3'")
        .await;
    crash_and_recover(&app, 2).await;
    resync_converges(&app, &[], "after a crash").await;

    assert_eq!(
        app.others(),
        theirs,
        "another integration's usage is never touched"
    );
}

on_both!(
    an_exact_portal_with_full_answers_converges,
    scenario,
    options()
);
on_both!(
    a_literal_portal_that_keeps_omitted_assets_converges,
    scenario,
    Options {
        sync_semantics: SyncSemantics::Literal,
        ..options()
    }
);
on_both!(
    a_portal_that_answers_sync_with_204_converges,
    scenario,
    Options {
        sync_answer: SyncAnswer::NoContent,
        ..options()
    }
);
on_both!(
    a_literal_portal_that_answers_sync_with_an_empty_object_converges,
    scenario,
    Options {
        sync_semantics: SyncSemantics::Literal,
        sync_answer: SyncAnswer::EmptyObject,
        ..options()
    }
);
on_both!(
    a_literal_portal_that_answers_sync_with_an_empty_array_converges_with_sync_endpoint_strategy,
    empty_array_answers
);
on_both!(
    a_portal_that_answers_ids_in_lower_case_converges,
    scenario,
    Options {
        id_case: IdCase::Lower,
        sync_semantics: SyncSemantics::Literal,
        ..options()
    }
);
on_both!(
    a_portal_without_the_sync_endpoint_converges,
    scenario,
    Options {
        sync_endpoint: false,
        ..options()
    }
);
on_both!(
    a_portal_that_lists_without_an_asset_id_converges,
    scenario,
    Options {
        list_without_asset_id: true,
        sync_answer: SyncAnswer::NoContent,
        sync_semantics: SyncSemantics::Literal,
        ..options()
    }
);

/// A literal portal answering its sync with `[]`, the strategy forced to the sync endpoint:
/// every change is settled by a read-back, never resent.
async fn empty_array_answers(backend: Backend) {
    let app = spawn_on(
        backend,
        Setup {
            portal: Options {
                sync_semantics: SyncSemantics::Literal,
                sync_answer: SyncAnswer::EmptyArray,
                ..options()
            },
            sync: "strategy = \"sync_endpoint\"\nbatch_size = 4".to_owned(),
            limits: "requests_per_second = 1000".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    for n in 0..12u32 {
        app.insert(&asset(n % 4), &page(n % 3), Some("v1")).await;
    }
    resync_converges(&app, &[], "first sync").await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}' AND uri = '{}'",
        asset(0),
        page(0)
    ))
    .await;
    resync_converges(&app, &[], "an asset leaves a page that keeps others").await;
}

/// REGRESSION: on a portal whose sync removes a usage only when its uri has no usage left in the
/// request, an asset dropped from a page that keeps other assets stayed in Bynder forever while
/// the delete was recorded as done.
#[tokio::test]
async fn an_asset_dropped_from_a_page_that_keeps_others_is_deleted_on_a_literal_portal() {
    let app = spawn_app_with(Setup {
        portal: Options {
            sync_semantics: SyncSemantics::Literal,
            ..options()
        },
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), Some("a")).await;
    app.insert(&asset(2), &page(1), Some("b")).await;
    app.resync_expecting(0).await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(2)
    ))
    .await;
    app.resync_expecting(0).await;
    app.assert_converged().await;

    // The portal was learned: the next such delete goes out directly, without a read-back.
    let out = app.run(&["status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let facts = status["portal_profile"].as_array().unwrap();
    assert!(
        facts
            .iter()
            .any(|f| f["fact"] == "sync_removes_omitted" && f["value"] == "no"),
        "{status}"
    );
    app.insert(&asset(3), &page(1), Some("c")).await;
    app.resync_expecting(0).await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(3)
    ))
    .await;
    app.portal.reset_counters();
    app.resync_expecting(0).await;
    app.assert_converged().await;
    let counters = app.portal.counters();
    assert_eq!(
        counters.by_route.get("GET /api/media/usage/"),
        None,
        "no read-back once the portal is known: {:?}",
        counters.by_route
    );
    assert_eq!(
        counters.by_route.get("DELETE /api/media/usage/"),
        Some(&1),
        "{:?}",
        counters.by_route
    );
}

/// REGRESSION: a sync answered 204 (or `{}`, `[]`) ended every run with exit 3 and every rerun
/// resent everything.
#[tokio::test]
async fn a_sync_answered_204_settles_by_read_back_and_is_never_resent() {
    let app = spawn_app_with(Setup {
        portal: Options {
            sync_answer: SyncAnswer::NoContent,
            ..options()
        },
        ..Setup::default()
    })
    .await;
    for n in 0..12u32 {
        app.insert(&asset(n), &page(n % 3), Some("x")).await;
    }
    app.resync_expecting(0).await;
    app.assert_converged().await;
    let syncs = |app: &App| {
        app.portal
            .counters()
            .by_route
            .get("POST /api/media/usage/sync")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(syncs(&app), 1, "one sync, then read-backs, no resend");
    let before = app.portal.counters().total;
    app.resync_expecting(0).await;
    assert_eq!(app.portal.counters().total, before);

    // Learned: the next change goes per usage, whose answers are certain.
    app.insert(&asset(20), &page(1), Some("y")).await;
    app.portal.reset_counters();
    app.resync_expecting(0).await;
    app.assert_converged().await;
    let counters = app.portal.counters();
    assert_eq!(counters.total, 1, "{:?}", counters.by_route);
    assert_eq!(counters.by_route.get("POST /api/media/usage/"), Some(&1));
}

#[tokio::test]
async fn two_rows_that_differ_only_in_the_case_of_the_asset_id_are_one_usage() {
    let app = spawn_app_with(Setup {
        portal: Options {
            id_case: IdCase::Lower,
            ..options()
        },
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), Some("upper")).await;
    app.insert(&asset(1).to_lowercase(), &page(1), Some("lower"))
        .await;
    let out = app.run(&["resync", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["plan"]["skipped"], 1, "{report}");
    let reason = report["plan"]["skipped_rows"][0]["reason"]
        .as_str()
        .unwrap();
    assert!(reason.contains("letter case"), "{reason}");
    assert_eq!(
        report["plan"]["skipped_rows"][0]["asset_id"],
        asset(1).to_lowercase()
    );
    let ours = app.ours();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].2, "upper");

    // The CMS rewrites the id in another case: still the same usage, nothing to send.
    app.exec("DELETE FROM cms_asset_references").await;
    app.insert(&asset(1).to_lowercase(), &page(1), Some("upper"))
        .await;
    let before = app.portal.counters().total;
    app.resync_expecting(0).await;
    assert_eq!(app.portal.counters().total, before);
    assert_eq!(app.ours().len(), 1);
}

/// What `probe --json` reported for one fact of the profile.
fn fact(report: &serde_json::Value, name: &str) -> String {
    report["portal_profile"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fact"] == name)
        .and_then(|f| f["value"].as_str())
        .unwrap_or("(not learned)")
        .to_owned()
}

#[tokio::test]
async fn probe_reports_each_portal_behaviour_and_leaves_nothing_behind() {
    struct Case {
        portal: Options,
        expect: [(&'static str, &'static str); 6],
    }
    let cases = [
        Case {
            portal: options(),
            expect: [
                ("sync_endpoint", "yes"),
                ("sync_answer", "full"),
                ("sync_removes_omitted", "yes"),
                ("asset_id_case", "preserved"),
                ("repeated_create", "duplicates"),
                ("list_without_asset_id", "no"),
            ],
        },
        Case {
            portal: Options {
                sync_semantics: SyncSemantics::Literal,
                sync_answer: SyncAnswer::NoContent,
                id_case: IdCase::Lower,
                list_without_asset_id: true,
                ..options()
            },
            expect: [
                ("sync_endpoint", "yes"),
                ("sync_answer", "empty"),
                ("sync_removes_omitted", "no"),
                ("asset_id_case", "recased"),
                ("repeated_create", "duplicates"),
                ("list_without_asset_id", "yes"),
            ],
        },
        Case {
            portal: Options {
                sync_endpoint: false,
                sync_answer: SyncAnswer::EmptyArray,
                ..options()
            },
            expect: [
                ("sync_endpoint", "no"),
                ("sync_answer", "(not learned)"),
                ("sync_removes_omitted", "(not learned)"),
                ("asset_id_case", "preserved"),
                ("repeated_create", "duplicates"),
                ("list_without_asset_id", "no"),
            ],
        },
    ];
    for case in cases {
        let app = spawn_app_with(Setup {
            portal: case.portal,
            ..Setup::default()
        })
        .await;
        app.portal
            .seed_usage(OTHER_INTEGRATION, &asset(1), "urn:elsewhere", "theirs");
        let theirs = app.others();
        let out = app
            .run(&[
                "probe",
                "--asset",
                &asset(1),
                "--asset",
                &asset(2),
                "--json",
            ])
            .await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (name, value) in case.expect {
            assert_eq!(fact(&report, name), value, "{name} in {report:#}");
        }
        assert!(
            app.ours().is_empty(),
            "the probe leaves nothing behind: {:?}",
            app.ours()
        );
        assert_eq!(app.others(), theirs);
        assert_eq!(report["left_behind"], serde_json::json!([]));

        // The profile is stored: `status` shows it.
        let out = app.run(&["status"]).await;
        let text = stdout(&out);
        assert!(text.contains("Portal profile:"), "{text}");
        assert!(text.contains("a repeated create"), "{text}");
    }
}

#[tokio::test]
async fn probe_with_one_asset_says_what_it_could_not_test() {
    let app = spawn_app().await;
    let out = app.run(&["probe", "--asset", &asset(1)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("not tested"), "{text}");
    assert!(text.contains("give --asset twice"), "{text}");
    assert!(text.contains("clean-up"), "{text}");
    assert!(app.ours().is_empty());
}

#[tokio::test]
async fn probe_of_an_asset_the_portal_does_not_have_fails_with_the_fix() {
    let app = spawn_app_with(Setup {
        portal: Options {
            missing_assets: [asset(9)].into_iter().collect(),
            ..options()
        },
        ..Setup::default()
    })
    .await;
    let out = app.run(&["probe", "--asset", &asset(9)]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("exists in this portal"),
        "{}",
        stderr(&out)
    );
    assert!(app.ours().is_empty());
}

#[tokio::test]
async fn probe_with_one_asset_borrows_a_second_from_the_cms_table() {
    let app = spawn_app_with(Setup {
        portal: Options {
            sync_semantics: SyncSemantics::Literal,
            ..options()
        },
        ..Setup::default()
    })
    .await;
    app.insert(&asset(5), &page(1), Some("cms")).await;
    let out = app.run(&["probe", "--asset", &asset(1), "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fact(&report, "sync_removes_omitted"), "no", "{report:#}");
    assert!(app.ours().is_empty(), "{:?}", app.ours());
}

//! Hardening found by a security review and a first-use trial: private state files, a bounded
//! run lock, dead letters that do not poison later runs, configuration reloads, and what the
//! binary prints.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bynder_usage_sync::files::{FileLock, Modes};
use bynder_usage_sync::simulator::Options;

use crate::common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs the binary under `umask 022`, the common default that made every state file 0644.
async fn run_with_umask(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bynder-usage-sync"))
        .arg("--config")
        .arg(config)
        .args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("BYNDER_USAGE_SYNC_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.output().await.expect("run the binary")
}

/// A config for `app`'s portal whose database lives in a folder that does not exist yet.
fn config_in_new_folder(app: &App, extra_database: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "path = \"state.db\"",
        &format!("path = \"private/state/state.db\"\n{extra_database}"),
    );
    let path = app.dir.path().join("private.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn assert_state_modes(group_shared: bool) {
    let app = spawn_app().await;
    let extra = if group_shared {
        "group_shared = true"
    } else {
        ""
    };
    let config = config_in_new_folder(&app, extra);
    let out = run_with_umask(&config, &["migrate"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = app.dir.path().join("private/state/state.db");
    // A writer keeps -wal and -shm in place while the daemon runs.
    let cms = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO cms_asset_references (asset_id, uri) VALUES (?, ?)")
        .bind(asset(1))
        .bind(page(1))
        .execute(&cms)
        .await
        .unwrap();
    let out = run_with_umask(&config, &["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(app.portal.usages_for(INTEGRATION).len(), 1);

    let (folder, file) = if group_shared {
        (0o2770, 0o660)
    } else {
        (0o700, 0o600)
    };
    assert_eq!(mode(&app.dir.path().join("private")), folder);
    assert_eq!(mode(&app.dir.path().join("private/state")), folder);
    for name in ["state.db", "state.db-wal", "state.db-shm", "state.db.lock"] {
        let path = app.dir.path().join("private/state").join(name);
        assert!(
            path.exists(),
            "{name} should exist while the CMS holds the database"
        );
        assert_eq!(mode(&path), file, "mode of {name}");
    }
    assert!(
        !stderr(&out).contains("the state f"),
        "no warning for files it made itself: {}",
        stderr(&out)
    );
    cms.close().await;
}

/// REGRESSION: under umask 022 the state database, its -wal and -shm files and the run lock were
/// created 0644 and new folders 0755, readable by every local user while the settings table
/// holds refresh tokens.
#[tokio::test]
async fn state_files_and_folders_are_private_whatever_the_umask() {
    assert_state_modes(false).await;
}

#[tokio::test]
async fn group_shared_state_gives_the_group_access_and_no_one_else() {
    assert_state_modes(true).await;
}

#[tokio::test]
async fn an_existing_state_file_readable_by_others_is_reported_with_the_fix() {
    let app = spawn_app().await;
    std::fs::set_permissions(&app.db_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = app.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("other users can read it"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", app.db_path.display())),
        "{err}"
    );
}

/// REGRESSION: another local user holding `flock` on state.db.lock stalled every run forever;
/// the wait is now bounded and the error names the holder.
#[tokio::test]
async fn a_run_lock_held_elsewhere_is_waited_for_a_bounded_time_then_named() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    let config = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "path = \"state.db\"",
        "path = \"state.db\"\nlock_timeout = \"1s\"",
    );
    std::fs::write(&app.config_path, config).unwrap();
    let held = FileLock::acquire(
        &app.db_path,
        Modes::new(false),
        Duration::from_secs(5),
        "a stuck resync",
    )
    .await
    .unwrap();

    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("process {} (a stuck resync)", std::process::id())),
        "{err}"
    );
    assert!(err.contains("database.lock_timeout"), "{err}");
    assert!(app.ours().is_empty(), "nothing is sent without the lock");

    drop(held);
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

/// REGRESSION: a database whose cms_asset_references table the CMS created itself, never
/// migrated, was reported as having no such table.
#[tokio::test]
async fn a_cms_table_without_migrations_is_told_apart_from_a_missing_table() {
    let app = spawn_app().await;
    let db = app.dir.path().join("cms-made.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE cms_asset_references (asset_id TEXT, uri TEXT, additional TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let out = app
        .run_env(
            &["status"],
            &[("BYNDER_USAGE_SYNC_DATABASE__PATH", db.to_str().unwrap())],
        )
        .await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("`migrate` was never run"), "{err}");
    assert!(!err.contains("has no table"), "{err}");
}

/// REGRESSION: one dead letter made every later `resync` exit 3 even when it had nothing to do;
/// and `queue retry` of ids that do not exist said nothing useful.
#[tokio::test]
async fn dead_letters_from_earlier_runs_warn_but_do_not_fail_later_runs() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            missing_assets: std::collections::HashSet::from([asset(2)]),
            ..Options::default()
        },
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), None).await;
    app.insert(&asset(2), &page(2), None).await;
    let out = app.resync_expecting(3).await;
    assert!(
        stdout(&out).contains("Dead letters: 1 new in this run"),
        "{}",
        stdout(&out)
    );

    // Nothing to do now: exit 0, with the old dead letter named once.
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(text.contains("Result: nothing to do"), "{text}");
    assert_eq!(
        text.matches("Warning: 1 dead letter(s) from earlier runs")
            .count(),
        1,
        "{text}"
    );
    // A new row goes through while the dead letter waits: still a success.
    app.insert(&asset(3), &page(3), None).await;
    let out = app.resync_expecting(0).await;
    assert!(
        stdout(&out).contains("Result: converged"),
        "{}",
        stdout(&out)
    );

    // A retry naming ids that are not dead letters re-queues nothing and names them.
    let out = app.run(&["queue", "list", "--dead", "--json"]).await;
    let dead: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = dead[0]["id"].as_i64().unwrap();
    let out = app
        .run(&["queue", "retry", &id.to_string(), "987654"])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("987654 (no such operation)"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("nothing was re-queued"),
        "{}",
        stderr(&out)
    );
    let out = app.run(&["queue", "list", "--dead", "--json"]).await;
    let still: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        still.as_array().unwrap().len(),
        1,
        "the real id stays a dead letter"
    );

    // The retried letter fails again: a new dead letter of this run, so exit 3.
    let out = app.run(&["queue", "retry", &id.to_string()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.resync_expecting(3).await;
}

/// REGRESSION: `javascript:` uris were sent to Bynder verbatim. With `sync.uri_schemes` such
/// rows are skipped with the reason, and a usage sent before the list existed is removed.
#[tokio::test]
async fn uri_schemes_keep_other_schemes_out_of_bynder() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    app.insert(&asset(2), "javascript:alert(document.cookie)", None)
        .await;
    app.resync_expecting(0).await;
    assert_eq!(app.ours().len(), 2, "sent verbatim without the allow-list");

    let config = std::fs::read_to_string(&app.config_path)
        .unwrap()
        .replace("[sync]\n", "[sync]\nuri_schemes = [\"https\"]\n");
    std::fs::write(&app.config_path, config).unwrap();
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(
        text.contains("uri scheme `javascript:` is not in sync.uri_schemes"),
        "{text}"
    );
    assert_eq!(app.ours(), vec![(asset(1), page(1), String::new())]);
}

/// REGRESSION: terminal escape sequences from portal error bodies reached `status`, `queue list`
/// and the resync output verbatim (clearing the screen, retitling the terminal).
#[tokio::test]
async fn escape_sequences_from_the_portal_never_reach_the_terminal() {
    use wiremock::{matchers::any, Mock, MockServer, ResponseTemplate};
    let hostile = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_string("\u{1b}[2J\u{1b}]0;pwned\u{7}asset refused\u{202e}txt.exe"),
        )
        .mount(&hostile)
        .await;
    let app = spawn_app_with(Setup {
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    let config = std::fs::read_to_string(&app.config_path)
        .unwrap()
        .replace(&app.portal.base_url(), &hostile.uri());
    std::fs::write(&app.config_path, config).unwrap();
    app.insert(&asset(1), &page(1), None).await;

    let resync = app.resync_expecting(3).await;
    let list = app.run(&["queue", "list", "--dead"]).await;
    let status = app.run(&["status"]).await;
    for out in [&resync, &list, &status] {
        let shown = format!("{}{}", stdout(out), stderr(out));
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{shown:?}"
        );
        assert!(!shown.contains('\u{202e}'), "{shown:?}");
    }
    let shown = stdout(&list);
    assert!(
        shown.contains("\\u{1b}[2J") && shown.contains("asset refused"),
        "{shown}"
    );
}

/// REGRESSION: `resync --verify --dry-run` reported drift that the plan beside it did not show:
/// the plan came from the records the drift check had just found wrong.
#[tokio::test]
async fn a_verify_dry_run_plans_the_repairs_it_reports_and_changes_nothing() {
    let app = spawn_app().await;
    for n in 1..=3 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.resync_expecting(0).await;
    let ours = app.portal.usages_for(INTEGRATION);
    let lost = ours.iter().find(|u| u.asset_id == asset(1)).unwrap();
    app.portal.remove_usage(&lost.id);
    app.portal.seed_usage(
        INTEGRATION,
        &asset(2),
        "https://cms.example/extra",
        "by hand",
    );
    let before = app.portal.usages();
    let recorded = |pool: &sqlx::SqlitePool| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, String)>(
                "SELECT asset_id, uri, additional FROM recorded_usages ORDER BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let recorded_before = recorded(&app.pool).await;

    let out = app
        .run(&["resync", "--verify", "--dry-run", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify"]["missing"], 1, "{report}");
    assert_eq!(report["verify"]["extra"], 1, "{report}");
    assert_eq!(report["plan"]["creates"], 1, "{report}");
    assert_eq!(report["plan"]["deletes"], 1, "{report}");
    let items = report["plan"]["items"].as_array().unwrap();
    assert!(items
        .iter()
        .any(|i| i["change"] == "create" && i["asset_id"] == asset(1)));
    assert!(items
        .iter()
        .any(|i| i["change"] == "delete" && i["uri"] == "https://cms.example/extra"));
    // Nothing real changed: not Bynder, not the records.
    assert_eq!(app.portal.usages(), before);
    assert_eq!(recorded(&app.pool).await, recorded_before);

    let out = app.run(&["resync", "--verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
}

/// REGRESSION: "N attempt(s) retried" counted attempts that were never retried (the last one
/// before an operation was left queued for the next run). The report counts failed attempts.
#[tokio::test]
async fn the_report_counts_failed_attempts_not_retries_that_never_happened() {
    let app = spawn_app_with(Setup {
        sync: "strategy = \"per_usage\"".to_owned(),
        retry: "initial_backoff = \"10ms\"\nmax_backoff = \"20ms\"\nmax_attempts = 2".to_owned(),
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), None).await;
    app.portal.set_faults(bynder_usage_sync::simulator::Faults {
        server_error_rate: 1.0,
        ..Default::default()
    });
    let out = app.run(&["resync", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sent"]["failed_attempts"], 2, "{report}");
    assert_eq!(report["sent"]["left_pending"], 1, "{report}");
    assert!(report["sent"].get("retried").is_none(), "{report}");
    let out = app.run(&["resync"]).await;
    assert!(
        stdout(&out).contains("2 failed attempt(s)"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("retried"), "{}", stdout(&out));

    app.portal.set_faults(Default::default());
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

/// The run history no longer grows forever: runs older than `runs.keep` go, except the last
/// successful reconcile.
#[tokio::test]
async fn old_runs_are_pruned_but_the_last_success_stays() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    app.resync_expecting(0).await;
    app.exec("UPDATE runs SET started_at = '2020-01-01T00:00:00.000Z', finished_at = '2020-01-01T00:00:01.000Z'")
        .await;
    for n in 0..3 {
        app.exec(&format!(
            "INSERT INTO runs (command, started_at, finished_at, outcome) \
             VALUES ('resync', '2020-01-0{}T00:00:00.000Z', '2020-01-0{}T00:00:01.000Z', 'partial')",
            n + 2,
            n + 2
        ))
        .await;
    }
    // A partial run now: the old success is still the last one, so it is kept.
    app.portal.set_faults(bynder_usage_sync::simulator::Faults {
        server_error_rate: 1.0,
        ..Default::default()
    });
    app.insert(&asset(2), &page(2), None).await;
    app.run(&["resync"]).await;
    let runs: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT started_at, outcome FROM runs ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].0, "2020-01-01T00:00:00.000Z", "{runs:?}");
    assert_eq!(runs[0].1.as_deref(), Some("converged"), "{runs:?}");
}

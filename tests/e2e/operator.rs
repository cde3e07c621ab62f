//! Operators' comforts through the binary: `config show` and `config check`, completions, the
//! man page and the log-level flags.

use crate::common::*;

#[tokio::test]
async fn config_show_names_each_origin_and_never_a_secret() {
    let app = spawn_app().await;
    let out = app
        .run_env(
            &["config", "show"],
            &[("BYNDER_USAGE_SYNC_LIMITS__CONCURRENCY", "3")],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        !text.contains(TOKEN) && !stderr(&out).contains(TOKEN),
        "{text}"
    );
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
            .to_owned()
    };
    assert!(
        line("auth.permanent_token").contains("\"[redacted]\""),
        "{text}"
    );
    assert!(line("auth.permanent_token").ends_with("# file"), "{text}");
    assert!(
        line("limits.concurrency").contains("= 3") && line("limits.concurrency").ends_with("# env"),
        "{text}"
    );
    assert!(line("sync.max_deletes").ends_with("# default"), "{text}");

    let out = app.run(&["config", "show", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["key"] == "bynder.base_url" && e["origin"] == "file"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN));
}

#[tokio::test]
async fn config_check_is_offline_and_exits_78_naming_the_problem() {
    let app = spawn_app().await;
    // The portal is gone: `config check` does not need it.
    let out = app
        .run_env(
            &["config", "check"],
            &[("BYNDER_USAGE_SYNC_BYNDER__BASE_URL", "http://127.0.0.1:9")],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("configuration valid"),
        "{}",
        stdout(&out)
    );
    let out = app
        .run_env(
            &["config", "check"],
            &[("BYNDER_USAGE_SYNC_SYNC__BATCH_SIZE", "0")],
        )
        .await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("sync.batch_size"), "{}", stderr(&out));
}

#[tokio::test]
async fn completions_for_every_shell_and_a_man_page_with_every_subcommand() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = binary()
            .args(["completions", shell])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = stdout(&out);
        assert!(
            script.contains("resync") && script.contains("dry-run"),
            "{shell}"
        );
    }
    let out = binary().arg("man").output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let page = stdout(&out);
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
    for sub in [
        "MIGRATE",
        "RESYNC",
        "STATUS",
        "QUEUE LIST",
        "QUEUE RETRY",
        "QUEUE PURGE",
        "DEMO",
        "RUN",
        "HEALTHCHECK",
        "CHECK",
        "RAW",
        "PROBE",
        "AUTH LOGIN",
        "CONFIG SHOW",
        "CONFIG CHECK",
        "COMPLETIONS",
        "MAN",
    ] {
        assert!(
            page.contains(&format!(".SH \"BYNDER-USAGE-SYNC {sub}\"")),
            "{sub} missing"
        );
    }
    assert!(
        page.contains("allow\\-mass\\-delete"),
        "resync's options are in it"
    );
}

#[tokio::test]
async fn quiet_and_verbose_flags_win_over_log_level() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    let out = app.run(&["-q", "resync"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("INFO"), "{}", stderr(&out));
    let out = app.run(&["resync", "-v"]).await;
    assert!(stderr(&out).contains("DEBUG"), "{}", stderr(&out));
    let out = app.run(&["-v", "-q", "status"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "the flags contradict each other"
    );
}

#[tokio::test]
async fn backup_copies_the_live_database_privately_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app().await;
    for n in 1..=5 {
        app.insert(&asset(n), &page(n), Some("note")).await;
    }
    app.resync_expecting(0).await;
    // Written through the CMS's open connection: still in the WAL, not yet in state.db.
    app.insert(&asset(6), &page(6), None).await;
    let dest = app.dir.path().join("backup.db");
    let out = app.run(&["backup", dest.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("6 CMS row(s), integrity ok"),
        "{}",
        stdout(&out)
    );
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let copy = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", dest.display()))
        .await
        .unwrap();
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM recorded_usages")
        .fetch_one(&copy)
        .await
        .unwrap();
    assert_eq!(recorded, 5);
    copy.close().await;

    let out = app.run(&["backup", dest.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("never overwrites"),
        "{}",
        stderr(&out)
    );
}

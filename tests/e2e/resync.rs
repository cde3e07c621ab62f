//! Issue: one-off resync end to end, through the binary.

use crate::common::*;
use bynder_usage_sync::simulator::Options;

#[tokio::test]
async fn resync_converges_then_follows_adds_changes_and_deletes() {
    let app = spawn_app().await;
    for n in 0..6 {
        app.insert(&asset(n), &page(n % 3), Some(&format!("note {n}")))
            .await;
    }
    app.insert(&asset(9), &page(9), None).await;
    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(app.ours().len(), 7);

    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'changed' WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(2)
    ))
    .await;
    app.insert(&asset(7), &page(7), Some("added")).await;
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = NULL WHERE asset_id = '{}'",
        asset(3)
    ))
    .await;
    let out = app.resync_expecting(0).await;
    app.assert_converged().await;
    let text = stdout(&out);
    assert!(
        text.contains("1 create(s), 2 update(s), 1 delete(s)"),
        "{text}"
    );
}

#[tokio::test]
async fn resync_with_no_changes_makes_zero_requests() {
    let app = spawn_app().await;
    for n in 0..5 {
        app.insert(&asset(n), &page(n), Some("x")).await;
    }
    app.resync_expecting(0).await;
    app.portal.reset_counters();
    let out = app.resync_expecting(0).await;
    assert_eq!(
        app.portal.counters().total,
        0,
        "a resync with nothing changed sends nothing"
    );
    assert!(stdout(&out).contains("nothing to do"), "{}", stdout(&out));
}

#[tokio::test]
async fn another_integrations_usages_and_uris_outside_the_prefixes_survive_everything() {
    let app = spawn_app_with(Setup {
        sync: "uri_prefixes = [\"https://cms.example/\"]".to_owned(),
        ..Setup::default()
    })
    .await;
    // Same asset and same uri, but another integration: never ours.
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "wordpress");
    app.insert(&asset(1), &page(1), Some("ours")).await;
    app.insert(
        &asset(2),
        "https://blog.example/post/1",
        Some("not ours to manage"),
    )
    .await;
    app.insert(&asset(3), &page(3), None).await;
    app.resync_expecting(0).await;
    assert_eq!(
        app.ours(),
        vec![
            (asset(1), page(1), "ours".to_owned()),
            (asset(3), page(3), String::new())
        ],
        "rows outside uri_prefixes are skipped, never sent"
    );

    // Our usage on the same asset and uri goes; theirs stays.
    app.exec("DELETE FROM cms_asset_references").await;
    let out = app.run(&["resync", "--allow-mass-delete"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(app.ours().is_empty());
    let others = app.others();
    assert_eq!(others.len(), 1);
    assert_eq!(
        (others[0].asset_id.as_str(), others[0].uri.as_str()),
        (asset(1).as_str(), page(1).as_str())
    );
}

#[tokio::test]
async fn deletes_are_never_sent_without_a_uri() {
    let app = spawn_app().await;
    app.portal.seed_usage(
        INTEGRATION,
        &asset(1),
        "https://other-install.example/page",
        "same integration, other site",
    );
    app.insert(&asset(1), &page(1), None).await;
    app.insert(&asset(2), &page(2), None).await;
    app.resync_expecting(0).await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    app.resync_expecting(0).await;
    // The other installation's usage of the same asset under the same integration id survives.
    let ours = app.ours();
    assert!(
        ours.iter()
            .any(|(_, uri, _)| uri == "https://other-install.example/page"),
        "{ours:?}"
    );
    assert!(!ours
        .iter()
        .any(|(a, uri, _)| *a == asset(1) && *uri == page(1)));
}

#[tokio::test]
async fn invalid_rows_are_reported_and_never_sent() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    app.insert("", &page(2), None).await;
    app.insert("NOT-A-BYNDER-ID!", &page(3), None).await;
    app.insert(&asset(4), "", None).await;
    app.insert(&asset(5), "https://cms.example/a\u{7}b", None)
        .await;
    app.insert(&asset(6), &"x".repeat(5000), None).await;
    app.exec(&format!(
        "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('{}', CAST(X'FF41' AS TEXT))",
        asset(7)
    ))
    .await;
    let out = app.resync_expecting(0).await;
    assert_eq!(app.ours(), vec![(asset(1), page(1), String::new())]);
    let text = stdout(&out);
    assert!(text.contains("6 skipped"), "{text}");
    for reason in [
        "asset_id is empty",
        "characters no Bynder id has",
        "uri is empty",
        "control character",
        "longer than",
        "UTF-8",
    ] {
        assert!(text.contains(reason), "missing {reason:?} in\n{text}");
    }
}

#[tokio::test]
async fn an_invalid_note_keeps_the_existing_usage_instead_of_deleting_it() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), Some("fine")).await;
    app.resync_expecting(0).await;
    app.exec("UPDATE cms_asset_references SET additional = 'bad' || char(0) || 'note'")
        .await;
    app.resync_expecting(0).await;
    assert_eq!(app.ours(), vec![(asset(1), page(1), "fine".to_owned())]);
}

#[tokio::test]
async fn dry_run_shows_the_plan_and_changes_nothing() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), Some("a")).await;
    app.insert(&asset(2), &page(2), None).await;
    let out = app.run(&["resync", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("2 create(s)"), "{}", stdout(&out));
    assert_eq!(app.portal.counters().total, 0);

    let out = app.run(&["resync", "--dry-run", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["plan"]["creates"], 2);
    assert_eq!(report["plan"]["items"].as_array().unwrap().len(), 2);
    assert_eq!(report["outcome"], "dry_run");
    assert!(app.ours().is_empty());
    // Nothing was queued either: a real run afterwards still creates both.
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

#[tokio::test]
async fn status_shows_runs_and_queue() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    app.resync_expecting(0).await;
    let out = app.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Recorded:     1 usage"), "{text}");
    assert!(text.contains("converged"), "{text}");
    let out = app.run(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["recorded_usages"], 1);
    assert_eq!(v["queue"]["pending"], 0);
}

// ---- documented failures ---------------------------------------------------------------------

#[tokio::test]
async fn a_bad_config_exits_78_naming_the_key_and_its_env_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[bynder]\nbase_url = \"https://acme.bynder.com\"\n").unwrap();
    let out = binary()
        .arg("--config")
        .arg(&path)
        .arg("resync")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("bynder.integration_id")
            && err.contains("BYNDER_USAGE_SYNC_BYNDER__INTEGRATION_ID"),
        "{err}"
    );

    std::fs::write(&path, "[bynder\nbase_url = ").unwrap();
    let out = binary()
        .arg("--config")
        .arg(&path)
        .arg("resync")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));

    let out = binary()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("status")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    let out = binary()
        .arg("resync")
        .arg("--no-such-flag")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "command-line errors exit 2");
}

#[tokio::test]
async fn config_comes_from_the_environment_alone_when_no_file_exists() {
    let portal = bynder_usage_sync::simulator::Simulator::start(Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..Options::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("env.db");
    let envs = [
        (
            "BYNDER_USAGE_SYNC_CONFIG",
            dir.path().join("none.toml").display().to_string(),
        ),
        ("BYNDER_USAGE_SYNC_BYNDER__BASE_URL", portal.base_url()),
        (
            "BYNDER_USAGE_SYNC_BYNDER__INTEGRATION_ID",
            INTEGRATION.to_owned(),
        ),
        (
            "BYNDER_USAGE_SYNC_BYNDER__ALLOW_INSECURE_HTTP",
            "true".to_owned(),
        ),
        ("BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN", TOKEN.to_owned()),
        ("BYNDER_USAGE_SYNC_DATABASE__PATH", db.display().to_string()),
    ];
    // An explicit config path that does not exist is an error, even with env…
    let out = binary()
        .envs(envs.iter().cloned())
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // …but with the default path absent, the environment alone is enough.
    let out = binary()
        .envs(envs[1..].iter().cloned())
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(db.exists());
}

#[tokio::test]
async fn a_missing_table_exits_78_and_says_to_run_migrate() {
    let app = spawn_app().await;
    app.exec("DROP TABLE cms_asset_references").await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("migrate"), "{}", stderr(&out));
    assert_eq!(
        app.portal.counters().total,
        0,
        "nothing may be sent, let alone deletes"
    );

    std::fs::remove_file(&app.db_path).unwrap();
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[tokio::test]
async fn an_unreachable_portal_exits_1_and_keeps_the_changes_queued() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = app
        .run_env(
            &["resync"],
            &[(
                "BYNDER_USAGE_SYNC_BYNDER__BASE_URL",
                &format!("http://127.0.0.1:{port}"),
            )],
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot connect to the portal")
            && stderr(&out).contains("stay queued"),
        "{}",
        stderr(&out)
    );
    // The change was kept and goes out once the portal is back.
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

#[tokio::test]
async fn a_wrong_token_exits_4_with_a_clear_message_and_no_request_storm() {
    let app = spawn_app().await;
    for n in 0..20 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let out = app
        .run_env(
            &["resync"],
            &[("BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN", "wrong-token")],
        )
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("auth.permanent_token"), "{err}");
    assert!(
        !err.contains("wrong-token"),
        "the secret never appears in messages"
    );
    assert!(
        app.portal.counters().total <= 8,
        "stops sending after the first rejections"
    );
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

#[tokio::test]
async fn secrets_never_appear_in_output_or_logs() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    let out = app.run_env(&["resync"], &[("RUST_LOG", "trace")]).await;
    assert_eq!(out.status.code(), Some(0));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains(TOKEN), "token leaked into output");
    let out = app.run(&["status", "--json"]).await;
    assert!(!stdout(&out).contains(TOKEN));
}

/// Runs an `openssl` command, failing the test with install instructions if it is missing.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("this test needs the openssl command: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_certificate_errors_are_fatal_unless_the_ca_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A private CA and a server certificate for 127.0.0.1 signed by it.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A TLS server answering every GET with 200 and a page (enough to show the handshake passed).
    let _server = tokio::process::Command::new("openssl")
        .current_dir(d)
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            "leaf.pem",
            "-key",
            "leaf.key",
            "-www",
            "-quiet",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start openssl s_server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "openssl s_server did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[bynder]\nbase_url = \"https://127.0.0.1:{port}\"\nintegration_id = \"{INTEGRATION}\"\n\
             [auth]\npermanent_token = \"{TOKEN}\"\n[database]\npath = \"state.db\"\n\
             [retry]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\nmax_attempts = 3\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, String)]| {
        let mut cmd = binary();
        cmd.arg("--config").arg(&config).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output()
    };
    assert_eq!(run(&["migrate"], &[]).await.unwrap().status.code(), Some(0));
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", d.join("state.db").display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO cms_asset_references (asset_id, uri) VALUES (?, ?)")
        .bind(asset(1))
        .bind(page(1))
        .execute(&pool)
        .await
        .unwrap();

    // Without the CA: the run stops at once, says which key fixes it, and loses nothing.
    let out = run(&["resync"], &[]).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("certificate") && err.contains("bynder.ca_file"),
        "{err}"
    );
    let queued = run(&["queue", "list"], &[]).await.unwrap();
    assert!(
        stdout(&queued).contains(&asset(1)),
        "the change stays queued: {}",
        stdout(&queued)
    );
    let out = run(&["raw", "GET", "/api/v4/currentUser/"], &[])
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0));

    // With the CA configured the same server is trusted.
    let ca = [(
        "BYNDER_USAGE_SYNC_BYNDER__CA_FILE",
        d.join("ca.pem").display().to_string(),
    )];
    let out = run(&["raw", "GET", "/api/v4/currentUser/"], &ca)
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("200"), "{}", stdout(&out));
}

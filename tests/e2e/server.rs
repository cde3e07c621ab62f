//! Issue: hardening of the daemon's HTTP endpoints. A flood of idle or half-sent connections,
//! hosts that are not ours, the optional bearer token and many searches at once. The daemon runs
//! in process ([`crate::in_process`]) except where the test needs its process: the descriptor
//! limit is set on its pid, and the token test reads its log.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;
use crate::daemon::{daemon_sections, Daemon};
use crate::in_process::{spawn_daemon, SpawnedDaemon};

/// An app whose daemon has the given extra `[server]` keys (after `listen`).
async fn app_with(server: &str, sync: &str) -> App {
    let sections = daemon_sections("5s").replacen("[daemon]", &format!("{server}\n[daemon]"), 1);
    spawn_app_with(Setup {
        sync: sync.to_owned(),
        extra: sections,
        ..Setup::default()
    })
    .await
}

/// [`app_with`], its daemon started in process.
async fn spawned_with(server: &str, sync: &str) -> (App, SpawnedDaemon) {
    let app = app_with(server, sync).await;
    let daemon = spawn_daemon(&app).await;
    (app, daemon)
}

/// [`app_with`], its daemon started as the real binary.
async fn daemon_with(server: &str, sync: &str) -> (App, Daemon) {
    let app = app_with(server, sync).await;
    let daemon = Daemon::start(&app).await;
    (app, daemon)
}

/// Reads until the server closes the connection; the bytes it sent before.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut received))
        .await
        .ok()
        .map(|_| received)
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// REGRESSION: idle connections were never closed; about a thousand of them exhausted the
/// descriptors and `/healthz` stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_a_fresh_client_while_1500_idle_connections_are_open_at_a_1024_descriptor_limit(
) {
    let (_app, daemon) = daemon_with("", "").await;
    let pid = daemon.child.id().expect("running");
    let limited = tokio::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:1024"])
        .status()
        .await
        .expect("run prlimit");
    assert!(limited.success(), "prlimit failed");

    let mut idle = Vec::new();
    for _ in 0..1500 {
        // A connect may be refused or reset once the server sheds the oldest: that is the point.
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(daemon.address)).await
        {
            idle.push(stream);
        }
    }
    assert!(idle.len() >= 1000, "only {} connections opened", idle.len());

    for _ in 0..3 {
        let (status, body) = daemon.get("/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
    }
    let open = open_descriptors(pid);
    assert!(
        open < 1024 - 200,
        "the daemon holds {open} descriptors with 1500 idle clients"
    );
    drop(idle);
    let log = daemon.log();
    assert!(!log.contains("Too many open files"), "{log}");
    let (status, _, log) = daemon.terminate(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// REGRESSION: a client that sent half a request head, or went quiet on a keep-alive
/// connection, kept its connection (and a descriptor) forever.
#[tokio::test]
async fn half_sent_and_idle_connections_are_closed_after_their_timeouts() {
    let (_app, daemon) = spawned_with("header_timeout = \"1s\"\nidle_timeout = \"1s\"", "").await;

    let mut half = TcpStream::connect(daemon.address).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let sent = read_to_close(&mut half, Duration::from_secs(15)).await;
    assert!(
        sent.is_some(),
        "a half-sent request head kept its connection"
    );

    let mut silent = TcpStream::connect(daemon.address).await.unwrap();
    assert!(
        read_to_close(&mut silent, Duration::from_secs(15))
            .await
            .is_some(),
        "a connection that never sent anything stayed open"
    );

    let mut keep_alive = TcpStream::connect(daemon.address).await.unwrap();
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answered = read_to_close(&mut keep_alive, Duration::from_secs(15))
        .await
        .expect("an idle keep-alive connection stayed open");
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.ends_with("ok\n"), "{answered}");
    daemon.stop().await.expect("the daemon stops cleanly");
}

/// REGRESSION: the endpoints answered any Host header, so a page whose name was rebound to
/// loopback could read the status page from a browser.
#[tokio::test]
async fn a_host_name_that_is_not_ours_is_refused_and_allowed_ones_are_answered() {
    let (_app, daemon) = spawned_with("allowed_hosts = [\"sync.internal.example\"]", "").await;
    let ask = |host: &'static str| {
        let url = daemon.url("/");
        async move {
            reqwest::Client::new()
                .get(url)
                .header("Host", host)
                .send()
                .await
                .unwrap()
        }
    };
    let refused = ask("rebound.evil.example").await;
    assert_eq!(refused.status().as_u16(), 421);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("server.allowed_hosts"));
    for host in ["localhost:9464", "sync.internal.example", "127.0.0.1"] {
        let answered = ask(host).await;
        assert_eq!(answered.status().as_u16(), 200, "{host}");
    }
    daemon.stop().await.expect("the daemon stops cleanly");
}

#[tokio::test]
async fn with_a_token_file_only_health_probes_answer_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("server_token");
    std::fs::write(&token_file, "page-token-9f2c\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (_app, daemon) =
        daemon_with(&format!("token_file = \"{}\"", token_file.display()), "").await;
    let http = reqwest::Client::new();
    for path in ["/", "/metrics"] {
        let without = http.get(daemon.url(path)).send().await.unwrap();
        assert_eq!(without.status().as_u16(), 401, "{path}");
        let wrong = http
            .get(daemon.url(path))
            .bearer_auth("page-token-9f2")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path}");
        let with = http
            .get(daemon.url(path))
            .bearer_auth("page-token-9f2c")
            .send()
            .await
            .unwrap();
        assert_eq!(with.status().as_u16(), 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let status = http.get(daemon.url(path)).send().await.unwrap().status();
        assert_ne!(status.as_u16(), 401, "{path}");
    }
    let (_, _, log) = daemon.terminate(Duration::from_secs(20)).await;
    assert!(!log.contains("page-token-9f2c"), "{log}");
}

/// REGRESSION: every search was a full scan with no limit on how many ran at once: 64
/// concurrent searches made `/readyz` fail its database check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_searches_are_bounded_and_readiness_still_reads_the_database() {
    let (app, daemon) = spawned_with("", "uri_prefixes = [\"https://cms.example/\"]").await;
    // Rows outside the prefixes: never sent, but every search without a match reads them all.
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
         INSERT INTO cms_asset_references (asset_id, uri) \
         SELECT printf('C078E8EE-C13A-4DA5-86EC8D6F%08X', i), 'https://elsewhere.example/p/' || i FROM n",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let searches = (0..64).map(|i| {
        let url = daemon.url(&format!("/?q=no-such-page-{i}"));
        async move {
            let response = reqwest::get(url).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    let readiness = async {
        let (_, body) = daemon.get("/readyz").await;
        body
    };
    let (pages, readiness) = tokio::join!(futures::future::join_all(searches), readiness);

    let readiness: serde_json::Value = serde_json::from_str(&readiness).unwrap();
    let database = readiness["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "database")
        .cloned()
        .unwrap();
    assert_eq!(database["ok"], true, "{readiness}");
    assert!(pages.iter().all(|(status, _)| *status == 200));
    let refused = pages
        .iter()
        .filter(|(_, body)| body.contains("id=\"search-refused\""))
        .count();
    let answered = pages
        .iter()
        .filter(|(_, body)| body.contains("id=\"no-match\""))
        .count();
    assert!(refused > 0, "no search was refused among 64 at once");
    assert!(answered > 0, "no search was answered among 64 at once");
    assert!(refused + answered == 64);
    daemon.stop().await.expect("the daemon stops cleanly");
}

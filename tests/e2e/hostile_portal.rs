//! Issue 11: portals (or whatever sits in front of them) that misbehave on the wire: an answer
//! that never ends, a TLS certificate that is a CA. The binary must fail clearly, in bounded
//! time and memory, and say what to fix.

use std::path::PathBuf;
use std::process::Output;

use tokio::sync::mpsc;

use crate::common::*;

/// The simulator's endless-body server: `[[[[…`, the start of a JSON array that never closes.
async fn endless_server() -> (String, mpsc::UnboundedReceiver<u64>) {
    bynder_usage_sync::simulator::endless_body_server(b'[')
        .await
        .expect("start the endless server")
}

/// A temp folder with a config for `base_url` (plus `extra` lines in `[bynder]` and the given
/// `[auth]` body), a migrated state database and one CMS row.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Site {
    async fn new(base_url: &str, bynder_extra: &str, auth: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[bynder]\nbase_url = \"{base_url}\"\nintegration_id = \"{INTEGRATION}\"\n\
                 allow_insecure_http = true\ntimeout = \"60s\"\n{bynder_extra}\n\
                 [auth]\n{auth}\n[database]\npath = \"state.db\"\n\
                 [retry]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\nmax_attempts = 3\n"
            ),
        )
        .unwrap();
        let site = Site { dir, config };
        let out = site.run(&["migrate"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", site.db().display()))
            .await
            .unwrap();
        sqlx::query("INSERT INTO cms_asset_references (asset_id, uri) VALUES (?, ?)")
            .bind(asset(1))
            .bind(page(1))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        site
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    async fn run(&self, args: &[&str]) -> Output {
        binary()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .await
            .expect("run the binary")
    }
}

fn permanent_token() -> String {
    format!("method = \"permanent_token\"\npermanent_token = \"{TOKEN}\"")
}

/// How many body bytes the endless server wrote on the first connection before the client hung
/// up (it stops writing only then; a client that read on would keep this from resolving).
async fn first_hang_up(connections: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    connections
        .recv()
        .await
        .expect("the binary connected to the endless server")
}

/// REGRESSION: a portal address answering an endless 200 body was read whole by `resync`
/// (peak RSS 9.8 GB in a minute). The run stops reading at bynder.max_response_size, exits
/// with a clear message naming the cap and the key to raise, and keeps the change queued.
#[tokio::test]
async fn resync_against_an_endless_answer_fails_clearly_and_keeps_the_change_queued() {
    let (url, mut connections) = endless_server().await;
    let site = Site::new(&url, "max_response_size = \"1 MiB\"", &permanent_token()).await;
    let out = site.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(3), "partial: {}", stderr(&out));
    // The server wrote at most the cap plus what the socket buffers held before the client
    // stopped reading.
    let written = first_hang_up(&mut connections).await;
    assert!(
        written < 64 * 1024 * 1024,
        "the client read on past the cap: {written} bytes"
    );
    let queued = site.run(&["queue", "list"]).await;
    let text = stdout(&queued);
    assert!(text.contains(&asset(1)), "the change stays queued: {text}");
    assert!(
        text.contains("1.0 MiB") && text.contains("raise bynder.max_response_size"),
        "the queued operation says why: {text}"
    );
}

/// REGRESSION: the token endpoint's answer was read whole too (the OAuth 2 transport). `check`
/// with a token endpoint that never ends its answer says which cap stopped it and exits.
#[tokio::test]
async fn a_token_endpoint_with_an_endless_answer_fails_check_clearly() {
    let (url, mut connections) = endless_server().await;
    let auth = format!(
        "method = \"client_credentials\"\nclient_id = \"app\"\nclient_secret = \"s3cret\"\n\
         token_url = \"{url}/token\""
    );
    let site = Site::new(&url, "max_response_size = \"1 MiB\"", &auth).await;
    let out = site.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("token endpoint") && text.contains("raise bynder.max_response_size"),
        "{text}"
    );
    first_hang_up(&mut connections).await;
}

/// REGRESSION: a portal (or proxy) serving a self-signed CA certificate as its own certificate
/// failed with rustls' `CaUsedAsEndEntity`, and the message said "set bynder.ca_file" even
/// with that very certificate in bynder.ca_file. It now says what is wrong: a CA certificate
/// where a leaf belongs, and that the server must serve a leaf signed by that CA.
#[tokio::test]
async fn a_ca_certificate_served_as_the_portal_certificate_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `req -x509` makes a CA certificate (basicConstraints CA:TRUE), valid for 127.0.0.1.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
    );
    let (port, _server) = openssl_s_server(d, "ca.pem", "ca.key").await;
    let site = Site::new(
        &format!("https://127.0.0.1:{port}"),
        &format!("ca_file = \"{}\"", d.join("ca.pem").display()),
        &permanent_token(),
    )
    .await;
    for args in [&["resync"][..], &["raw", "GET", "/api/v4/currentUser/"]] {
        let out = site.run(args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("presents a CA certificate as its own server certificate")
                && err.contains("leaf")
                && err.contains("keep the CA's certificate in bynder.ca_file"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("set bynder.ca_file"),
            "bynder.ca_file is already set: {err}"
        );
    }
}

//! Proxies from the environment (docs/operations.md, "Proxies"): requests to the portal go through
//! the proxy that `HTTPS_PROXY` (`HTTP_PROXY` for an `http://` portal) names, and `NO_PROXY`
//! sends them direct. The proxy here is a tiny one in the test that reports every connection.

use std::path::Path;
use std::process::Output;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common::*;

/// Every variable through which the environment can name a proxy, in both spellings: each test
/// starts the binary without them and sets only its own.
const PROXY_VARIABLES: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

async fn run_with(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = binary();
    for key in PROXY_VARIABLES {
        cmd.env_remove(key);
    }
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run the binary")
}

/// A tiny HTTP proxy on a loopback port. `CONNECT host:port` (how a client reaches an `https://`
/// origin through a proxy) is answered 200 and tunnelled; any other request, which names its
/// origin in absolute form (`GET http://host:port/path`), is passed on to that origin as it came.
/// Reports the first request line of every connection; returns the proxy's URL.
async fn start_proxy() -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen, connections) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = relay(client, seen).await;
            });
        }
    });
    (url, connections)
}

async fn relay(mut client: TcpStream, seen: mpsc::UnboundedSender<String>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap()])
        .into_owned();
    let _ = seen.send(line.clone());
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let mut origin = if method == "CONNECT" {
        let mut origin = TcpStream::connect(target).await?;
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        origin.write_all(&head[end..]).await?;
        origin
    } else {
        let authority = target
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        let mut origin = TcpStream::connect(authority).await?;
        origin.write_all(&head).await?;
        origin
    };
    tokio::io::copy_bidirectional(&mut client, &mut origin).await?;
    Ok(())
}

/// The request lines the proxy has been sent so far.
fn drain(connections: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
    std::iter::from_fn(|| connections.try_recv().ok()).collect()
}

#[tokio::test]
async fn a_resync_goes_through_the_proxy_in_http_proxy_and_no_proxy_bypasses_it() {
    let app = spawn_app().await;
    let (proxy, mut connections) = start_proxy().await;
    let portal = app.portal.base_url().trim_end_matches('/').to_owned();

    app.insert(&asset(1), &page(1), None).await;
    let out = run_with(&app.config_path, &["resync"], &[("HTTP_PROXY", &proxy)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
    let seen = drain(&mut connections);
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l.contains(&format!(" {portal}/"))),
        "every request must reach the portal {portal} through the proxy; the proxy saw {seen:?}"
    );

    app.insert(&asset(2), &page(2), None).await;
    let out = run_with(
        &app.config_path,
        &["resync"],
        &[("HTTP_PROXY", &proxy), ("NO_PROXY", "127.0.0.1")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
    assert_eq!(
        drain(&mut connections),
        Vec::<String>::new(),
        "with NO_PROXY naming the portal's host the proxy must see nothing"
    );
}

/// A CA (ca.pem) and a leaf certificate for 127.0.0.1 signed by it (leaf.pem, leaf.key), made
/// with openssl in `dir`.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for command in [
        format!("req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=proxy-test-CA"),
        format!("req {key} -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1"),
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2 \
         -extfile leaf.ext -out leaf.pem"
            .to_owned(),
    ] {
        openssl(dir, &command.split_whitespace().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn https_requests_tunnel_through_the_proxy_in_https_proxy_and_no_proxy_bypasses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let (port, _server) = openssl_s_server(d, "leaf.pem", "leaf.key").await;
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[bynder]\nbase_url = \"https://127.0.0.1:{port}\"\nintegration_id = \"{INTEGRATION}\"\n\
             ca_file = \"ca.pem\"\ntimeout = \"20s\"\n\
             [auth]\nmethod = \"permanent_token\"\npermanent_token = \"{TOKEN}\"\n\
             [database]\npath = \"state.db\"\n"
        ),
    )
    .unwrap();
    let out = run_with(&config, &["migrate"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (proxy, mut connections) = start_proxy().await;
    let request = ["raw", "GET", "/api/v4/currentUser/"];

    let out = run_with(&config, &request, &[("HTTPS_PROXY", &proxy)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("\"status\": 200"),
        "the portal's answer must come back through the tunnel: {}",
        stdout(&out)
    );
    assert_eq!(
        drain(&mut connections),
        vec![format!("CONNECT 127.0.0.1:{port} HTTP/1.1")],
        "the request must go to the portal through a CONNECT tunnel of the proxy"
    );

    let out = run_with(
        &config,
        &request,
        &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "127.0.0.1")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        drain(&mut connections),
        Vec::<String>::new(),
        "with NO_PROXY naming the portal's host the proxy must see nothing"
    );
}

/// REGRESSION: `healthcheck` (the container's HEALTHCHECK) asked the daemon's own /healthz on
/// loopback through the proxy in HTTP_PROXY or ALL_PROXY, which cannot reach the container's
/// loopback: a container given a proxy turned unhealthy. The probe never uses a proxy now.
#[tokio::test]
async fn healthcheck_asks_the_daemon_directly_whatever_proxy_the_environment_names() {
    let app = spawn_app().await;
    // Stands in for the daemon's endpoint: answers every connection with 200.
    let daemon = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = daemon.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = daemon.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = conn.read(&mut request).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let (proxy, mut connections) = start_proxy().await;

    let out = run_with(
        &app.config_path,
        &["healthcheck"],
        &[
            ("BYNDER_USAGE_SYNC_SERVER__LISTEN", &listen),
            ("HTTP_PROXY", &proxy),
            ("HTTPS_PROXY", &proxy),
            ("ALL_PROXY", &proxy),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        drain(&mut connections),
        Vec::<String>::new(),
        "the health probe must not go through the proxy"
    );
}

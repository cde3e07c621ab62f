//! Issue: authentication. Each of the four methods end to end through the binary, the OAuth 2
//! token lifecycle (renewal ahead of expiry, revocation, wrong credentials, a token endpoint
//! that is down), the one-time logins, `check` and `raw`.

use std::process::Stdio;
use std::time::Duration;

use bynder_usage_sync::simulator::{Client, Faults, OAuth1Credentials, Options, ScopePolicy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::common::*;

const CLIENT_ID: &str = "0b1c2d3e-e2e-app";
const CLIENT_SECRET: &str = "e2e-client-5ecr3t";
const CONSUMER_KEY: &str = "e2e-consumer";
const CONSUMER_SECRET: &str = "e2e-consumer-5ecr3t";
const OAUTH1_TOKEN: &str = "e2e-oauth1-token";
const OAUTH1_TOKEN_SECRET: &str = "e2e-oauth1-token-5ecr3t";
const TOKEN_ROUTE: &str = "POST /v6/authentication/oauth2/token";
const CREATE_ROUTE: &str = "POST /api/media/usage/";
const ALL_SCOPES: [&str; 4] = [
    "asset.usage:read",
    "asset.usage:write",
    "current.user:read",
    "offline",
];

fn app_client(scopes: &[&str], redirect_uris: Vec<String>) -> Client {
    Client {
        client_id: CLIENT_ID.to_owned(),
        client_secret: CLIENT_SECRET.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        redirect_uris,
    }
}

fn client_credentials(secret: &str) -> String {
    format!(
        "method = \"client_credentials\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{secret}\""
    )
}

fn refresh_token_auth(port: u16) -> String {
    format!(
        "method = \"refresh_token\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n\
         redirect_uri = \"http://127.0.0.1:{port}/callback\""
    )
}

fn oauth1_options() -> Vec<OAuth1Credentials> {
    vec![OAuth1Credentials {
        consumer_key: CONSUMER_KEY.to_owned(),
        consumer_secret: CONSUMER_SECRET.to_owned(),
        token: OAUTH1_TOKEN.to_owned(),
        token_secret: OAUTH1_TOKEN_SECRET.to_owned(),
    }]
}

/// A portal that knows the OAuth 2 app (all scopes) and the OAuth 1 consumer.
fn portal(redirect_uris: Vec<String>) -> Options {
    Options {
        clients: vec![app_client(&ALL_SCOPES, redirect_uris)],
        oauth1: oauth1_options(),
        ..Options::default()
    }
}

async fn fill(app: &App, rows: u32) {
    for n in 0..rows {
        app.insert(&asset(n), &page(n % 7), Some(&format!("note {n}")))
            .await;
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn all_output(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

fn count(app: &App, route: &str) -> u64 {
    app.portal
        .counters()
        .by_route
        .get(route)
        .copied()
        .unwrap_or(0)
}

/// A login running in the background.
struct Running {
    child: tokio::process::Child,
    /// The authorization URL it printed.
    url: String,
    /// The rest of its stdout, read as it comes so the child never blocks on a full pipe.
    rest: tokio::task::JoinHandle<String>,
}

/// Starts the binary with piped stdio for a login, and reads the URL it prints on stdout.
async fn start_login(app: &App, args: &[&str]) -> Running {
    let mut child = binary()
        .arg("--config")
        .arg(&app.config_path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("http") {
                return line;
            }
        }
        panic!("the login printed no URL")
    })
    .await
    .expect("the login prints its URL");
    let rest = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    Running { child, url, rest }
}

impl Running {
    /// Waits for the login to end; its output's stdout is what came after the URL.
    async fn finish(self) -> std::process::Output {
        let mut out = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output())
            .await
            .expect("the login finishes")
            .unwrap();
        out.stdout = self.rest.await.unwrap().into_bytes();
        out
    }
}

async fn finish(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the command finishes")
        .unwrap()
}

/// A browser: follows redirects (to the simulated portal, then to the login's loopback).
fn browser() -> reqwest::Client {
    reqwest::Client::new()
}

// ---- each method: a resync converges -------------------------------------------------------------

#[tokio::test]
async fn client_credentials_resync_converges_with_one_token_and_no_secret_in_the_output() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    fill(&app, 12).await;
    let out = app.run_env(&["resync"], &[("RUST_LOG", "trace")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;
    let counters = app.portal.counters();
    assert_eq!(counters.tokens_issued, 1, "one token serves the whole run");
    assert_eq!(counters.unauthorized, 0);
    assert!(
        !all_output(&out).contains(CLIENT_SECRET),
        "the client secret leaked"
    );
}

#[tokio::test]
async fn client_credentials_with_http_basic_client_auth_converge() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: format!(
            "{}\nclient_auth = \"basic\"",
            client_credentials(CLIENT_SECRET)
        ),
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    fill(&app, 5).await;
    let out = app.run_env(&["resync"], &[("RUST_LOG", "trace")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let all = all_output(&out);
    assert!(
        !all.contains(CLIENT_SECRET) && !all.contains(&basic),
        "the client secret leaked"
    );
}

#[tokio::test]
async fn oauth1_signed_requests_converge_with_form_bodies_and_json_bodies() {
    for strategy in ["per_usage", "sync_endpoint"] {
        let app = spawn_app_with(Setup {
            portal: Options {
                oauth1: oauth1_options(),
                ..Options::default()
            },
            auth: format!(
                "method = \"oauth1\"\nconsumer_key = \"{CONSUMER_KEY}\"\nconsumer_secret = \"{CONSUMER_SECRET}\"\n\
                 token = \"{OAUTH1_TOKEN}\"\ntoken_secret = \"{OAUTH1_TOKEN_SECRET}\""
            ),
            sync: format!("strategy = \"{strategy}\""),
            ..Setup::default()
        })
        .await;
        fill(&app, 6).await;
        let out = app.resync_expecting(0).await;
        app.assert_converged().await;
        assert_eq!(
            app.portal.counters().unauthorized,
            0,
            "the portal verified every signature ({strategy})"
        );
        // Deletes carry their parameters in the query string, which the signature covers.
        app.exec(&format!(
            "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
            asset(0)
        ))
        .await;
        app.resync_expecting(0).await;
        app.assert_converged().await;
        let all = all_output(&out);
        assert!(!all.contains(CONSUMER_SECRET) && !all.contains(OAUTH1_TOKEN_SECRET));
    }
}

#[tokio::test]
async fn refresh_token_login_through_the_browser_then_resyncs_converge() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let app = spawn_app_with(Setup {
        portal: portal(vec![redirect.clone()]),
        auth: refresh_token_auth(port),
        ..Setup::default()
    })
    .await;
    fill(&app, 8).await;

    // Before the login: the daemon says what to run.
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", all_output(&out));
    assert!(stderr(&out).contains("auth login"), "{}", stderr(&out));
    let out = app.run(&["status"]).await;
    assert!(
        stdout(&out).contains("Auth:         WARNING") && stdout(&out).contains("auth login"),
        "{}",
        stdout(&out)
    );

    let login = start_login(&app, &["auth", "login"]).await;
    let url = login.url.clone();
    assert!(url.contains("code_challenge="), "PKCE: {url}");
    assert!(url.contains("state="), "{url}");
    assert!(
        url.contains("offline"),
        "the refresh token needs offline: {url}"
    );
    let landing = browser().get(&url).send().await.unwrap();
    assert_eq!(
        landing.status(),
        200,
        "the loopback page answers the browser"
    );
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));

    let stored: String =
        sqlx::query_scalar("SELECT value FROM settings WHERE key = 'auth.oauth2.refresh_token'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let refresh_token = serde_json::from_str::<serde_json::Value>(&stored).unwrap()
        ["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!all_output(&out).contains(&refresh_token));

    let out = app.run_env(&["resync"], &[("RUST_LOG", "trace")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;
    assert!(!all_output(&out).contains(&refresh_token));
    // Bynder's refresh answer has no refresh_token: the stored one keeps working.
    app.insert(&asset(50), &page(50), None).await;
    app.resync_expecting(0).await;
    app.assert_converged().await;
    let out = app.run(&["status"]).await;
    assert!(!stdout(&out).contains("Auth:"), "{}", stdout(&out));
}

#[tokio::test]
async fn refresh_token_login_takes_a_pasted_address_and_rotated_tokens_are_stored() {
    let port = free_port();
    let app = spawn_app_with(Setup {
        portal: Options {
            rotate_refresh_tokens: true,
            ..portal(vec![format!("http://127.0.0.1:{port}/callback")])
        },
        auth: refresh_token_auth(port),
        ..Setup::default()
    })
    .await;
    fill(&app, 3).await;
    let mut login = start_login(&app, &["auth", "login", "--paste"]).await;
    let url = login.url.clone();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = no_redirects.get(&url).send().await.unwrap();
    assert_eq!(answer.status(), 302);
    let back = answer.headers()["location"].to_str().unwrap().to_owned();
    let mut stdin = login.child.stdin.take().unwrap();
    // An answer to another login attempt (wrong state) is ignored.
    stdin
        .write_all(
            format!("http://127.0.0.1:{port}/callback?code=forged&state=forged\n").as_bytes(),
        )
        .await
        .unwrap();
    stdin
        .write_all(format!("{back}\n").as_bytes())
        .await
        .unwrap();
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));

    let stored = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT value FROM settings WHERE key = 'auth.oauth2.refresh_token'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let first = stored().await;
    app.resync_expecting(0).await;
    let second = stored().await;
    assert_ne!(first, second, "the rotated refresh token was stored");
    // The old one is dead now: the next run only works with the stored new one.
    app.insert(&asset(40), &page(40), None).await;
    app.resync_expecting(0).await;
    app.assert_converged().await;
}

/// A refresh-token app with its redirect on a free loopback port; returns the app and the port.
async fn login_app() -> (App, u16) {
    let port = free_port();
    let app = spawn_app_with(Setup {
        portal: portal(vec![format!("http://127.0.0.1:{port}/callback")]),
        auth: refresh_token_auth(port),
        ..Setup::default()
    })
    .await;
    (app, port)
}

/// REGRESSION: the callback checked `error` before `state`, so anything able to reach the
/// loopback port (another local user, a page in the browser) could abort a login with a forged
/// `GET /callback?error=access_denied`. Without this login's state it is answered 400 and
/// ignored; the real redirect still completes the login.
#[tokio::test]
async fn a_forged_error_callback_without_state_does_not_abort_the_login() {
    let (app, port) = login_app().await;
    let login = start_login(&app, &["auth", "login"]).await;
    for forged in [
        "/callback?error=access_denied",
        "/callback?error=access_denied&state=forged",
    ] {
        let answer = browser()
            .get(format!("http://127.0.0.1:{port}{forged}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{forged}");
        assert!(answer.text().await.unwrap().contains("ignored"), "{forged}");
    }
    let landing = browser().get(&login.url).send().await.unwrap();
    assert_eq!(landing.status(), 200);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    assert!(
        stderr(&out).contains("the redirect carries no state; ignored"),
        "{}",
        stderr(&out)
    );
}

/// REGRESSION: the hand-written callback listener served one connection at a time, each with
/// a 5 s read timeout, so connections that stay idle (or send half a request) held up the
/// browser's redirect by 5 s each. Served by axum, the redirect is answered while they stay
/// open. (With the old listener, these twenty would have held it up for 100 s, well past the
/// 30 s this file gives any login step.)
#[tokio::test]
async fn idle_connections_to_the_callback_do_not_hold_up_the_real_redirect() {
    let (app, port) = login_app().await;
    let login = start_login(&app, &["auth", "login"]).await;
    let mut idle = Vec::new();
    for n in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        if n % 2 == 0 {
            stream.write_all(b"GET /callback?sta").await.unwrap();
        }
        idle.push(stream);
    }
    let landing = tokio::time::timeout(Duration::from_secs(30), browser().get(&login.url).send())
        .await
        .expect("the redirect is answered while the idle connections stay open")
        .unwrap();
    assert_eq!(landing.status(), 200);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    drop(idle);
}

#[tokio::test]
async fn oauth1_login_runs_the_handshake_then_resyncs_converge_and_status_warns_before_expiry() {
    let app = spawn_app_with(Setup {
        portal: Options {
            oauth1: oauth1_options(),
            ..Options::default()
        },
        auth: format!(
            "method = \"oauth1\"\nconsumer_key = \"{CONSUMER_KEY}\"\nconsumer_secret = \"{CONSUMER_SECRET}\""
        ),
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    })
    .await;
    fill(&app, 4).await;
    let login = start_login(&app, &["auth", "oauth1-login"]).await;
    let url = login.url.clone();
    assert!(
        url.contains("/api/v4/oauth/authorise/?oauth_token=") && url.contains("callback="),
        "{url}"
    );
    let landing = browser().get(&url).send().await.unwrap();
    assert_eq!(landing.status(), 200);
    let out = login.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    assert!(stdout(&out).contains("expires on"), "{}", stdout(&out));

    app.resync_expecting(0).await;
    app.assert_converged().await;
    assert_eq!(app.portal.counters().unauthorized, 0);
    let out = app.run(&["status"]).await;
    assert!(!stdout(&out).contains("Auth:"), "{}", stdout(&out));

    let obtained = (chrono::Utc::now() - chrono::Duration::days(26)).to_rfc3339();
    app.exec(&format!(
        "UPDATE settings SET value = json_set(value, '$.obtained_at', '{obtained}') \
         WHERE key = 'auth.oauth1.token_pair'"
    ))
    .await;
    let out = app.run(&["status"]).await;
    let text = stdout(&out);
    assert!(
        text.contains("Auth:         WARNING") && text.contains("auth oauth1-login"),
        "{text}"
    );
    let out = app.run(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["auth_warning"].as_str().unwrap().contains("expires on"));
}

// ---- token lifecycle -----------------------------------------------------------------------------

#[tokio::test]
async fn a_short_lived_token_is_renewed_ahead_of_expiry_one_request_at_a_time() {
    let app = spawn_app_with(Setup {
        portal: Options {
            token_lifetime: Duration::from_secs(2),
            ..portal(vec![])
        },
        auth: client_credentials(CLIENT_SECRET),
        sync: "strategy = \"per_usage\"".to_owned(),
        // About five seconds of sending: many times the token's lifetime.
        limits: "requests_per_second = 8\nconcurrency = 4\nblock_pause = \"1s\"".to_owned(),
        ..Setup::default()
    })
    .await;
    fill(&app, 40).await;
    let started = std::time::Instant::now();
    app.resync_expecting(0).await;
    let took = started.elapsed();
    app.assert_converged().await;
    let counters = app.portal.counters();
    assert!(took > Duration::from_secs(4), "the run took {took:?}");
    assert!(
        counters.tokens_issued >= 3,
        "renewed during the run: {counters:?}"
    );
    assert!(
        counters.tokens_issued * 4 <= count(&app, CREATE_ROUTE),
        "not renewed per request: {counters:?}"
    );
    assert_eq!(
        counters.unauthorized, 0,
        "renewed ahead of expiry: no request ever carried an expired token"
    );
    assert_eq!(
        counters.max_concurrent_token_requests, 1,
        "one renewal at a time"
    );
}

#[tokio::test]
async fn revoking_the_token_mid_run_renews_it_once_and_the_run_converges() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials(CLIENT_SECRET),
        sync: "strategy = \"per_usage\"".to_owned(),
        limits: "requests_per_second = 40\nconcurrency = 4\nblock_pause = \"1s\"".to_owned(),
        ..Setup::default()
    })
    .await;
    fill(&app, 80).await;
    let mut child = binary()
        .arg("--config")
        .arg(&app.config_path)
        .arg("resync")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run is well under way (the portal's counters are the signal), then revoke.
    tokio::time::timeout(Duration::from_secs(20), async {
        while count(&app, CREATE_ROUTE) < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the run starts sending");
    app.portal.revoke_access_tokens();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run was still going when the token was revoked"
    );
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;
    let counters = app.portal.counters();
    assert_eq!(counters.tokens_issued, 2, "renewed once: {counters:?}");
    assert!(
        (1..=4).contains(&counters.unauthorized),
        "only the requests in flight were refused: {counters:?}"
    );
}

#[tokio::test]
async fn wrong_client_credentials_exit_4_naming_the_key_without_a_request_storm() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials("wrong-5ecr3t"),
        ..Setup::default()
    })
    .await;
    fill(&app, 20).await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    let err = stderr(&out);
    assert!(
        err.contains("auth.client_id") && err.contains("auth.client_secret"),
        "{err}"
    );
    assert!(err.contains("invalid_client"), "{err}");
    assert!(!all_output(&out).contains("wrong-5ecr3t"));
    let counters = app.portal.counters();
    assert_eq!(count(&app, TOKEN_ROUTE), 1, "{counters:?}");
    assert_eq!(counters.total, 1, "nothing else was sent: {counters:?}");
    // Fixed credentials: the queued changes go out.
    let out = app
        .run_env(
            &["resync"],
            &[("BYNDER_USAGE_SYNC_AUTH__CLIENT_SECRET", CLIENT_SECRET)],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;
}

#[tokio::test]
async fn a_revoked_refresh_token_exits_4_and_says_to_log_in_again() {
    let port = free_port();
    let app = spawn_app_with(Setup {
        portal: portal(vec![format!("http://127.0.0.1:{port}/callback")]),
        auth: refresh_token_auth(port),
        ..Setup::default()
    })
    .await;
    fill(&app, 2).await;
    let login = start_login(&app, &["auth", "login"]).await;
    browser().get(&login.url).send().await.unwrap();
    assert_eq!(login.finish().await.status.code(), Some(0));
    app.portal.revoke_refresh_tokens();
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    assert!(
        stderr(&out).contains("auth login") && stderr(&out).contains("invalid_grant"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_token_endpoint_that_is_down_is_a_transient_failure_and_the_next_run_converges() {
    for strategy in ["per_usage", "sync_endpoint"] {
        let app = spawn_app_with(Setup {
            portal: portal(vec![]),
            auth: client_credentials(CLIENT_SECRET),
            sync: format!("strategy = \"{strategy}\""),
            ..Setup::default()
        })
        .await;
        fill(&app, 10).await;
        app.portal.set_faults(Faults {
            token_endpoint_down: true,
            ..Faults::default()
        });
        let out = app.run(&["resync"]).await;
        assert_eq!(
            out.status.code(),
            Some(3),
            "{strategy}: a transient failure, the changes stay queued (partial); no crash, no \
             credentials error\n{}",
            all_output(&out)
        );
        assert!(
            count(&app, TOKEN_ROUTE) <= 3,
            "{strategy}: failures are remembered, not retried by every request: {:?}",
            app.portal.counters()
        );
        app.portal.set_faults(Faults::default());
        app.resync_expecting(0).await;
        app.assert_converged().await;
    }
}

// ---- check ---------------------------------------------------------------------------------------

/// An OAuth app registered the way Bynder's setup guide does it: the usage scopes only, on a
/// portal that refuses a token request asking for more (`invalid_scope`).
fn usage_scopes_only_portal() -> Options {
    Options {
        clients: vec![app_client(
            &["asset.usage:read", "asset.usage:write"],
            vec![],
        )],
        scope_policy: ScopePolicy::Refuse,
        ..Options::default()
    }
}

#[tokio::test]
async fn an_app_with_only_the_usage_scopes_syncs_and_checks_out_on_the_default_config() {
    let app = spawn_app_with(Setup {
        portal: usage_scopes_only_portal(),
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    fill(&app, 6).await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    app.assert_converged().await;

    let out = app.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let text = stdout(&out);
    for expected in [
        "does not allow the current.user:read scope",
        "Usage API:    readable",
        "Write access: granted",
        "Result:       ok",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
}

#[tokio::test]
async fn a_scope_the_app_lacks_is_named_with_the_fix() {
    let app = spawn_app_with(Setup {
        portal: usage_scopes_only_portal(),
        auth: format!(
            "{}\nscopes = \"asset.usage:read asset.usage:write current.user:read\"",
            client_credentials(CLIENT_SECRET)
        ),
        ..Setup::default()
    })
    .await;
    fill(&app, 2).await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    let text = all_output(&out);
    assert!(text.contains("invalid_scope"), "{text}");
    assert!(
        text.contains("Remove current.user:read from auth.scopes"),
        "the fix names the scope: {text}"
    );
}

#[tokio::test]
async fn check_shows_who_the_daemon_acts_as_and_its_scopes() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    let out = app.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let text = stdout(&out);
    for expected in [
        "auth.method = \"client_credentials\"",
        "scopes: asset.usage:read asset.usage:write\n",
        "Acting as:    Sync Robot <sync.robot@example.com>",
        "Usage API:    readable",
        "Write access: granted",
        "Result:       ok",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    // A check only reads.
    let counters = app.portal.counters();
    assert!(counters
        .by_route
        .keys()
        .all(|r| r.starts_with("GET ") || r == TOKEN_ROUTE));
}

#[tokio::test]
async fn check_names_the_credential_on_401_and_the_role_or_scope_on_403() {
    // A wrong permanent token: 401, named.
    let app = spawn_app().await;
    let out = app
        .run_env(
            &["check"],
            &[("BYNDER_USAGE_SYNC_AUTH__PERMANENT_TOKEN", "wrong-token")],
        )
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    assert!(
        stderr(&out).contains("auth.permanent_token"),
        "{}",
        stderr(&out)
    );

    // The user lacks the STATISTICS role: every usage endpoint answers 403.
    let app = spawn_app_with(Setup {
        portal: Options {
            statistics_role: false,
            ..portal(vec![])
        },
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    let out = app.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    assert!(stderr(&out).contains("STATISTICS"), "{}", stderr(&out));
    assert!(stdout(&out).contains("Acting as:    Sync Robot"));

    // The app may not have asset.usage:write.
    let app = spawn_app_with(Setup {
        portal: Options {
            clients: vec![app_client(
                &["asset.usage:read", "current.user:read"],
                vec![],
            )],
            ..Options::default()
        },
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    let out = app.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    assert!(
        stderr(&out).contains("asset.usage:write"),
        "{}",
        stderr(&out)
    );

    // A wrong client secret: the token endpoint refuses, and the keys to fix are named.
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials("wrong"),
        ..Setup::default()
    })
    .await;
    let out = app.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", all_output(&out));
    assert!(
        stderr(&out).contains("auth.client_secret"),
        "{}",
        stderr(&out)
    );
}

// ---- raw -----------------------------------------------------------------------------------------

#[tokio::test]
async fn raw_prints_status_headers_and_body_with_the_authorization_redacted() {
    let app = spawn_app().await;
    app.portal
        .seed_usage(INTEGRATION, &asset(1), &page(1), "seeded");
    let out = app
        .run(&[
            "raw",
            "GET",
            "/api/media/usage/",
            "--query",
            &format!("asset_id={}", asset(1)),
            "--query",
            &format!("integration_id={INTEGRATION}"),
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    assert!(!all_output(&out).contains(TOKEN), "the token leaked");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["request"]["headers"]["authorization"], "[redacted]");
    assert_eq!(v["headers"]["content-type"], "application/json");
    assert_eq!(v["body"][0]["asset_id"], asset(1));
    assert_eq!(v["body"][0]["additional"], "seeded");

    // A form POST creates a usage, as the integration platforms' "Make Raw Request" would.
    let out = app
        .run(&[
            "raw",
            "post",
            "/api/media/usage/",
            "--form",
            &format!("integration_id={INTEGRATION}"),
            "--form",
            &format!("asset_id={}", asset(2)),
            "--form",
            &format!("uri={}", page(2)),
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    assert!(app.ours().iter().any(|(a, _, _)| *a == asset(2)));
}

#[tokio::test]
async fn raw_fails_on_404_unless_allowed_and_never_leaves_the_portal() {
    let app = spawn_app().await;
    let out = app.run(&["raw", "GET", "/api/v4/nothing-here/"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    assert!(stderr(&out).contains("--allow-404"), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], 404, "the answer is printed all the same");

    let out = app
        .run(&["raw", "GET", "/api/v4/nothing-here/", "--allow-404"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));

    app.portal.reset_counters();
    let out = app
        .run(&["raw", "GET", "https://elsewhere.example/api/"])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", all_output(&out));
    let out = app
        .run(&["raw", "POST", "/x", "--form", "a=1", "--json", "{}"])
        .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "--form and --json exclude each other"
    );
    assert_eq!(app.portal.counters().total, 0);
}

#[tokio::test]
async fn raw_authenticates_with_an_oauth2_access_token() {
    let app = spawn_app_with(Setup {
        portal: portal(vec![]),
        auth: client_credentials(CLIENT_SECRET),
        ..Setup::default()
    })
    .await;
    let path = format!(
        "/api/media/usage/?asset_id={}&integration_id={INTEGRATION}",
        asset(1)
    );
    let out = app.run(&["raw", "GET", &path]).await;
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"], serde_json::json!([]));
    assert_eq!(v["request"]["headers"]["authorization"], "[redacted]");
    assert_eq!(app.portal.counters().tokens_issued, 1);
}

//! HTTP-level tests of the client against wiremock: the exact requests each endpoint sends, and
//! how each failure class comes back.

use std::sync::Arc;
use std::time::Duration;

use wiremock::matchers::{
    body_json, body_string_contains, header, method, path, query_param, query_param_is_missing,
};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;
use crate::auth::Credentials;
use crate::model::{AssetId, SyncUsage, UsageUri};

fn id(text: &str) -> AssetId {
    AssetId::parse(text).expect("a valid asset id")
}

fn uri(text: &str) -> UsageUri {
    UsageUri::parse(text).expect("a valid uri")
}

const INTEGRATION: &str = "0191a303-9d99-433e-ada4-d244f37e1d7d";
const ASSET: &str = "C078E8EE-C13A-4DA5-86EC8D6F335364EB";

async fn client(server: &MockServer) -> Client {
    client_at(&server.uri(), None).await
}

/// A client of the portal at `base_url`, with `bynder.max_response_size` set when given (and
/// then a timeout long enough that only the cap can stop a read).
async fn client_at(base_url: &str, max_response_bytes: Option<u64>) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        Config::for_portal(base_url, INTEGRATION, "t0ken", &dir.path().join("s.db")).unwrap();
    config.bynder.timeout = Duration::from_millis(300);
    if let Some(cap) = max_response_bytes {
        config.bynder.max_response_bytes = cap;
        config.bynder.timeout = Duration::from_secs(120);
    }
    let gate = Arc::new(Gate::new(1000, Duration::from_secs(60)));
    let credentials = Credentials::load(&config, None, gate.clone())
        .await
        .unwrap();
    Client::new(&config, credentials, gate).unwrap()
}

fn usage_json(uri: &str, integration: &str) -> serde_json::Value {
    serde_json::json!({"id": "u1", "asset_id": ASSET, "uri": uri, "additional": "a",
        "timestamp": "2024-05-01T12:00:00Z", "integration": {"id": integration, "description": "x"}})
}

#[tokio::test]
async fn create_sends_a_form_to_the_slashed_path_with_the_bearer_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/media/usage/"))
        .and(header("authorization", "Bearer t0ken"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains(format!(
            "integration_id={INTEGRATION}"
        )))
        .and(body_string_contains(
            "uri=https%3A%2F%2Fcms.example%2Fp%3Fa%3D1",
        ))
        .and(body_string_contains("additional=Hero+image"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(usage_json("https://cms.example/p?a=1", INTEGRATION)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let usage = client(&server)
        .await
        .create_usage(&id(ASSET), &uri("https://cms.example/p?a=1"), "Hero image")
        .await
        .unwrap();
    assert_eq!(usage.id, "u1");
}

#[tokio::test]
async fn delete_always_names_the_uri_and_treats_404_as_already_gone() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/media/usage/"))
        .and(query_param("integration_id", INTEGRATION))
        .and(query_param("asset_id", ASSET))
        .and(query_param("uri", "https://cms.example/p"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(query_param("uri", "https://cms.example/gone"))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(serde_json::json!({"message": "not found"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&server).await;
    c.delete_usage(&id(ASSET), &uri("https://cms.example/p"))
        .await
        .unwrap();
    c.delete_usage(&id(ASSET), &uri("https://cms.example/gone"))
        .await
        .unwrap();
}

#[tokio::test]
async fn list_asks_by_asset_and_integration_and_keeps_only_our_usages() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/media/usage/"))
        .and(query_param("asset_id", ASSET))
        .and(query_param("integration_id", INTEGRATION))
        .and(query_param_is_missing("uri"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([
            usage_json("/ours", INTEGRATION),
            usage_json("/theirs", "b242c16d-70f4-4101-8df5-87b35bbe56f0")
        ])))
        .expect(1)
        .mount(&server)
        .await;
    let usages = client(&server).await.list_usages(&id(ASSET)).await.unwrap();
    assert_eq!(usages.len(), 1);
    assert_eq!(usages[0].uri, "/ours");
}

#[tokio::test]
async fn sync_posts_json_without_a_trailing_slash() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/media/usage/sync"))
        .and(body_json(serde_json::json!({
            "integration_id": INTEGRATION,
            "uris": ["/p1", "/p2"],
            "usages": [{"asset_id": ASSET, "uri": "/p1", "additional": "a"}]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "accepted": [], "new": [usage_json("/p1", INTEGRATION)],
            "rejected": [], "removed": [{"asset_id": ASSET, "uri": "/p2"}]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let listing = vec![SyncUsage {
        asset_id: ASSET.into(),
        uri: "/p1".into(),
        additional: "a".into(),
    }];
    let result = client(&server)
        .await
        .sync_usages(&["/p1".into(), "/p2".into()], &listing)
        .await
        .unwrap();
    let SyncAnswer::Full(result) = result else {
        panic!("the documented answer is read in full: {result:?}")
    };
    assert_eq!(result.created.len(), 1);
    assert_eq!(result.removed.len(), 1);
}

#[tokio::test]
async fn a_sync_answer_that_confirms_nothing_is_unconfirmed_not_an_error() {
    for (status, body) in [
        (204, ""),
        (200, "{}"),
        (200, "[]"),
        (200, "<html>ok</html>"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/media/usage/sync"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .expect(1)
            .mount(&server)
            .await;
        let answer = client(&server)
            .await
            .sync_usages(&["/p1".into()], &[])
            .await
            .unwrap();
        assert!(
            matches!(answer, SyncAnswer::Unconfirmed(_)),
            "{status} {body:?}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn a_server_error_may_have_been_applied_and_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"))
        .expect(1)
        .mount(&server)
        .await;
    let e = client(&server)
        .await
        .create_usage(&id(ASSET), &uri("/p"), "")
        .await
        .unwrap_err();
    assert_eq!(
        e.reaction(),
        Reaction::Retry {
            maybe_applied: true
        }
    );
}

#[tokio::test]
async fn a_429_pauses_every_request_of_the_process() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&server).await;
    let e = c.list_usages(&id(ASSET)).await.unwrap_err();
    assert_eq!(e.reaction(), Reaction::PauseAll);
    assert!(
        c.gate().paused_until().is_some(),
        "the gate holds every worker back"
    );
}

#[tokio::test]
async fn a_slow_answer_is_a_timeout_that_may_have_been_applied() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
        .expect(1)
        .mount(&server)
        .await;
    let e = client(&server)
        .await
        .create_usage(&id(ASSET), &uri("/p"), "")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    assert_eq!(
        e.reaction(),
        Reaction::Retry {
            maybe_applied: true
        }
    );
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .respond_with(ResponseTemplate::new(301).insert_header("location", "/elsewhere"))
        .expect(1)
        .mount(&server)
        .await;
    let e = client(&server)
        .await
        .delete_usage(&id(ASSET), &uri("/p"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Redirect { .. }), "{e:?}");
    assert_eq!(e.reaction(), Reaction::GiveUp);
}

#[tokio::test]
async fn a_rejected_token_is_reported_as_such() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401).set_body_string("Invalid or expired token."))
        .expect(1)
        .mount(&server)
        .await;
    let e = client(&server)
        .await
        .list_usages(&id(ASSET))
        .await
        .unwrap_err();
    assert_eq!(e.reaction(), Reaction::CredentialsRejected);
}

const CAP: u64 = 64 * 1024;

fn assert_too_large(e: &Error) {
    assert!(matches!(e, Error::TooLarge(_)), "{e:?}");
    assert_eq!(
        e.reaction(),
        Reaction::Retry {
            maybe_applied: true
        },
        "a transient failure"
    );
    let message = e.to_string();
    assert!(
        message.contains("64.0 KiB") && message.contains("bynder.max_response_size"),
        "names the cap and the key to raise: {message}"
    );
}

/// REGRESSION: an endless 200 body (a broken gateway or TLS-inspecting proxy) was read whole:
/// 9.8 GB of memory in a minute. Reading stops at bynder.max_response_size and the connection
/// is dropped; the call fails as transient, naming the cap and the key to raise.
#[tokio::test]
async fn an_endless_answer_stops_at_the_cap_as_a_transient_failure() {
    let (url, mut hung_up) = crate::body::tests::endless_server().await;
    let client = client_at(&url, Some(CAP)).await;
    let e = client.list_usages(&id(ASSET)).await.unwrap_err();
    assert_too_large(&e);
    assert!(
        hung_up.recv().await.is_some(),
        "the client hung up instead of reading on"
    );
    let e = client
        .sync_usages(&["https://cms.example/p".to_owned()], &[])
        .await
        .unwrap_err();
    assert_too_large(&e);
    let e = client
        .raw(Method::GET, "/api/v4/currentUser/", None)
        .await
        .unwrap_err();
    assert_too_large(&e);
}

/// REGRESSION: an answer whose Content-Length is over the cap fails before its body is read.
#[tokio::test]
async fn an_answer_announcing_more_than_the_cap_fails_before_it_is_read() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/media/usage/"))
        .respond_with(ResponseTemplate::new(200).set_body_string(" ".repeat(CAP as usize + 1)))
        .expect(1)
        .mount(&server)
        .await;
    let e = client_at(&server.uri(), Some(CAP))
        .await
        .list_usages(&id(ASSET))
        .await
        .unwrap_err();
    assert_too_large(&e);
    assert!(e.to_string().contains("announced 65537 bytes"), "{e}");
}

/// REGRESSION: an error page was read whole to show its first 300 characters; an endless one
/// never ended. Only its start is read.
#[tokio::test]
async fn an_endless_error_page_shows_its_start_only() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
        while stream.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    let e = client_at(&url, Some(CAP))
        .await
        .list_usages(&id(ASSET))
        .await
        .unwrap_err();
    let Error::Status { status, body } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(status.as_u16(), 502);
    assert_eq!(body.chars().count(), 301, "300 characters and an ellipsis");
    assert!(body.ends_with('…'));
}

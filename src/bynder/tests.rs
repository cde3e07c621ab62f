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

const INTEGRATION: &str = "0191a303-9d99-433e-ada4-d244f37e1d7d";
const ASSET: &str = "C078E8EE-C13A-4DA5-86EC8D6F335364EB";

async fn client(server: &MockServer) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_portal(
        &server.uri(),
        INTEGRATION,
        "t0ken",
        &dir.path().join("s.db"),
    )
    .unwrap();
    config.bynder.timeout = Duration::from_millis(300);
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
        .create_usage(ASSET, "https://cms.example/p?a=1", "Hero image")
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
    c.delete_usage(ASSET, "https://cms.example/p")
        .await
        .unwrap();
    c.delete_usage(ASSET, "https://cms.example/gone")
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
    let usages = client(&server).await.list_usages(ASSET).await.unwrap();
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
        .create_usage(ASSET, "/p", "")
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
    let e = c.list_usages(ASSET).await.unwrap_err();
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
        .create_usage(ASSET, "/p", "")
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
        .delete_usage(ASSET, "/p")
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
    let e = client(&server).await.list_usages(ASSET).await.unwrap_err();
    assert_eq!(e.reaction(), Reaction::CredentialsRejected);
}

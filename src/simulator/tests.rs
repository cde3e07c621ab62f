//! End-to-end tests of the simulated portal over real loopback HTTP.

use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::*;

const INTEGRATION: &str = "b242c16d-70f4-4101-8df5-87b35bbe56f0";
const OTHER_INTEGRATION: &str = "8517905e-6c2f-47c3-96ca-0312027bbc95";
const TOKEN: &str = "permanent-token-for-tests";
const CLIENT_ID: &str = "0b1c2d3e-client";
const CLIENT_SECRET: &str = "client-secret";
const REDIRECT_URI: &str = "http://localhost:8765/callback";
const ASSET: &str = "C078E8EE-C13A-4DA5-86EC8D6F335364EB";
const OTHER_ASSET: &str = "D9D467C2-DD45-4E69-9600B3CFD48D18BF";
const MISSING_ASSET: &str = "00000000-0000-0000-0000000000000000";
const CONSUMER_KEY: &str = "consumer-key";
const CONSUMER_SECRET: &str = "consumer-secret";
const OAUTH1_TOKEN: &str = "oauth1-token";
const OAUTH1_TOKEN_SECRET: &str = "oauth1-token-secret";

fn options() -> Options {
    Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        clients: vec![Client {
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            scopes: vec![
                "asset.usage:read".to_owned(),
                "asset.usage:write".to_owned(),
                "current.user:read".to_owned(),
                "offline".to_owned(),
            ],
            redirect_uris: vec![REDIRECT_URI.to_owned()],
        }],
        oauth1: vec![OAuth1Credentials {
            consumer_key: CONSUMER_KEY.to_owned(),
            consumer_secret: CONSUMER_SECRET.to_owned(),
            token: OAUTH1_TOKEN.to_owned(),
            token_secret: OAUTH1_TOKEN_SECRET.to_owned(),
        }],
        missing_assets: [MISSING_ASSET.to_owned()].into_iter().collect(),
        ..Options::default()
    }
}

/// A client like the daemon's should be: it never follows redirects.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("the test client builds")
}

async fn start(options: Options) -> (Simulator, reqwest::Client) {
    let simulator = Simulator::start(options).await.expect("the portal starts");
    (simulator, http_client())
}

fn usage_url(simulator: &Simulator) -> String {
    format!("{}/api/media/usage/", simulator.base_url())
}

async fn create(
    simulator: &Simulator,
    http: &reqwest::Client,
    asset: &str,
    uri: &str,
    additional: &str,
) -> Value {
    let response = http
        .post(usage_url(simulator))
        .bearer_auth(TOKEN)
        .form(&[
            ("integration_id", INTEGRATION),
            ("asset_id", asset),
            ("uri", uri),
            ("additional", additional),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn get_usages(
    simulator: &Simulator,
    http: &reqwest::Client,
    query: &[(&str, &str)],
) -> Value {
    let response = http
        .get(usage_url(simulator))
        .bearer_auth(TOKEN)
        .query(query)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn delete(
    simulator: &Simulator,
    http: &reqwest::Client,
    query: &[(&str, &str)],
) -> StatusCode {
    http.delete(usage_url(simulator))
        .bearer_auth(TOKEN)
        .query(query)
        .send()
        .await
        .unwrap()
        .status()
}

async fn sync(simulator: &Simulator, http: &reqwest::Client, body: &Value) -> reqwest::Response {
    http.post(format!("{}/api/media/usage/sync", simulator.base_url()))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn token_url(simulator: &Simulator) -> String {
    format!("{}/v6/authentication/oauth2/token", simulator.base_url())
}

async fn client_credentials_token(
    simulator: &Simulator,
    http: &reqwest::Client,
    scope: &str,
) -> Value {
    let response = http
        .post(token_url(simulator))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn status_with_bearer(
    simulator: &Simulator,
    http: &reqwest::Client,
    token: &str,
) -> StatusCode {
    http.get(usage_url(simulator))
        .bearer_auth(token)
        .query(&[("asset_id", ASSET)])
        .send()
        .await
        .unwrap()
        .status()
}

#[test]
fn the_simulator_handle_can_be_shared_between_tasks() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Simulator>();
}

#[tokio::test]
async fn created_usage_can_be_read_back_and_deleted() {
    let (simulator, http) = start(options()).await;

    let created = create(
        &simulator,
        &http,
        ASSET,
        "https://cms.example/page/1",
        "Hero image",
    )
    .await;
    assert_eq!(created["asset_id"], ASSET);
    assert_eq!(created["uri"], "https://cms.example/page/1");
    assert_eq!(created["additional"], "Hero image");
    assert_eq!(created["integration"]["id"], INTEGRATION);
    assert_eq!(created["integration"]["description"], "WordPress");
    assert!(created["timestamp"].as_str().unwrap().ends_with("+00:00"));

    let listed = get_usages(&simulator, &http, &[("asset_id", ASSET)]).await;
    assert_eq!(listed, json!([created.clone()]));
    assert_eq!(simulator.usages()[0].id, created["id"].as_str().unwrap());

    let status = delete(
        &simulator,
        &http,
        &[
            ("integration_id", INTEGRATION),
            ("asset_id", ASSET),
            ("uri", "https://cms.example/page/1"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(simulator.usages().is_empty());
    assert_eq!(
        get_usages(&simulator, &http, &[("asset_id", ASSET)]).await,
        json!([])
    );
}

#[tokio::test]
async fn repeating_a_create_makes_a_second_record() {
    let (simulator, http) = start(options()).await;

    let first = create(&simulator, &http, ASSET, "https://cms.example/p", "").await;
    let second = create(&simulator, &http, ASSET, "https://cms.example/p", "").await;

    assert_ne!(first["id"], second["id"]);
    assert_eq!(simulator.usages_for(INTEGRATION).len(), 2);
}

#[tokio::test]
async fn create_accepts_bare_keys_and_a_given_timestamp() {
    let (simulator, http) = start(options()).await;
    let body = format!("integration_id={INTEGRATION}&asset_id={ASSET}&uri&additional&timestamp=2024-05-01T12%3A00%3A00%2B0000");

    let response = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["uri"], "");
    assert_eq!(created["timestamp"], "2024-05-01T12:00:00.000000+00:00");
}

#[tokio::test]
async fn create_rejects_missing_fields_json_bodies_and_unknown_assets() {
    let (simulator, http) = start(options()).await;

    let missing = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .form(&[("uri", "https://cms.example/p")])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let errors: Value = missing.json().await.unwrap();
    assert!(errors.get("integration_id").is_some() && errors.get("asset_id").is_some());

    let as_json = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .json(&json!({"integration_id": INTEGRATION, "asset_id": ASSET}))
        .send()
        .await
        .unwrap();
    assert_eq!(as_json.status(), StatusCode::BAD_REQUEST);

    let unknown = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .form(&[("integration_id", INTEGRATION), ("asset_id", MISSING_ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.json::<Value>().await.unwrap(),
        json!({"message": "Asset not found", "statuscode": 404})
    );
    assert!(simulator.usages().is_empty());
}

#[tokio::test]
async fn get_without_asset_id_is_a_bad_request() {
    let (simulator, http) = start(options()).await;
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/p", "");

    let response = http
        .get(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .query(&[("integration_id", INTEGRATION)])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"asset_id": "This field is required."})
    );
}

#[tokio::test]
async fn get_narrows_by_integration_and_uri() {
    let (simulator, http) = start(options()).await;
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "");
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/2", "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, "https://cms.example/1", "");

    let all = get_usages(&simulator, &http, &[("asset_id", ASSET)]).await;
    let mine = get_usages(
        &simulator,
        &http,
        &[("asset_id", ASSET), ("integration_id", INTEGRATION)],
    )
    .await;
    let one = get_usages(
        &simulator,
        &http,
        &[
            ("asset_id", ASSET),
            ("integration_id", INTEGRATION),
            ("uri", "https://cms.example/2"),
        ],
    )
    .await;

    assert_eq!(all.as_array().unwrap().len(), 3);
    assert_eq!(mine.as_array().unwrap().len(), 2);
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["uri"], "https://cms.example/2");
}

#[tokio::test]
async fn delete_with_a_uri_removes_only_that_page_and_never_another_integrations_usage() {
    let (simulator, http) = start(options()).await;
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "");
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "duplicate");
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/2", "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, "https://cms.example/1", "");

    let status = delete(
        &simulator,
        &http,
        &[
            ("integration_id", INTEGRATION),
            ("asset_id", ASSET),
            ("uri", "https://cms.example/1"),
        ],
    )
    .await;

    assert_eq!(status, StatusCode::NO_CONTENT);
    let left: Vec<(String, String)> = simulator
        .usages()
        .into_iter()
        .map(|usage| (usage.integration_id, usage.uri))
        .collect();
    assert_eq!(
        left,
        vec![
            (
                OTHER_INTEGRATION.to_owned(),
                "https://cms.example/1".to_owned()
            ),
            (INTEGRATION.to_owned(), "https://cms.example/2".to_owned()),
        ]
    );
}

#[tokio::test]
async fn delete_without_a_uri_removes_every_page_of_the_asset_for_that_integration_only() {
    let (simulator, http) = start(options()).await;
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "");
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/2", "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, "https://cms.example/1", "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, "https://cms.example/1", "");

    let status = delete(
        &simulator,
        &http,
        &[("integration_id", INTEGRATION), ("asset_id", ASSET)],
    )
    .await;

    assert_eq!(status, StatusCode::NO_CONTENT);
    let left: Vec<(String, String)> = simulator
        .usages()
        .into_iter()
        .map(|usage| (usage.integration_id, usage.asset_id))
        .collect();
    assert_eq!(
        left,
        vec![
            (OTHER_INTEGRATION.to_owned(), ASSET.to_owned()),
            (INTEGRATION.to_owned(), OTHER_ASSET.to_owned()),
        ]
    );
}

#[tokio::test]
async fn delete_needs_both_ids_in_the_query_and_answers_204_when_nothing_matched() {
    let (simulator, http) = start(options()).await;

    let in_body = http
        .delete(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(in_body.status(), StatusCode::BAD_REQUEST);

    let nothing = delete(
        &simulator,
        &http,
        &[("integration_id", INTEGRATION), ("asset_id", ASSET)],
    )
    .await;
    assert_eq!(nothing, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn sync_creates_updates_and_removes_only_on_listed_uris() {
    let (simulator, http) = start(options()).await;
    let page1 = "https://cms.example/1";
    let page2 = "https://cms.example/2";
    let unlisted = "https://cms.example/3";
    simulator.seed_usage(INTEGRATION, ASSET, page1, "old text");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, page1, "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, page1, "duplicate");
    simulator.seed_usage(INTEGRATION, ASSET, page2, "");
    simulator.seed_usage(INTEGRATION, ASSET, unlisted, "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, page2, "");

    let response = sync(
        &simulator,
        &http,
        &json!({
            "integration_id": INTEGRATION,
            "uris": [page1, page2],
            "usages": [
                {"asset_id": ASSET, "uri": page1, "additional": "new text"},
                {"asset_id": OTHER_ASSET, "uri": page1, "additional": ""},
                {"asset_id": OTHER_ASSET, "uri": page2, "additional": "Logo"},
                {"asset_id": MISSING_ASSET, "uri": page2, "additional": ""},
                {"asset_id": ASSET, "uri": "https://cms.example/4", "additional": ""},
            ],
        }),
    )
    .await;

    assert_eq!(response.status(), StatusCode::OK);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(
        outcome["accepted"],
        json!([
            {"asset_id": ASSET, "uri": page1, "additional": "new text"},
            {"asset_id": OTHER_ASSET, "uri": page1, "additional": ""},
        ])
    );
    assert_eq!(outcome["new"].as_array().unwrap().len(), 1);
    assert_eq!(outcome["new"][0]["asset_id"], OTHER_ASSET);
    assert_eq!(outcome["new"][0]["uri"], page2);
    assert_eq!(outcome["new"][0]["integration"]["id"], INTEGRATION);
    assert_eq!(
        outcome["rejected"],
        json!([
            {"asset_id": MISSING_ASSET, "uri": page2, "reason": "Asset not found"},
            {"asset_id": ASSET, "uri": "https://cms.example/4", "reason": "uri is not listed in uris"},
        ])
    );
    let mut removed = outcome["removed"].as_array().unwrap().clone();
    removed.sort_by_key(|item| item.to_string());
    assert_eq!(
        removed,
        vec![
            json!({"asset_id": ASSET, "uri": page2}),
            json!({"asset_id": OTHER_ASSET, "uri": page1}),
        ]
    );

    let mine: Vec<(String, String, String)> = simulator
        .usages_for(INTEGRATION)
        .into_iter()
        .map(|usage| (usage.asset_id, usage.uri, usage.additional))
        .collect();
    assert_eq!(
        mine,
        vec![
            (ASSET.to_owned(), page1.to_owned(), "new text".to_owned()),
            (ASSET.to_owned(), unlisted.to_owned(), String::new()),
            (OTHER_ASSET.to_owned(), page1.to_owned(), String::new()),
            (OTHER_ASSET.to_owned(), page2.to_owned(), "Logo".to_owned()),
        ]
    );
    assert_eq!(simulator.usages_for(OTHER_INTEGRATION).len(), 1);
}

#[tokio::test]
async fn sync_with_too_many_usages_is_413_and_a_disabled_sync_is_404() {
    let (simulator, http) = start(Options {
        max_sync_usages: Some(1),
        ..options()
    })
    .await;
    let body = json!({
        "integration_id": INTEGRATION,
        "uris": ["https://cms.example/1"],
        "usages": [
            {"asset_id": ASSET, "uri": "https://cms.example/1", "additional": ""},
            {"asset_id": OTHER_ASSET, "uri": "https://cms.example/1", "additional": ""},
        ],
    });
    assert_eq!(
        sync(&simulator, &http, &body).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert!(simulator.usages().is_empty());
    let no_integration = json!({"uris": [], "usages": []});
    assert_eq!(
        sync(&simulator, &http, &no_integration).await.status(),
        StatusCode::BAD_REQUEST
    );

    let (disabled, http) = start(Options {
        sync_endpoint: false,
        ..options()
    })
    .await;
    assert_eq!(
        sync(&disabled, &http, &body).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn slashless_usage_path_redirects_instead_of_serving() {
    let (simulator, http) = start(options()).await;

    let response = http
        .post(format!("{}/api/media/usage?x=1", simulator.base_url()))
        .bearer_auth(TOKEN)
        .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(response.headers()["location"], "/api/media/usage/?x=1");
    assert!(simulator.usages().is_empty());
}

#[tokio::test]
async fn client_credentials_work_in_the_body_and_with_basic_auth_without_a_refresh_token() {
    let (simulator, http) = start(options()).await;

    let in_body = client_credentials_token(&simulator, &http, "asset.usage:read").await;
    assert_eq!(in_body["token_type"], "bearer");
    assert_eq!(in_body["expires_in"], 3600);
    assert_eq!(in_body["scope"], "asset.usage:read");
    assert!(in_body.get("refresh_token").is_none());
    let read_only = in_body["access_token"].as_str().unwrap();
    assert_eq!(
        status_with_bearer(&simulator, &http, read_only).await,
        StatusCode::OK
    );
    let write = http
        .post(usage_url(&simulator))
        .bearer_auth(read_only)
        .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::FORBIDDEN);

    let basic = http
        .post(token_url(&simulator))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
    let basic: Value = basic.json().await.unwrap();
    assert_eq!(
        basic["scope"],
        "asset.usage:read asset.usage:write current.user:read offline"
    );
    assert!(basic.get("refresh_token").is_none());

    let wrong_secret = http
        .post(token_url(&simulator))
        .basic_auth(CLIENT_ID, Some("nope"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_secret.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong_secret.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );

    let unknown_grant = http
        .post(token_url(&simulator))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_grant.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        unknown_grant.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );

    let counters = simulator.counters();
    assert_eq!(counters.tokens_issued, 2);
    assert_eq!(counters.unauthorized, 1);
    assert_eq!(counters.by_route["POST /v6/authentication/oauth2/token"], 4);
}

#[tokio::test]
async fn an_access_token_stops_working_after_its_lifetime() {
    let (simulator, http) = start(Options {
        token_lifetime: Duration::from_secs(1),
        ..options()
    })
    .await;
    let token = client_credentials_token(&simulator, &http, "asset.usage:read").await;
    let token = token["access_token"].as_str().unwrap();
    assert_eq!(
        status_with_bearer(&simulator, &http, token).await,
        StatusCode::OK
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;

    let response = http
        .get(usage_url(&simulator))
        .bearer_auth(token)
        .query(&[("asset_id", ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.text().await.unwrap(), "Invalid or expired token.");
}

#[tokio::test]
async fn revoked_tokens_get_401() {
    let (simulator, http) = start(options()).await;
    let token = client_credentials_token(&simulator, &http, "asset.usage:read").await;
    let token = token["access_token"].as_str().unwrap();

    simulator.revoke_access_tokens();
    simulator.revoke_permanent_token(TOKEN);

    assert_eq!(
        status_with_bearer(&simulator, &http, token).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_with_bearer(&simulator, &http, TOKEN).await,
        StatusCode::UNAUTHORIZED
    );
    let anonymous = http
        .get(usage_url(&simulator))
        .query(&[("asset_id", ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(simulator.counters().unauthorized, 3);
}

#[tokio::test]
async fn missing_statistics_role_makes_usage_endpoints_403_but_not_current_user() {
    let (simulator, http) = start(Options {
        statistics_role: false,
        ..options()
    })
    .await;

    let response = http
        .get(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .query(&[("asset_id", ASSET)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"message": "Access denied", "statuscode": 403})
    );

    let user = http
        .get(format!("{}/api/v4/currentUser/", simulator.base_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), StatusCode::OK);
    assert!(user.json::<Value>().await.unwrap()["profileId"].is_string());
}

fn pkce_challenge(verifier: &str) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// Runs the authorization step and returns the code from the redirect.
async fn authorization_code(
    simulator: &Simulator,
    http: &reqwest::Client,
    scope: &str,
    challenge: &str,
) -> String {
    let response = http
        .get(format!(
            "{}/v6/authentication/oauth2/auth",
            simulator.base_url()
        ))
        .query(&[
            ("client_id", CLIENT_ID),
            ("redirect_uri", REDIRECT_URI),
            ("response_type", "code"),
            ("scope", scope),
            ("state", "state-1234"),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT_URI));
    let query: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(query["state"], "state-1234");
    query["code"].clone()
}

async fn exchange(
    simulator: &Simulator,
    http: &reqwest::Client,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut form = form.to_vec();
    form.extend([("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)]);
    http.post(token_url(simulator))
        .form(&form)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn authorization_code_with_pkce_then_refresh_keeps_the_same_refresh_token() {
    let (simulator, http) = start(options()).await;
    let verifier = "a-code-verifier-that-is-long-enough-to-be-valid-0123456789";
    let code = authorization_code(
        &simulator,
        &http,
        "asset.usage:read offline",
        &pkce_challenge(verifier),
    )
    .await;

    let wrong_verifier = exchange(
        &simulator,
        &http,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", "not-the-verifier"),
        ],
    )
    .await;
    assert_eq!(wrong_verifier.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        wrong_verifier.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );

    // The failed exchange used the code up, so start again.
    let code = authorization_code(
        &simulator,
        &http,
        "asset.usage:read offline",
        &pkce_challenge(verifier),
    )
    .await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT_URI),
        ("code_verifier", verifier),
    ];
    let granted = exchange(&simulator, &http, &form).await;
    assert_eq!(granted.status(), StatusCode::OK);
    let granted: Value = granted.json().await.unwrap();
    assert_eq!(granted["scope"], "asset.usage:read offline");
    let refresh_token = granted["refresh_token"].as_str().unwrap().to_owned();
    let access_token = granted["access_token"].as_str().unwrap();
    assert_eq!(
        status_with_bearer(&simulator, &http, access_token).await,
        StatusCode::OK
    );

    let reused = exchange(&simulator, &http, &form).await;
    assert_eq!(reused.status(), StatusCode::BAD_REQUEST);

    simulator.revoke_access_tokens();
    assert_eq!(
        status_with_bearer(&simulator, &http, access_token).await,
        StatusCode::UNAUTHORIZED
    );
    for _ in 0..2 {
        let refreshed = exchange(
            &simulator,
            &http,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh_token),
            ],
        )
        .await;
        assert_eq!(refreshed.status(), StatusCode::OK);
        let refreshed: Value = refreshed.json().await.unwrap();
        assert!(refreshed.get("refresh_token").is_none());
        let renewed = refreshed["access_token"].as_str().unwrap();
        assert_eq!(
            status_with_bearer(&simulator, &http, renewed).await,
            StatusCode::OK
        );
    }

    simulator.revoke_refresh_tokens();
    let revoked = exchange(
        &simulator,
        &http,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh_token),
        ],
    )
    .await;
    assert_eq!(
        revoked.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
}

#[tokio::test]
async fn with_rotation_a_refresh_replaces_the_refresh_token() {
    let (simulator, http) = start(Options {
        rotate_refresh_tokens: true,
        ..options()
    })
    .await;
    let verifier = "another-code-verifier-that-is-long-enough-0123456789abcdef";
    let code = authorization_code(&simulator, &http, "offline", &pkce_challenge(verifier)).await;
    let granted: Value = exchange(
        &simulator,
        &http,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", verifier),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let first = granted["refresh_token"].as_str().unwrap();

    let refreshed: Value = exchange(
        &simulator,
        &http,
        &[("grant_type", "refresh_token"), ("refresh_token", first)],
    )
    .await
    .json()
    .await
    .unwrap();
    let second = refreshed["refresh_token"].as_str().unwrap();
    assert_ne!(first, second);

    let old = exchange(
        &simulator,
        &http,
        &[("grant_type", "refresh_token"), ("refresh_token", first)],
    )
    .await;
    assert_eq!(old.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn authorization_refuses_unregistered_redirect_uris() {
    let (simulator, http) = start(options()).await;

    let response = http
        .get(format!(
            "{}/v6/authentication/oauth2/auth",
            simulator.base_url()
        ))
        .query(&[
            ("client_id", CLIENT_ID),
            ("redirect_uri", "https://evil.example/callback"),
            ("response_type", "code"),
            ("state", "state-1234"),
        ])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_rate_limit_block_extends_while_requests_continue_and_lifts_after_a_quiet_window() {
    let window = Duration::from_millis(300);
    let (simulator, http) = start(Options {
        rate_limit: Some(RateLimit {
            max_requests: 3,
            window,
        }),
        ..options()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            status_with_bearer(&simulator, &http, TOKEN).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        status_with_bearer(&simulator, &http, TOKEN).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Keep knocking, each time well inside the window: the block never lifts, even
    // long after the first window is over. The token endpoint is limited too.
    for _ in 0..6 {
        tokio::time::sleep(window / 4).await;
        let token = http
            .post(token_url(&simulator))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(token.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    tokio::time::sleep(window + window / 2).await;
    assert_eq!(
        status_with_bearer(&simulator, &http, TOKEN).await,
        StatusCode::OK
    );
    assert_eq!(simulator.counters().rate_limited, 7);
}

#[tokio::test]
async fn server_error_faults_answer_5xx_without_changing_state() {
    let (simulator, http) = start(options()).await;
    simulator.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });

    for _ in 0..5 {
        let response = http
            .post(usage_url(&simulator))
            .bearer_auth(TOKEN)
            .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_server_error());
        assert!(response.text().await.unwrap().contains("<html>"));
    }

    assert!(simulator.usages().is_empty());
    assert_eq!(simulator.counters().faults_injected, 5);
    // The token endpoint is not exposed to these faults.
    client_credentials_token(&simulator, &http, "asset.usage:read").await;
}

#[tokio::test]
async fn dropped_connections_are_transport_errors_and_some_creates_still_happen() {
    let (simulator, http) = start(options()).await;
    simulator.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let attempts = 24;

    for _ in 0..attempts {
        let sent = http
            .post(usage_url(&simulator))
            .bearer_auth(TOKEN)
            .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
            .send()
            .await;
        let error = sent.expect_err("a dropped connection gives no HTTP status");
        assert!(error.status().is_none());
    }

    // Half the drops happen after the create: the chance that all 24 land on one side
    // is 2 in 16 million.
    let created = simulator.usages().len();
    assert!(
        created > 0 && created < attempts,
        "{created} of {attempts} created"
    );
    assert_eq!(simulator.counters().faults_injected, attempts as u64);
}

#[tokio::test]
async fn a_slow_answer_outlasts_the_client_timeout_but_the_change_is_applied() {
    let (simulator, http) = start(options()).await;
    simulator.set_faults(Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_secs(5),
        ..Faults::default()
    });

    let sent = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .form(&[("integration_id", INTEGRATION), ("asset_id", ASSET)])
        .timeout(Duration::from_millis(300))
        .send()
        .await;

    assert!(sent.expect_err("the answer is too slow").is_timeout());
    assert_eq!(simulator.usages().len(), 1);
}

#[tokio::test]
async fn the_token_endpoint_can_be_down() {
    let (simulator, http) = start(options()).await;
    simulator.set_faults(Faults {
        token_endpoint_down: true,
        ..Faults::default()
    });

    let response = http
        .post(token_url(&simulator))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(simulator.counters().tokens_issued, 0);
}

#[tokio::test]
async fn concurrent_token_requests_are_observed_while_latency_holds_them() {
    let (simulator, http) = start(Options {
        latency: Duration::from_millis(300),
        ..options()
    })
    .await;

    let requests = (0..4).map(|_| {
        http.post(token_url(&simulator))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
    });
    for response in futures::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }

    let counters = simulator.counters();
    assert!(counters.max_concurrent_token_requests >= 2, "{counters:?}");
    assert_eq!(counters.tokens_issued, 4);
    simulator.reset_counters();
    assert_eq!(simulator.counters().total, 0);
}

#[tokio::test]
async fn current_user_needs_the_current_user_scope() {
    let (simulator, http) = start(options()).await;
    let url = format!("{}/api/v4/currentUser/", simulator.base_url());
    let usage_only = client_credentials_token(&simulator, &http, "asset.usage:read").await;
    let with_user = client_credentials_token(&simulator, &http, "current.user:read").await;

    let denied = http
        .get(&url)
        .bearer_auth(usage_only["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let allowed = http
        .get(&url)
        .bearer_auth(with_user["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();

    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert_eq!(allowed.status(), StatusCode::OK);
}

/// Builds an `Authorization: OAuth ...` header for a request, using the module's own
/// signature primitives (those are pinned to the RFC examples in `signature::tests`).
fn oauth1_header(
    method: &str,
    url: &str,
    form: &[(&str, &str)],
    (consumer_key, consumer_secret): (&str, &str),
    token: Option<(&str, &str)>,
    nonce: &str,
) -> String {
    let url = url::Url::parse(url).unwrap();
    let mut oauth: Vec<(String, String)> = vec![
        ("oauth_consumer_key".into(), consumer_key.into()),
        ("oauth_signature_method".into(), "HMAC-SHA1".into()),
        (
            "oauth_timestamp".into(),
            chrono::Utc::now().timestamp().to_string(),
        ),
        ("oauth_nonce".into(), nonce.into()),
        ("oauth_version".into(), "1.0".into()),
    ];
    if let Some((token, _)) = token {
        oauth.push(("oauth_token".into(), token.into()));
    }
    let mut parameters: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    parameters.extend(
        form.iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    parameters.extend(oauth.iter().cloned());
    let host = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let base = signature::signature_base_string(
        method,
        &signature::base_string_uri(&host, url.path()),
        &parameters,
    );
    let signature = signature::hmac_sha1_signature(
        &base,
        consumer_secret,
        token.map_or("", |(_, secret)| secret),
    );
    oauth.push(("oauth_signature".into(), signature));
    let fields: Vec<String> = oauth
        .iter()
        .map(|(name, value)| format!("{name}=\"{}\"", signature::encode(value)))
        .collect();
    format!("OAuth realm=\"Bynder\", {}", fields.join(", "))
}

#[tokio::test]
async fn an_oauth1_signed_request_is_accepted_once_and_a_tampered_one_is_refused() {
    let (simulator, http) = start(options()).await;
    let url = usage_url(&simulator);
    let form = [
        ("integration_id", INTEGRATION),
        ("asset_id", ASSET),
        ("uri", "https://cms.example/a page?x=1"),
    ];
    let consumer = (CONSUMER_KEY, CONSUMER_SECRET);
    let token = Some((OAUTH1_TOKEN, OAUTH1_TOKEN_SECRET));
    let header = oauth1_header("POST", &url, &form, consumer, token, "nonce-1");

    let signed = http
        .post(&url)
        .header("authorization", &header)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::OK);

    let replayed = http
        .post(&url)
        .header("authorization", &header)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED);

    let tampered_header = oauth1_header("POST", &url, &form, consumer, token, "nonce-2");
    let tampered = http
        .post(&url)
        .header("authorization", &tampered_header)
        .form(&[
            ("integration_id", INTEGRATION),
            ("asset_id", OTHER_ASSET),
            ("uri", "https://cms.example/a page?x=1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(tampered.status(), StatusCode::UNAUTHORIZED);

    let wrong_secret = oauth1_header(
        "POST",
        &url,
        &form,
        (CONSUMER_KEY, "guess"),
        token,
        "nonce-3",
    );
    let forged = http
        .post(&url)
        .header("authorization", &wrong_secret)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(simulator.usages().len(), 1);
}

#[tokio::test]
async fn the_oauth1_token_dance_yields_credentials_that_sign_api_calls() {
    let (simulator, http) = start(options()).await;
    let base = simulator.base_url();
    let consumer = (CONSUMER_KEY, CONSUMER_SECRET);

    let request_url = format!("{base}/api/v4/oauth/request_token/");
    let request_token = http
        .post(&request_url)
        .header(
            "authorization",
            oauth1_header("POST", &request_url, &[], consumer, None, "n1"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(request_token.status(), StatusCode::OK);
    let pairs: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(request_token.text().await.unwrap().as_bytes())
            .into_owned()
            .collect();
    let (token, secret) = (&pairs["oauth_token"], &pairs["oauth_token_secret"]);

    let access_url = format!("{base}/api/v4/oauth/access_token/");
    let too_early = http
        .post(&access_url)
        .header(
            "authorization",
            oauth1_header(
                "POST",
                &access_url,
                &[],
                consumer,
                Some((token, secret)),
                "n2",
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(too_early.status(), StatusCode::UNAUTHORIZED);

    let authorised = http
        .get(format!("{base}/api/v4/oauth/authorise/"))
        .query(&[
            ("oauth_token", token.as_str()),
            ("callback", "http://localhost:9/done"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(authorised.status(), StatusCode::FOUND);

    let access = http
        .post(&access_url)
        .header(
            "authorization",
            oauth1_header(
                "POST",
                &access_url,
                &[],
                consumer,
                Some((token, secret)),
                "n3",
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(access.status(), StatusCode::OK);
    let pairs: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(access.text().await.unwrap().as_bytes())
            .into_owned()
            .collect();
    let access_pair = (
        pairs["oauth_token"].as_str(),
        pairs["oauth_token_secret"].as_str(),
    );

    let get_url = format!("{}?asset_id={ASSET}", usage_url(&simulator));
    let listed = http
        .get(&get_url)
        .header(
            "authorization",
            oauth1_header("GET", &get_url, &[], consumer, Some(access_pair), "n4"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_request_is_counted_by_route_including_unknown_ones() {
    let (simulator, http) = start(options()).await;
    create(&simulator, &http, ASSET, "https://cms.example/p", "").await;
    delete(
        &simulator,
        &http,
        &[("integration_id", INTEGRATION), ("asset_id", ASSET)],
    )
    .await;
    http.get(format!("{}/nowhere", simulator.base_url()))
        .send()
        .await
        .unwrap();

    let counters = simulator.counters();
    assert_eq!(counters.total, 3);
    assert_eq!(counters.by_route["POST /api/media/usage/"], 1);
    assert_eq!(counters.by_route["DELETE /api/media/usage/"], 1);
    assert_eq!(counters.by_route["GET /nowhere"], 1);
}

#[tokio::test]
async fn seeded_and_removed_usages_show_in_the_listing() {
    let (simulator, _http) = start(options()).await;
    let seeded = simulator.seed_usage(
        OTHER_INTEGRATION,
        ASSET,
        "https://other.example/",
        "by hand",
    );
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, "https://cms.example/b", "");
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/a", "");

    let order: Vec<(String, String)> = simulator
        .usages()
        .into_iter()
        .map(|usage| (usage.integration_id, usage.asset_id))
        .collect();
    assert_eq!(
        order,
        vec![
            (OTHER_INTEGRATION.to_owned(), ASSET.to_owned()),
            (INTEGRATION.to_owned(), ASSET.to_owned()),
            (INTEGRATION.to_owned(), OTHER_ASSET.to_owned()),
        ]
    );
    assert!(simulator.remove_usage(&seeded.id));
    assert!(!simulator.remove_usage(&seeded.id));
    assert!(simulator.usages_for(OTHER_INTEGRATION).is_empty());
}

#[tokio::test]
async fn after_shutdown_the_portal_refuses_connections() {
    let (simulator, http) = start(options()).await;
    let url = usage_url(&simulator);

    simulator.shutdown().await;

    assert!(http.get(&url).send().await.is_err());
}

/// The (asset, uri, additional) of one integration's usages, in the listing's order.
fn page_contents(simulator: &Simulator, integration_id: &str) -> Vec<(String, String, String)> {
    simulator
        .usages_for(integration_id)
        .into_iter()
        .map(|usage| (usage.asset_id, usage.uri, usage.additional))
        .collect()
}

fn sorted_items(items: &Value) -> Vec<Value> {
    let mut items = items.as_array().expect("a list").clone();
    items.sort_by_key(|item| item.to_string());
    items
}

#[tokio::test]
async fn literal_sync_keeps_an_omitted_asset_on_a_uri_that_keeps_others() {
    let (simulator, http) = start(Options {
        sync_semantics: SyncSemantics::Literal,
        ..options()
    })
    .await;
    let page = "https://cms.example/1";
    simulator.seed_usage(INTEGRATION, ASSET, page, "old");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, page, "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, page, "duplicate");

    let response = sync(
        &simulator,
        &http,
        &json!({
            "integration_id": INTEGRATION,
            "uris": [page],
            "usages": [{"asset_id": ASSET, "uri": page, "additional": "new"}],
        }),
    )
    .await;

    assert_eq!(response.status(), StatusCode::OK);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(
        outcome["accepted"],
        json!([{"asset_id": ASSET, "uri": page, "additional": "new"}])
    );
    assert_eq!(outcome["new"], json!([]));
    assert_eq!(outcome["removed"], json!([]));
    let mut stored = page_contents(&simulator, INTEGRATION);
    stored.sort();
    assert_eq!(
        stored,
        vec![
            (ASSET.to_owned(), page.to_owned(), "new".to_owned()),
            (OTHER_ASSET.to_owned(), page.to_owned(), String::new()),
            (
                OTHER_ASSET.to_owned(),
                page.to_owned(),
                "duplicate".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn literal_sync_removes_every_usage_on_a_uri_listed_without_entries() {
    let (simulator, http) = start(Options {
        sync_semantics: SyncSemantics::Literal,
        ..options()
    })
    .await;
    let emptied = "https://cms.example/1";
    let kept = "https://cms.example/2";
    let unlisted = "https://cms.example/3";
    simulator.seed_usage(INTEGRATION, ASSET, emptied, "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, emptied, "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, emptied, "duplicate");
    simulator.seed_usage(INTEGRATION, ASSET, kept, "");
    simulator.seed_usage(INTEGRATION, ASSET, unlisted, "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, emptied, "");

    let response = sync(
        &simulator,
        &http,
        &json!({
            "integration_id": INTEGRATION,
            "uris": [emptied, kept],
            "usages": [{"asset_id": OTHER_ASSET, "uri": kept, "additional": ""}],
        }),
    )
    .await;

    assert_eq!(response.status(), StatusCode::OK);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(
        sorted_items(&outcome["removed"]),
        vec![
            json!({"asset_id": ASSET, "uri": emptied}),
            json!({"asset_id": OTHER_ASSET, "uri": emptied}),
            json!({"asset_id": OTHER_ASSET, "uri": emptied}),
        ]
    );
    assert_eq!(outcome["new"].as_array().unwrap().len(), 1);
    assert_eq!(outcome["new"][0]["asset_id"], OTHER_ASSET);
    let mut stored = page_contents(&simulator, INTEGRATION);
    stored.sort();
    assert_eq!(
        stored,
        vec![
            (ASSET.to_owned(), kept.to_owned(), String::new()),
            (ASSET.to_owned(), unlisted.to_owned(), String::new()),
            (OTHER_ASSET.to_owned(), kept.to_owned(), String::new()),
        ]
    );
    assert_eq!(simulator.usages_for(OTHER_INTEGRATION).len(), 1);
}

#[tokio::test]
async fn exact_sync_removes_an_asset_omitted_from_a_uri_that_keeps_others() {
    let (simulator, http) = start(Options {
        sync_semantics: SyncSemantics::Exact,
        ..options()
    })
    .await;
    let page = "https://cms.example/1";
    simulator.seed_usage(INTEGRATION, ASSET, page, "");
    simulator.seed_usage(INTEGRATION, OTHER_ASSET, page, "");

    let response = sync(
        &simulator,
        &http,
        &json!({
            "integration_id": INTEGRATION,
            "uris": [page],
            "usages": [{"asset_id": ASSET, "uri": page, "additional": ""}],
        }),
    )
    .await;

    let outcome: Value = response.json().await.unwrap();
    assert_eq!(
        outcome["removed"],
        json!([{"asset_id": OTHER_ASSET, "uri": page}])
    );
    assert_eq!(
        page_contents(&simulator, INTEGRATION),
        vec![(ASSET.to_owned(), page.to_owned(), String::new())]
    );
    assert_eq!(Options::default().sync_semantics, SyncSemantics::Exact);
}

#[tokio::test]
async fn every_sync_answer_applies_the_same_changes_and_differs_only_in_its_answer() {
    let page = "https://cms.example/1";
    for (answer, status, body) in [
        (SyncAnswer::Full, StatusCode::OK, None),
        (SyncAnswer::NoContent, StatusCode::NO_CONTENT, Some("")),
        (SyncAnswer::EmptyObject, StatusCode::OK, Some("{}")),
        (SyncAnswer::EmptyArray, StatusCode::OK, Some("[]")),
    ] {
        let (simulator, http) = start(Options {
            sync_answer: answer,
            ..options()
        })
        .await;
        simulator.seed_usage(INTEGRATION, OTHER_ASSET, page, "");

        let response = sync(
            &simulator,
            &http,
            &json!({
                "integration_id": INTEGRATION,
                "uris": [page],
                "usages": [
                    {"asset_id": ASSET, "uri": page, "additional": "Hero"},
                    {"asset_id": MISSING_ASSET, "uri": page, "additional": ""},
                ],
            }),
        )
        .await;

        assert_eq!(response.status(), status, "{answer:?}");
        let text = response.text().await.unwrap();
        match body {
            Some(expected) => assert_eq!(text, expected, "{answer:?}"),
            None => {
                let outcome: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(outcome["new"][0]["asset_id"], ASSET);
                assert_eq!(outcome["rejected"][0]["asset_id"], MISSING_ASSET);
                assert_eq!(
                    outcome["removed"],
                    json!([{"asset_id": OTHER_ASSET, "uri": page}])
                );
                assert_eq!(outcome["accepted"], json!([]));
            }
        }
        assert_eq!(
            page_contents(&simulator, INTEGRATION),
            vec![(ASSET.to_owned(), page.to_owned(), "Hero".to_owned())],
            "{answer:?}"
        );
    }
    assert_eq!(Options::default().sync_answer, SyncAnswer::Full);
}

#[tokio::test]
async fn lower_id_case_matches_any_case_and_answers_lowercased_ids() {
    let missing_upper = "ABCDEF00-0000-0000-0000000000000000";
    let (simulator, http) = start(Options {
        id_case: IdCase::Lower,
        missing_assets: [missing_upper.to_owned()].into_iter().collect(),
        ..options()
    })
    .await;
    let lower = ASSET.to_ascii_lowercase();
    let other_lower = OTHER_ASSET.to_ascii_lowercase();
    let page = "https://cms.example/1";

    let created = create(&simulator, &http, ASSET, page, "").await;
    assert_eq!(created["asset_id"], lower.as_str());
    let seeded = simulator.seed_usage(INTEGRATION, OTHER_ASSET, page, "");
    assert_eq!(seeded.asset_id, other_lower);

    let mixed = format!("{}{}", &lower[..10], &ASSET[10..]);
    for asked in [ASSET, lower.as_str(), mixed.as_str()] {
        let listed = get_usages(&simulator, &http, &[("asset_id", asked)]).await;
        assert_eq!(listed, json!([created.clone()]), "{asked}");
    }

    let missing = http
        .post(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .form(&[
            ("integration_id", INTEGRATION),
            ("asset_id", &missing_upper.to_ascii_lowercase()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let response = sync(
        &simulator,
        &http,
        &json!({
            "integration_id": INTEGRATION,
            "uris": [page],
            "usages": [
                {"asset_id": ASSET, "uri": page, "additional": "Hero"},
                {"asset_id": missing_upper, "uri": page, "additional": ""},
            ],
        }),
    )
    .await;
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(
        outcome["accepted"],
        json!([{"asset_id": lower, "uri": page, "additional": "Hero"}])
    );
    assert_eq!(
        outcome["rejected"],
        json!([{
            "asset_id": missing_upper.to_ascii_lowercase(), "uri": page, "reason": "Asset not found",
        }])
    );
    assert_eq!(
        outcome["removed"],
        json!([{"asset_id": other_lower, "uri": page}])
    );

    let status = delete(
        &simulator,
        &http,
        &[("integration_id", INTEGRATION), ("asset_id", ASSET)],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(simulator.usages().is_empty());
}

#[tokio::test]
async fn preserved_id_case_treats_ids_that_differ_in_case_as_different_assets() {
    let (simulator, http) = start(options()).await;
    let created = create(&simulator, &http, ASSET, "https://cms.example/1", "").await;
    assert_eq!(created["asset_id"], ASSET);

    let lower = ASSET.to_ascii_lowercase();
    let listed = get_usages(&simulator, &http, &[("asset_id", &lower)]).await;
    assert_eq!(listed, json!([]));
    assert_eq!(Options::default().id_case, IdCase::Preserve);
}

#[tokio::test]
async fn listing_without_asset_id_serves_an_integration_and_its_pages_when_enabled() {
    let (simulator, http) = start(Options {
        list_without_asset_id: true,
        ..options()
    })
    .await;
    let first = simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "");
    let second = simulator.seed_usage(INTEGRATION, OTHER_ASSET, "https://cms.example/2", "");
    let third = simulator.seed_usage(INTEGRATION, OTHER_ASSET, "https://cms.example/1", "");
    simulator.seed_usage(OTHER_INTEGRATION, ASSET, "https://cms.example/1", "");
    let ids = |listed: &Value| -> Vec<String> {
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|usage| usage["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let whole = get_usages(&simulator, &http, &[("integration_id", INTEGRATION)]).await;
    assert_eq!(
        ids(&whole),
        vec![first.id.clone(), second.id.clone(), third.id.clone()]
    );
    let page = get_usages(
        &simulator,
        &http,
        &[
            ("integration_id", INTEGRATION),
            ("uri", "https://cms.example/1"),
        ],
    )
    .await;
    assert_eq!(ids(&page), vec![first.id.clone(), third.id.clone()]);
    assert_eq!(page[1]["integration"]["id"], INTEGRATION);

    let nothing = get_usages(
        &simulator,
        &http,
        &[("integration_id", "no-such-integration")],
    )
    .await;
    assert_eq!(nothing, json!([]));

    let uri_only = http
        .get(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .query(&[("uri", "https://cms.example/1")])
        .send()
        .await
        .unwrap();
    assert_eq!(uri_only.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        uri_only.json::<Value>().await.unwrap(),
        json!({"asset_id": "This field is required."})
    );
}

#[tokio::test]
async fn listing_without_asset_id_is_a_bad_request_when_disabled() {
    let (simulator, http) = start(Options {
        list_without_asset_id: false,
        ..options()
    })
    .await;
    simulator.seed_usage(INTEGRATION, ASSET, "https://cms.example/1", "");

    let response = http
        .get(usage_url(&simulator))
        .bearer_auth(TOKEN)
        .query(&[
            ("integration_id", INTEGRATION),
            ("uri", "https://cms.example/1"),
        ])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(!Options::default().list_without_asset_id);
}

async fn token_request(
    simulator: &Simulator,
    http: &reqwest::Client,
    form: &[(&str, &str)],
) -> (StatusCode, Value) {
    let response = exchange(simulator, http, form).await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn invalid_scope_body(scope: &str) -> Value {
    json!({
        "error": "invalid_scope",
        "error_description": format!(
            "The requested scope is invalid, unknown, or malformed. The OAuth 2.0 Client is \
             not allowed to request scope '{scope}'."
        ),
    })
}

#[tokio::test]
async fn refuse_answers_invalid_scope_naming_the_first_scope_the_app_lacks() {
    let (simulator, http) = start(Options {
        scope_policy: ScopePolicy::Refuse,
        ..options()
    })
    .await;

    let (status, body) = token_request(
        &simulator,
        &http,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "asset.usage:read admin:everything asset:write"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, invalid_scope_body("admin:everything"));

    let (status, body) =
        token_request(&simulator, &http, &[("grant_type", "client_credentials")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["scope"],
        "asset.usage:read asset.usage:write current.user:read offline"
    );

    // The browser step sends the app back with the error instead of a code.
    let response = http
        .get(format!(
            "{}/v6/authentication/oauth2/auth",
            simulator.base_url()
        ))
        .query(&[
            ("client_id", CLIENT_ID),
            ("redirect_uri", REDIRECT_URI),
            ("response_type", "code"),
            ("scope", "offline asset:read"),
            ("state", "state-1234"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    let query: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(query["error"], "invalid_scope");
    assert!(query["error_description"].ends_with("request scope 'asset:read'."));
    assert_eq!(query["state"], "state-1234");
    assert!(!query.contains_key("code"));

    // A refresh that asks for more than the app may have is refused too.
    let verifier = "a-verifier-for-the-refuse-test-that-is-long-enough-0123456789";
    let code = authorization_code(
        &simulator,
        &http,
        "asset.usage:read offline",
        &pkce_challenge(verifier),
    )
    .await;
    let (status, granted) = token_request(
        &simulator,
        &http,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", verifier),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let refresh_token = granted["refresh_token"].as_str().unwrap();
    let (status, body) = token_request(
        &simulator,
        &http,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("scope", "asset.usage:read admin:everything"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, invalid_scope_body("admin:everything"));
    assert_eq!(simulator.counters().tokens_issued, 2);
    assert_eq!(Options::default().scope_policy, ScopePolicy::Refuse);
}

#[tokio::test]
async fn refuse_counts_offline_as_a_scope_the_app_must_have() {
    let (simulator, http) = start(Options {
        clients: vec![Client {
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            scopes: vec!["asset.usage:read".to_owned()],
            redirect_uris: vec![REDIRECT_URI.to_owned()],
        }],
        ..options()
    })
    .await;

    let (status, body) = token_request(
        &simulator,
        &http,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "asset.usage:read offline"),
        ],
    )
    .await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, invalid_scope_body("offline"));
}

#[tokio::test]
async fn narrow_grants_the_intersection_of_the_request_and_the_apps_scopes() {
    let (simulator, http) = start(Options {
        scope_policy: ScopePolicy::Narrow,
        ..options()
    })
    .await;

    let granted = client_credentials_token(
        &simulator,
        &http,
        "asset.usage:read admin:everything asset.usage:write",
    )
    .await;
    assert_eq!(granted["scope"], "asset.usage:read asset.usage:write");

    let verifier = "a-verifier-for-the-narrow-test-that-is-long-enough-0123456789";
    let code = authorization_code(
        &simulator,
        &http,
        "asset.usage:read admin:everything offline",
        &pkce_challenge(verifier),
    )
    .await;
    let (status, granted) = token_request(
        &simulator,
        &http,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", verifier),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(granted["scope"], "asset.usage:read offline");
    assert!(granted["refresh_token"].is_string());
}

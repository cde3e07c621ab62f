//! The asset-usage endpoints of the simulated portal (`/api/media/usage/` GET, POST and
//! DELETE, `/api/media/usage/sync`) and `GET /api/v4/currentUser/`.
//!
//! Owns request validation and the semantics of each endpoint, including the strict
//! choices where Bynder is silent (see the module doc of [`super`]). Storage is
//! [`super::store`]; authentication is [`super::auth`]; faults are applied around these
//! handlers by [`super::http`]; the shared answers are [`super::wire`].

use std::collections::{HashMap, HashSet};

use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::options::{IdCase, SyncAnswer, SyncSemantics};
use super::state::Shared;
use super::store::{format_timestamp, Record, Store};
use super::wire::{self, Call, Rejection};

const READ_SCOPE: &str = "asset.usage:read";
const WRITE_SCOPE: &str = "asset.usage:write";
const CURRENT_USER_SCOPE: &str = "current.user:read";

/// `/api/media/usage/`: GET lists, POST creates, DELETE removes.
pub(super) fn usages(shared: &Shared, call: &Call) -> Response {
    match call.method {
        Method::GET => retrieve(shared, call),
        Method::POST => create(shared, call),
        Method::DELETE => delete(shared, call),
        _ => wire::method_not_allowed(),
    }
}

/// Checks the credential, its scope and the user's STATISTICS role, in that order.
fn admit(shared: &Shared, call: &Call, scope: &str) -> Result<(), Rejection> {
    shared.authorize(call, scope)?;
    if shared.policy.statistics_role {
        Ok(())
    } else {
        Err(Rejection::from(wire::access_denied()))
    }
}

fn retrieve(shared: &Shared, call: &Call) -> Response {
    if let Err(rejection) = admit(shared, call, READ_SCOPE) {
        return rejection.into_response();
    }
    let query = call.query_pairs();
    let integration_id = wire::field(&query, "integration_id");
    let uri = wire::field(&query, "uri");
    let asset_id = wire::field(&query, "asset_id").map(|id| shared.policy.asset_id(id));
    let store = shared.store();
    let ids = match (asset_id, integration_id) {
        (Some(asset_id), _) => store.find(&asset_id, integration_id, uri),
        // Contentful's app lists a page this way; whether Bynder serves it is unknown.
        (None, Some(integration_id)) if shared.policy.list_without_asset_id => match uri {
            Some(uri) => store.page(integration_id, uri),
            None => store.integration(integration_id),
        },
        // Strict: listing without an asset is not known to work.
        (None, _) => {
            drop(store);
            return wire::required(&["asset_id"]);
        }
    };
    let found: Vec<WireUsage<'_>> = ids
        .iter()
        .filter_map(|id| store.get(id).map(|record| WireUsage::new(id, record)))
        .collect();
    let body = serde_json::to_vec(&found).expect("usages serialize");
    drop(store);
    wire::json_bytes(StatusCode::OK, body)
}

fn create(shared: &Shared, call: &Call) -> Response {
    if let Err(rejection) = admit(shared, call, WRITE_SCOPE) {
        return rejection.into_response();
    }
    // A body that is not a form reads as an empty form, as a form-only server sees it.
    let form = call.form_pairs();
    let integration_id = wire::field(&form, "integration_id");
    let asset_id = wire::field(&form, "asset_id");
    let (Some(integration_id), Some(asset_id)) = (integration_id, asset_id) else {
        let mut missing = Vec::new();
        if integration_id.is_none() {
            missing.push("integration_id");
        }
        if asset_id.is_none() {
            missing.push("asset_id");
        }
        return wire::required(&missing);
    };
    let asset_id = shared.policy.asset_id(asset_id);
    let timestamp = match wire::field(&form, "timestamp") {
        None => Utc::now(),
        Some(text) => match parse_timestamp(text) {
            Some(timestamp) => timestamp,
            None => {
                return wire::field_errors(&[(
                    "timestamp",
                    "Datetime has wrong format. Use ISO 8601, e.g. YYYY-MM-DDThh:mm:ssZ.",
                )])
            }
        },
    };
    if shared.policy.is_missing(&asset_id) {
        return asset_not_found();
    }
    let uri = wire::field(&form, "uri").unwrap_or("");
    let additional = wire::field(&form, "additional").unwrap_or("");
    let mut store = shared.store();
    // Strict: never deduplicated, so a retried create leaves a second record.
    let id = store.insert(integration_id, &asset_id, uri, additional, timestamp);
    let body = match store.get(&id) {
        Some(record) => {
            serde_json::to_vec(&WireUsage::new(&id, record)).expect("a usage serializes")
        }
        None => unreachable!("a usage that was just inserted exists"),
    };
    drop(store);
    wire::json_bytes(StatusCode::OK, body)
}

fn delete(shared: &Shared, call: &Call) -> Response {
    if let Err(rejection) = admit(shared, call, WRITE_SCOPE) {
        return rejection.into_response();
    }
    // Parameters are read from the query only; a body is ignored, as SDKs never send one.
    let query = call.query_pairs();
    let integration_id = wire::field(&query, "integration_id");
    let asset_id = wire::field(&query, "asset_id");
    let (Some(integration_id), Some(asset_id)) = (integration_id, asset_id) else {
        let mut missing = Vec::new();
        if integration_id.is_none() {
            missing.push("integration_id");
        }
        if asset_id.is_none() {
            missing.push("asset_id");
        }
        return wire::required(&missing);
    };
    let asset_id = shared.policy.asset_id(asset_id);
    // An empty `uri=` counts as absent and so deletes the asset's every usage of this
    // integration: the dangerous reading, which a client must never trigger by accident.
    let uri = wire::field(&query, "uri");
    let mut store = shared.store();
    for id in store.find(&asset_id, Some(integration_id), uri) {
        store.remove(&id);
    }
    drop(store);
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /api/media/usage/sync`.
pub(super) fn sync(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::POST {
        return wire::method_not_allowed();
    }
    if let Err(rejection) = admit(shared, call, WRITE_SCOPE) {
        return rejection.into_response();
    }
    let request = match SyncRequest::parse(call, shared.policy.id_case) {
        Ok(request) => request,
        Err(rejection) => return rejection.into_response(),
    };
    if shared
        .policy
        .max_sync_usages
        .is_some_and(|max| request.usages.len() > max)
    {
        return wire::text(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    }
    let mut store = shared.store();
    let outcome = apply_sync(
        &mut store,
        &shared.policy.missing_assets,
        shared.policy.sync_semantics,
        &request,
    );
    drop(store);
    match shared.policy.sync_answer {
        SyncAnswer::Full => {
            let body = serde_json::to_vec(&outcome).expect("a sync outcome serializes");
            wire::json_bytes(StatusCode::OK, body)
        }
        SyncAnswer::NoContent => StatusCode::NO_CONTENT.into_response(),
        SyncAnswer::EmptyObject => wire::json_bytes(StatusCode::OK, b"{}".to_vec()),
        SyncAnswer::EmptyArray => wire::json_bytes(StatusCode::OK, b"[]".to_vec()),
    }
}

/// A parsed sync body.
struct SyncRequest {
    integration_id: String,
    uris: Vec<String>,
    usages: Vec<SyncEntry>,
}

struct SyncEntry {
    asset_id: String,
    uri: String,
    additional: String,
}

impl SyncRequest {
    /// Parses the body; with [`IdCase::Lower`] every asset id is lowercased here, so that
    /// matching and every list of the answer use the portal's case.
    fn parse(call: &Call, id_case: IdCase) -> Result<SyncRequest, Rejection> {
        let is_json = call
            .header(header::CONTENT_TYPE.as_str())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"));
        let body: Value = match serde_json::from_slice(&call.body) {
            Ok(body) if is_json => body,
            _ => {
                return Err(Rejection::from(wire::json_value(
                    StatusCode::BAD_REQUEST,
                    &json!({"message": "The body must be a JSON object sent as application/json.", "statuscode": 400}),
                )))
            }
        };
        let Some(integration_id) = body
            .get("integration_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
        else {
            return Err(Rejection::from(wire::required(&["integration_id"])));
        };
        let uris = match body.get("uris") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Rejection::from(wire::field_errors(&[(
                        "uris",
                        "Expected a list of strings.",
                    )]))
                })?,
            Some(_) => {
                return Err(Rejection::from(wire::field_errors(&[(
                    "uris",
                    "Expected a list of strings.",
                )])))
            }
        };
        let mut usages = match body.get("usages") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(SyncEntry::parse)
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => {
                return Err(Rejection::from(wire::field_errors(&[(
                    "usages",
                    "Expected a list of usages.",
                )])))
            }
        };
        if id_case == IdCase::Lower {
            for entry in &mut usages {
                entry.asset_id.make_ascii_lowercase();
            }
        }
        Ok(SyncRequest {
            integration_id: integration_id.to_owned(),
            uris,
            usages,
        })
    }
}

impl SyncEntry {
    fn parse(item: &Value) -> Result<SyncEntry, Rejection> {
        let text = |name: &str| {
            item.get(name)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        if !item.is_object() {
            return Err(Rejection::from(wire::field_errors(&[(
                "usages",
                "Expected a list of usages.",
            )])));
        }
        let asset_id = text("asset_id");
        if asset_id.is_empty() {
            return Err(Rejection::from(wire::required(&["asset_id"])));
        }
        Ok(SyncEntry {
            asset_id,
            uri: text("uri"),
            additional: text("additional"),
        })
    }
}

/// The sync answer: `{accepted, new, rejected, removed}`.
#[derive(Serialize, Default)]
struct SyncOutcome {
    accepted: Vec<Value>,
    new: Vec<Value>,
    rejected: Vec<Value>,
    removed: Vec<Value>,
}

/// Applies a sync to the uris it lists; other uris and other integrations are not
/// touched. With [`SyncSemantics::Exact`] each listed uri ends up holding exactly the
/// entries with that uri; with [`SyncSemantics::Literal`] a listed uri that no entry
/// uses (a rejected entry counts as using it) is emptied, and on the others nothing is
/// removed.
fn apply_sync(
    store: &mut Store,
    missing_assets: &HashSet<String>,
    semantics: SyncSemantics,
    request: &SyncRequest,
) -> SyncOutcome {
    let mut outcome = SyncOutcome::default();
    let listed: HashSet<&str> = request.uris.iter().map(String::as_str).collect();
    let used: HashSet<&str> = request
        .usages
        .iter()
        .map(|entry| entry.uri.as_str())
        .collect();
    let mut wanted: HashMap<&str, Vec<&SyncEntry>> = HashMap::new();
    for entry in &request.usages {
        let reason = if missing_assets.contains(&entry.asset_id) {
            Some("Asset not found")
        } else if !listed.contains(entry.uri.as_str()) {
            Some("uri is not listed in uris")
        } else {
            None
        };
        match reason {
            Some(reason) => outcome.rejected.push(json!({
                "asset_id": entry.asset_id, "uri": entry.uri, "reason": reason,
            })),
            None => wanted.entry(entry.uri.as_str()).or_default().push(entry),
        }
    }
    let integration_id = request.integration_id.as_str();
    let mut done: HashSet<&str> = HashSet::new();
    for uri in &request.uris {
        if !done.insert(uri.as_str()) {
            continue;
        }
        // The oldest stored usage of each asset is the one kept (and updated); any others
        // are duplicates (from repeated creates).
        let stored = store.page(integration_id, uri);
        let mut kept: HashMap<String, Uuid> = HashMap::new();
        let mut surplus: Vec<Uuid> = Vec::new();
        for id in stored {
            let Some(record) = store.get(&id) else {
                continue;
            };
            if kept.contains_key(&*record.asset_id) {
                surplus.push(id);
            } else {
                kept.insert(record.asset_id.to_string(), id);
            }
        }
        let mut listed_assets: HashSet<&str> = HashSet::new();
        for entry in wanted.get(uri.as_str()).into_iter().flatten() {
            listed_assets.insert(entry.asset_id.as_str());
            match kept.get(&entry.asset_id) {
                Some(id) => {
                    store.set_additional(id, &entry.additional);
                    outcome.accepted.push(json!({
                        "asset_id": entry.asset_id, "uri": entry.uri, "additional": entry.additional,
                    }));
                }
                None => {
                    let id = store.insert(
                        integration_id,
                        &entry.asset_id,
                        uri,
                        &entry.additional,
                        Utc::now(),
                    );
                    kept.insert(entry.asset_id.clone(), id);
                    if let Some(record) = store.get(&id) {
                        outcome.new.push(
                            serde_json::to_value(WireUsage::new(&id, record))
                                .expect("a usage serializes"),
                        );
                    }
                }
            }
        }
        let doomed: Vec<Uuid> = match semantics {
            SyncSemantics::Exact => {
                let unlisted = kept
                    .iter()
                    .filter(|(asset_id, _)| !listed_assets.contains(asset_id.as_str()))
                    .map(|(_, id)| *id);
                surplus.into_iter().chain(unlisted).collect()
            }
            SyncSemantics::Literal if used.contains(uri.as_str()) => Vec::new(),
            SyncSemantics::Literal => surplus.into_iter().chain(kept.into_values()).collect(),
        };
        for id in doomed {
            if let Some(record) = store.remove(&id) {
                outcome
                    .removed
                    .push(json!({"asset_id": &*record.asset_id, "uri": &*record.uri}));
            }
        }
    }
    outcome
}

/// `GET /api/v4/currentUser/`: the token's user (for client credentials, the app's
/// assigned user).
pub(super) fn current_user(shared: &Shared, call: &Call) -> Response {
    if call.method != Method::GET {
        return wire::method_not_allowed();
    }
    if let Err(rejection) = shared.authorize(call, CURRENT_USER_SCOPE) {
        return rejection.into_response();
    }
    wire::json_value(
        StatusCode::OK,
        &json!({
            "id": "3A5B2C1D-7E8F-4A9B-8C7D6E5F4A3B2C1D",
            "username": "sync.robot@example.com",
            "email": "sync.robot@example.com",
            "firstname": "Sync",
            "infix": "",
            "lastname": "Robot",
            "profileId": "9F8E7D6C-5B4A-4392-8170F6E5D4C3B2A1",
            "active": true,
            "isSSOOnly": false,
            "language": "en_US",
            "timeZone": "Europe/Amsterdam",
            "lastLogin": "2024-05-01T12:00:00Z",
            "companyName": "Example Corp",
            "department": "Web",
            "job": "Integration user",
            "persisted": true,
            "terms": true,
        }),
    )
}

fn asset_not_found() -> Response {
    wire::json_value(
        StatusCode::NOT_FOUND,
        &json!({"message": "Asset not found", "statuscode": 404}),
    )
}

/// Parses an ISO 8601 timestamp leniently, as the SDKs' varied formats all evidently
/// work: `Z` or an offset with or without a colon, optional fractional seconds, a missing
/// zone (read as UTC) or a bare date.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(parsed) = DateTime::parse_from_rfc3339(text) {
        return Some(parsed.to_utc());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(parsed) = DateTime::parse_from_str(text, format) {
            return Some(parsed.to_utc());
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(parsed) = NaiveDateTime::parse_from_str(text, format) {
            return Some(parsed.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
}

/// A usage as the API answers it, with the integration nested.
#[derive(Serialize)]
struct WireUsage<'a> {
    id: String,
    asset_id: &'a str,
    uri: &'a str,
    additional: &'a str,
    timestamp: String,
    integration: WireIntegration<'a>,
}

#[derive(Serialize)]
struct WireIntegration<'a> {
    id: &'a str,
    description: &'static str,
}

impl<'a> WireUsage<'a> {
    fn new(id: &Uuid, record: &'a Record) -> WireUsage<'a> {
        WireUsage {
            id: id.to_string(),
            asset_id: &record.asset_id,
            uri: &record.uri,
            additional: &record.additional,
            timestamp: format_timestamp(&record.timestamp),
            integration: WireIntegration {
                id: &record.integration_id,
                description: describe_integration(&record.integration_id),
            },
        }
    }
}

/// The integration's name for the ids in Bynder's published table.
fn describe_integration(integration_id: &str) -> &'static str {
    match integration_id {
        "b242c16d-70f4-4101-8df5-87b35bbe56f0" => "WordPress",
        "0191a303-9d99-433e-ada4-d244f37e1d7d" => "Adobe Experience Manager",
        "a7129512-c6e3-47a3-be40-9a66503e82ed" => "Drupal 8",
        "41a92562-bfd9-4847-a34d-4320bcef5e4a" => "inRiver",
        "8517905e-6c2f-47c3-96ca-0312027bbc95" => "TYPO3",
        _ => "Custom integration",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_every_format_the_sdks_send_are_accepted() {
        let expected = "2024-05-01T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        for text in [
            "2024-05-01T12:00:00Z",
            "2024-05-01T12:00:00+00:00",
            "2024-05-01T12:00:00+0000",
            "2024-05-01T14:00:00+02:00",
            "2024-05-01T12:00:00.000000+00:00",
            "2024-05-01T12:00:00",
        ] {
            assert_eq!(parse_timestamp(text), Some(expected), "{text}");
        }
        assert!(parse_timestamp("2024-05-01").is_some());
        assert_eq!(parse_timestamp("yesterday"), None);
    }
}

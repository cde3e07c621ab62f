//! `raw`: one authenticated request to any API path of the portal, printed as JSON with the
//! request, status, headers and body (credentials and cookies redacted).

use reqwest::header::HeaderMap;
use reqwest::Method;

use std::collections::BTreeMap;

use super::check::connect;
use super::{Exit, Failure};
use crate::bynder;
use crate::config::Config;

/// `raw`: one authenticated request to any API path relative to bynder.base_url; prints
/// `{request, status, headers, body}` as JSON (credentials and cookies redacted). A 2xx exits 0;
/// a 404 exits 1 unless `--allow-404`; a 401 or 403 exits 4; other statuses exit 1.
#[derive(Debug, clap::Args)]
pub struct RawArgs {
    /// The HTTP method: GET, POST, PUT, PATCH, DELETE…
    #[arg(value_parser = parse_method)]
    pub method: Method,
    /// The path relative to bynder.base_url, e.g. /api/media/usage/ (it may carry a ?query).
    #[arg(value_parser = parse_path)]
    pub path: String,
    /// A query parameter, e.g. --query asset_id=C078E8EE-C13A-4DA5-86EC8D6F335364EB (repeatable).
    #[arg(long = "query", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub query: Vec<(String, String)>,
    /// A form field; the body is sent as application/x-www-form-urlencoded (repeatable).
    #[arg(long = "form", value_name = "KEY=VALUE", value_parser = parse_pair, conflicts_with = "json")]
    pub form: Vec<(String, String)>,
    /// A JSON body, sent as application/json.
    #[arg(long, value_name = "BODY", value_parser = parse_json)]
    pub json: Option<serde_json::Value>,
    /// Print a 404 and exit 0 instead of failing.
    #[arg(long)]
    pub allow_404: bool,
}

fn parse_method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("`{text}` is not an HTTP method"))
}

/// Only a path: the credentials must never be sent to another address.
fn parse_path(text: &str) -> Result<String, String> {
    if text.starts_with('/') && !text.starts_with("//") {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` is not a path on the portal; give it relative to bynder.base_url, e.g. \
             /api/media/usage/ (the credentials are never sent to another address)"
        ))
    }
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

/// Headers never printed as they are.
const REDACTED_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

pub async fn raw(config: Config, args: RawArgs) -> Result<Exit, Failure> {
    let mut path = args.path.clone();
    if !args.query.is_empty() {
        let extra = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&args.query)
            .finish();
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&extra);
    }
    let body = if let Some(json) = &args.json {
        Some(("application/json", json.to_string().into_bytes()))
    } else if !args.form.is_empty() {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&args.form)
            .finish();
        Some(("application/x-www-form-urlencoded", form.into_bytes()))
    } else {
        None
    };

    let (store, client) = connect(&config).await?;
    let result = client.raw(args.method.clone(), &path, body).await;
    if let Some(store) = store {
        store.close().await;
    }
    let response = match result {
        Ok(response) => response,
        Err(bynder::Error::Auth(e)) => return Err(e.into()),
        Err(e @ (bynder::Error::Connect { .. } | bynder::Error::Timeout(_))) => {
            return Err(Failure::Unreachable(e.to_string()))
        }
        Err(e) => return Err(Failure::Unexpected(anyhow::Error::new(e))),
    };
    let printed = serde_json::json!({
        "request": {
            "method": args.method.as_str(),
            "url": response.url.as_str(),
            "headers": headers_json(&response.request_headers),
        },
        "status": response.status.as_u16(),
        "headers": headers_json(&response.headers),
        "body": body_json(&response.body),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&printed).map_err(anyhow::Error::from)?
    );
    let status = response.status;
    match status.as_u16() {
        200..=299 => Ok(Exit::Ok),
        404 if args.allow_404 => Ok(Exit::Ok),
        404 => Err(Failure::Unexpected(anyhow::anyhow!(
            "the portal answered 404 Not Found for {}. Fix: check the path, or pass --allow-404 when \
             a 404 is an expected answer",
            response.url.path()
        ))),
        401 => Err(Failure::Credentials(format!(
            "the portal answered 401 even with fresh credentials. Fix: {}",
            client.credentials().rejection_fix()
        ))),
        403 => Err(Failure::Credentials(
            "the portal answered 403: the credentials lack the scope this endpoint needs (e.g. \
             asset.usage:write), or their user lacks a security role (the usage endpoints need \
             STATISTICS)"
                .to_owned(),
        )),
        300..=399 => Err(Failure::Unexpected(anyhow::anyhow!(
            "the portal answered {status} (a redirect, not followed). Fix: use the path the Location \
             header names, or check bynder.base_url"
        ))),
        _ => Err(Failure::Unexpected(anyhow::anyhow!(
            "the portal answered {status}"
        ))),
    }
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        let shown = if REDACTED_HEADERS.contains(&name.as_str()) {
            "[redacted]".to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.entry(name.as_str().to_owned()).or_default().push(shown);
    }
    serde_json::Value::Object(
        out.into_iter()
            .map(|(name, mut values)| {
                let value = if values.len() == 1 {
                    serde_json::Value::String(values.remove(0))
                } else {
                    serde_json::Value::from(values)
                };
                (name, value)
            })
            .collect(),
    )
}

/// The body as JSON when it is JSON, else as text (`null` when empty).
fn body_json(body: &[u8]) -> serde_json::Value {
    if body.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_arguments_parse_pairs_methods_and_json() {
        assert_eq!(
            parse_pair("uri=https://a/?x=1").unwrap(),
            ("uri".to_owned(), "https://a/?x=1".to_owned())
        );
        assert!(parse_pair("novalue").is_err());
        assert!(parse_pair("=x").is_err());
        assert_eq!(parse_method("delete").unwrap(), Method::DELETE);
        assert!(parse_method("GE T").is_err());
        assert!(parse_json("{\"a\":").is_err());
        assert!(parse_path("/api/media/usage/?asset_id=A").is_ok());
        for elsewhere in [
            "https://evil.example/",
            "//evil.example/x",
            "api/media/usage/",
        ] {
            assert!(parse_path(elsewhere).is_err(), "{elsewhere}");
        }
    }

    #[test]
    fn printed_headers_never_show_credentials_or_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        headers.append("set-cookie", "a=s3cret".parse().unwrap());
        headers.append("set-cookie", "b=s3cret".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        let json = headers_json(&headers);
        assert!(!json.to_string().contains("s3cret"), "{json}");
        assert_eq!(json["authorization"], "[redacted]");
        assert_eq!(json["set-cookie"][1], "[redacted]");
        assert_eq!(json["content-type"], "application/json");
    }

    #[test]
    fn bodies_print_as_json_when_they_are_json() {
        assert_eq!(body_json(b""), serde_json::Value::Null);
        assert_eq!(body_json(b"[1]"), serde_json::json!([1]));
        assert_eq!(body_json(b"Not Found"), serde_json::json!("Not Found"));
    }
}

//! The administrative commands around authentication: `check` (can the daemon work with this
//! config?), `raw` (one authenticated request to any API path), and the one-time logins
//! `auth login` (OAuth 2 authorization code + PKCE) and `auth oauth1-login` (the OAuth 1.0a
//! temporary-token handshake).
//!
//! Owns their arguments, their terminal and browser interaction (the loopback axum server that
//! receives the browser's redirect, a code pasted on stdin) and their exit codes. The protocol
//! itself is `auth`'s; requests go through `bynder::Client` and the process-wide gate.
//! Secrets are never taken as arguments: a pasted authorization code is read from stdin.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use url::Url;

use crate::auth::{AuthError, AuthFailure, Credentials, OAuth1Login, OAuth2Login, REQUIRED_SCOPES};
use crate::bynder::{self, Client};
use crate::cli::{Exit, Failure};
use crate::config::{AuthSettings, Config, ConfigError};
use crate::gate::Gate;
use crate::store::{open_store, OpenMode, Store};

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NotLoggedIn(m) => Failure::Config(ConfigError::new(m)),
            AuthError::Setup(_) => Failure::Config(ConfigError::new(e.to_string())),
            AuthError::Store(_) => Failure::Unexpected(anyhow::Error::new(e)),
            e => match e.failure() {
                AuthFailure::Rejected => Failure::Credentials(e.to_string()),
                AuthFailure::Transient | AuthFailure::RateLimited => {
                    Failure::Unreachable(format!("{e}. Try again later"))
                }
            },
        }
    }
}

/// The gate, store (when the credentials live in it) and client for a one-off command.
async fn connect(config: &Config) -> Result<(Option<Store>, Client), Failure> {
    let store = if config.auth.needs_store() {
        Some(open_store(&config.database, OpenMode::Existing).await?)
    } else {
        None
    };
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let credentials = Credentials::load(config, store.as_ref(), gate.clone()).await?;
    let client = Client::new(config, credentials, gate)
        .map_err(|e| ConfigError::new(format!("{e}. Fix: check bynder.ca_file")))?;
    Ok((store, client))
}

// ---- check --------------------------------------------------------------------------------------

/// `check`: validates the config, reaches the portal, authenticates, and shows who the daemon
/// acts as and with which scopes. Sends only reads. Exit 0 when the daemon can work, 4 when the
/// credentials are refused or lack a scope or role, 1 when the portal cannot be reached.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

/// An asset id no portal has: reading its usages proves the read scope and the STATISTICS
/// role without touching anything.
const PROBE_ASSET: &str = "00000000-0000-0000-0000000000000000";

pub async fn check(config: Config, _args: CheckArgs) -> Result<Exit, Failure> {
    println!(
        "Config:       valid (auth.method = \"{}\")",
        config.auth.method_name()
    );
    println!(
        "Portal:       {} (integration {})",
        config.bynder.base_url, config.bynder.integration_id
    );
    let (store, client) = connect(&config).await?;
    let result = check_with(&config, &client).await;
    if let Some(store) = store {
        store.close().await;
    }
    match &result {
        Ok(_) => println!("Result:       ok, the daemon can sync with these credentials"),
        Err(e) => println!("Result:       FAILED: {e}"),
    }
    result
}

async fn check_with(config: &Config, client: &Client) -> Result<Exit, Failure> {
    let credentials = client.credentials();
    let oauth_scopes = match credentials.token_info().await {
        Ok(Some(info)) => {
            let scopes = info.scopes.clone();
            println!(
                "Token:        obtained from {}; expires in {}; scopes: {}",
                token_url(config),
                info.lifetime
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "(not said)".into()),
                scopes
                    .as_ref()
                    .map(|s| s.join(" "))
                    .unwrap_or_else(|| "(not reported; assuming those requested)".into())
            );
            scopes
        }
        Ok(None) => {
            println!(
                "Token:        {}",
                match &config.auth {
                    AuthSettings::OAuth1(_) => "OAuth 1.0a signature (no scopes to report)",
                    _ => "permanent token (its scopes are set in Bynder and not reported)",
                }
            );
            None
        }
        Err(e) => {
            println!("Token:        FAILED");
            return Err(e.into());
        }
    };

    match current_user_on_its_own(config, client).await {
        Ok(user) => println!("Acting as:    {}", describe_user(&user)),
        Err(bynder::Error::Auth(e)) if e.is_invalid_scope() => println!(
            "Acting as:    unknown: the OAuth app does not allow the {CURRENT_USER_SCOPE} scope, which \
             the daemon does not need (usage access is checked below)"
        ),
        Err(e) if e.status() == Some(StatusCode::FORBIDDEN) => println!(
            "Acting as:    unknown: Bynder refused /api/v4/currentUser/ (403); the credentials lack \
             the current.user:read scope (the daemon does not need it)"
        ),
        Err(e) => {
            println!("Acting as:    FAILED");
            return Err(api_failure(e, credentials, CURRENT_USER_SCOPE));
        }
    }

    match client.list_usages(PROBE_ASSET).await {
        Ok(_) => println!("Usage API:    readable (asset.usage:read and the STATISTICS role)"),
        // Bynder's answer for an unknown asset is not documented; neither is a 403.
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(400 | 404)) => {
            println!("Usage API:    readable (asset.usage:read and the STATISTICS role)")
        }
        Err(e) if e.status() == Some(StatusCode::FORBIDDEN) => {
            println!("Usage API:    FAILED (403)");
            let missing_read = oauth_scopes
                .as_ref()
                .is_some_and(|s| !s.iter().any(|g| g == "asset.usage:read"));
            let why = if missing_read {
                "the access token lacks the asset.usage:read scope. Fix: add it to auth.scopes and \
                 allow it for the OAuth app"
                    .to_owned()
            } else if oauth_scopes.is_some() {
                "the credentials' user lacks the STATISTICS security role. Fix: give the OAuth app's \
                 assigned user a profile with the STATISTICS role in Bynder"
                    .to_owned()
            } else {
                "the token lacks the asset.usage:read scope or its user lacks the STATISTICS security \
                 role. Fix: check the token's scopes and give its user the STATISTICS role in Bynder"
                    .to_owned()
            };
            return Err(Failure::Credentials(format!(
                "Bynder refused to list usages (403): {why}"
            )));
        }
        Err(e) => {
            println!("Usage API:    FAILED");
            return Err(api_failure(e, credentials, "asset.usage:read"));
        }
    }

    match &oauth_scopes {
        Some(scopes) => {
            let missing: Vec<&str> = REQUIRED_SCOPES
                .into_iter()
                .filter(|s| !scopes.iter().any(|g| g == s))
                .collect();
            if !missing.is_empty() {
                println!("Write access: FAILED (scope missing)");
                return Err(Failure::Credentials(format!(
                    "the access token lacks the scope(s) {}: Bynder will refuse creates and deletes (403). \
                     Fix: add them to auth.scopes and allow them for the OAuth app",
                    missing.join(", ")
                )));
            }
            println!("Write access: granted (asset.usage:write)");
        }
        None => println!(
            "Write access: not tested (a check never writes); the credentials need the \
             asset.usage:write scope"
        ),
    }
    Ok(Exit::Ok)
}

/// The scope `GET /api/v4/currentUser/` needs; only `check` uses it, to say who the daemon acts as.
const CURRENT_USER_SCOPE: &str = "current.user:read";

/// `GET /api/v4/currentUser/`. With client credentials whose scopes lack `current.user:read`,
/// a token is asked for with it on its own, so that an app registered with the usage scopes
/// only (as Bynder's setup guide does it) still checks out: its `invalid_scope` is a note.
async fn current_user_on_its_own(
    config: &Config,
    client: &Client,
) -> Result<serde_json::Value, bynder::Error> {
    if let AuthSettings::ClientCredentials(settings) = &config.auth {
        if !settings.scopes.iter().any(|s| s == CURRENT_USER_SCOPE) {
            let mut widened = config.clone();
            if let AuthSettings::ClientCredentials(s) = &mut widened.auth {
                s.scopes.push(CURRENT_USER_SCOPE.to_owned());
            }
            let credentials = Credentials::load(&widened, None, client.gate().clone()).await?;
            let asking = Client::new(&widened, credentials, client.gate().clone())?;
            return asking.current_user().await;
        }
    }
    client.current_user().await
}

fn token_url(config: &Config) -> String {
    match &config.auth {
        AuthSettings::ClientCredentials(s) | AuthSettings::RefreshToken(s) => {
            s.token_url.to_string()
        }
        _ => String::new(),
    }
}

fn describe_user(user: &serde_json::Value) -> String {
    let field = |name: &str| {
        user.get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let name = [field("firstname"), field("infix"), field("lastname")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = if name.is_empty() {
        field("username").unwrap_or("(no name)").to_owned()
    } else {
        name
    };
    if let Some(email) = field("email") {
        out.push_str(&format!(" <{email}>"));
    }
    let ids: Vec<String> = [
        ("username", field("username")),
        ("user id", field("id")),
        ("profile", field("profileId")),
    ]
    .into_iter()
    .filter_map(|(label, v)| v.map(|v| format!("{label} {v}")))
    .collect();
    if !ids.is_empty() {
        out.push_str(&format!(" ({})", ids.join(", ")));
    }
    out
}

/// The failure for an API error during `check`: a 401 names the credential to fix.
fn api_failure(error: bynder::Error, credentials: &Credentials, scope: &str) -> Failure {
    match error.status().map(|s| s.as_u16()) {
        Some(401) => Failure::Credentials(format!(
            "Bynder rejected the credentials (401). Fix: {}",
            credentials.rejection_fix()
        )),
        Some(403) => Failure::Credentials(format!(
            "Bynder refused the request (403): the credentials lack the {scope} scope"
        )),
        _ => match error {
            bynder::Error::Auth(e) => e.into(),
            bynder::Error::Connect { .. } | bynder::Error::Timeout(_) => {
                Failure::Unreachable(error.to_string())
            }
            other => Failure::Unexpected(anyhow::Error::new(other)),
        },
    }
}

// ---- raw ----------------------------------------------------------------------------------------

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

// ---- auth login, auth oauth1-login --------------------------------------------------------------

/// One-time logins that store credentials in the state database.
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// OAuth 2 login for auth.method = "refresh_token": prints the authorization URL to open,
    /// receives Bynder's redirect on auth.redirect_uri (or reads the code pasted on stdin),
    /// and stores the refresh token in the state database. Run `migrate` first.
    Login(LoginArgs),
    /// OAuth 1.0a handshake for auth.method = "oauth1": gets a request token, prints the URL
    /// that approves it, then stores the access token pair (valid 30 days) in the state
    /// database. Run `migrate` first.
    #[command(name = "oauth1-login")]
    OAuth1Login(OAuth1LoginArgs),
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// Do not listen on auth.redirect_uri: paste the code, or the whole address the browser was
    /// sent to, on stdin (for a browser on another machine).
    #[arg(long)]
    pub paste: bool,
    /// How long to wait for the approval.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct OAuth1LoginArgs {
    /// Do not listen for the browser's return: press Enter once the browser shows the approval.
    #[arg(long)]
    pub paste: bool,
    /// How long to wait for the approval.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn auth(config: Config, command: AuthCommand) -> Result<Exit, Failure> {
    match command {
        AuthCommand::Login(args) => login(config, args).await,
        AuthCommand::OAuth1Login(args) => oauth1_login(config, args).await,
    }
}

const CALLBACK_PATH: &str = "/callback";

async fn login(config: Config, args: LoginArgs) -> Result<Exit, Failure> {
    let AuthSettings::RefreshToken(settings) = &config.auth else {
        return Err(ConfigError::new(format!(
            "`auth login` is for auth.method = \"refresh_token\", but it is \"{}\". Fix: set \
             auth.method = \"refresh_token\" with the OAuth app's client_id and client_secret{}",
            config.auth.method_name(),
            if matches!(config.auth, AuthSettings::OAuth1(_)) {
                ", or run `auth oauth1-login` for OAuth 1.0a"
            } else {
                ""
            }
        ))
        .into());
    };
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let redirect = &settings.redirect_uri;
    let listener = if args.paste {
        None
    } else {
        bind_loopback(redirect).await?
    };
    let login = OAuth2Login::start(settings);
    eprintln!(
        "Open this address in a browser, log in to Bynder as the user the daemon should act as, \
         and approve the access:"
    );
    println!("{}", login.url());
    match &listener {
        Some(_) => eprintln!(
            "Waiting for Bynder to send the browser back to {redirect} … (or paste the code, or \
             the whole address the browser ends up on, here and press Enter)"
        ),
        None => eprintln!(
            "Bynder sends the browser to {redirect}?code=…; paste that whole address (or just the \
             code) here and press Enter:"
        ),
    }
    let expected_path = redirect.path().to_owned();
    let code = wait_for_approval(listener, &expected_path, args.timeout, |source, params| {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        // The state first: anything on the loopback port can send a request, and only one
        // carrying this login's state may end it, approval or refusal alike.
        match (get("state"), source) {
            (Some(state), _) if !login.state_matches(state) => {
                return Verdict::Retry(
                    "this answer belongs to another login attempt (state mismatch); ignored".into(),
                )
            }
            (None, Source::Browser) => {
                return Verdict::Retry("the redirect carries no state; ignored".into())
            }
            _ => {}
        }
        if let Some(error) = get("error") {
            let description = get("error_description").unwrap_or("");
            return Verdict::Fail(format!(
                "Bynder did not authorize the app ({error}: {description}). Fix: approve the \
                     access, and check that auth.redirect_uri is registered with the OAuth app"
            ));
        }
        match get("code").or(get(PASTED)) {
            Some(code) if !code.trim().is_empty() => Verdict::Accept(code.trim().to_owned()),
            _ => Verdict::Retry("no authorization code in it".into()),
        }
    })
    .await?;
    eprintln!("Approved; exchanging the code for tokens…");
    let scopes = login.finish(&config, &store, gate, code).await?;
    store.close().await;
    println!(
        "Logged in: the refresh token is stored in {}. Granted scopes: {}",
        config.database.path.display(),
        if scopes.is_empty() {
            "(not reported)".to_owned()
        } else {
            scopes.join(" ")
        }
    );
    Ok(Exit::Ok)
}

async fn oauth1_login(config: Config, args: OAuth1LoginArgs) -> Result<Exit, Failure> {
    let AuthSettings::OAuth1(settings) = &config.auth else {
        return Err(ConfigError::new(format!(
            "`auth oauth1-login` is for auth.method = \"oauth1\", but it is \"{}\". Fix: set \
             auth.method = \"oauth1\" with auth.consumer_key and auth.consumer_secret",
            config.auth.method_name()
        ))
        .into());
    };
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let login = OAuth1Login::start(&config, gate).await?;
    // No callback is registered for OAuth 1 apps, so any free loopback port will do.
    let (listener, callback) = if args.paste {
        (None, None)
    } else {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on a loopback port: {e}"))?;
        let port = listener.local_addr().map_err(anyhow::Error::from)?.port();
        let callback = Url::parse(&format!("http://127.0.0.1:{port}{CALLBACK_PATH}"))
            .expect("a loopback URL parses");
        (Some(listener), Some(callback))
    };
    eprintln!("Open this address in a browser, log in to Bynder and approve the access:");
    println!("{}", login.authorise_url(callback.as_ref()));
    match &callback {
        Some(_) => eprintln!(
            "Waiting for the browser to come back … (or press Enter here once Bynder shows the \
             approval)"
        ),
        None => eprintln!("Press Enter here once Bynder shows the approval:"),
    }
    wait_for_approval(listener, CALLBACK_PATH, args.timeout, |source, params| {
        let token = params
            .iter()
            .find(|(k, _)| k == "oauth_token")
            .map(|(_, v)| v.as_str());
        match (source, token) {
            (Source::Terminal, _) => Verdict::Accept(String::new()),
            (Source::Browser, Some(token)) if login.is_request_token(token) => {
                Verdict::Accept(String::new())
            }
            (Source::Browser, _) => {
                Verdict::Retry("this answer belongs to another login attempt; ignored".into())
            }
        }
    })
    .await?;
    if settings.token.is_some() {
        eprintln!(
            "note: auth.token and auth.token_secret are set in the config and take precedence over \
             the stored pair; remove them to use it"
        );
    }
    let expires = login.finish(&store).await?;
    store.close().await;
    println!(
        "Logged in: the OAuth 1.0a token pair is stored in {}. It expires on {}; `status` warns a week \
         before: run `bynder-usage-sync auth oauth1-login` again then.",
        config.database.path.display(),
        expires.format("%Y-%m-%d %H:%M UTC")
    );
    Ok(Exit::Ok)
}

/// Binds the loopback address of a redirect URI (`http://127.0.0.1:8765/callback`), or `None`
/// when it is not a loopback address (the code must then be pasted).
async fn bind_loopback(redirect: &Url) -> Result<Option<TcpListener>, Failure> {
    let host = match redirect.host() {
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => std::net::IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => std::net::IpAddr::V6(ip),
        Some(url::Host::Domain("localhost")) => std::net::IpAddr::from([127, 0, 0, 1]),
        _ => return Ok(None),
    };
    if redirect.scheme() != "http" {
        return Ok(None);
    }
    let port = redirect.port_or_known_default().unwrap_or(80);
    match TcpListener::bind((host, port)).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) => Err(Failure::Config(ConfigError::new(format!(
            "cannot listen on {host}:{port} for the redirect to auth.redirect_uri ({e}). Fix: stop \
             what uses that port, or run `auth login --paste` and paste the code"
        )))),
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The browser, redirected to the loopback listener.
    Browser,
    /// A line typed or pasted on stdin.
    Terminal,
}

/// What to make of an answer.
enum Verdict {
    Accept(String),
    /// Not this login's answer: say why and keep waiting.
    Retry(String),
    Fail(String),
}

/// The parameter name a pasted bare value (not an address) gets.
const PASTED: &str = "pasted";

/// Waits for the browser's redirect on `listener` (a GET to `path`) or a line on stdin, whichever
/// `judge` accepts first, up to `timeout`.
async fn wait_for_approval<F>(
    listener: Option<TcpListener>,
    path: &str,
    timeout: Duration,
    mut judge: F,
) -> Result<String, Failure>
where
    F: FnMut(Source, &[(String, String)]) -> Verdict,
{
    let (callback_tx, mut callbacks) = mpsc::channel::<Callback>(16);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = listener.map(|listener| {
        tokio::spawn(serve_callbacks(
            listener,
            path.to_owned(),
            callback_tx,
            stopped,
        ))
    });
    let result = wait_for_verdict(&mut callbacks, server.is_some(), timeout, &mut judge).await;
    // Graceful: the answer to the callback that ended the wait is sent before the server stops,
    // and idle connections close at once. A connection holding half a request is waited for
    // only this long: a peer that never finishes cannot hold the login up.
    let _ = stop.send(());
    if let Some(mut server) = server {
        if tokio::time::timeout(CALLBACK_SHUTDOWN, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
    result
}

/// How long the callback server may take to finish its answers once the login has its verdict.
const CALLBACK_SHUTDOWN: Duration = Duration::from_secs(2);

/// One browser request to the callback path, waiting for the answer the verdict gives.
struct Callback {
    params: Vec<(String, String)>,
    reply: oneshot::Sender<(StatusCode, String)>,
}

async fn wait_for_verdict<F>(
    callbacks: &mut mpsc::Receiver<Callback>,
    listening: bool,
    timeout: Duration,
    judge: &mut F,
) -> Result<String, Failure>
where
    F: FnMut(Source, &[(String, String)]) -> Verdict,
{
    let mut lines = stdin_lines();
    let mut stdin_open = true;
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        Failure::Unexpected(anyhow::anyhow!(
            "no approval arrived within {}. Fix: run the login again and approve it in the browser \
             in time (or pass a longer --timeout)",
            humantime::format_duration(timeout)
        ))
    };
    loop {
        let open = stdin_open;
        let pending_lines = &mut lines;
        let line = async move {
            if open {
                pending_lines.recv().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(timed_out()),
            Some(callback) = callbacks.recv(), if listening => {
                let (answer, result) = match judge(Source::Browser, &callback.params) {
                    Verdict::Accept(value) => (
                        (StatusCode::OK, "bynder-usage-sync is authorized. You can close this window.".to_owned()),
                        Some(Ok(value)),
                    ),
                    Verdict::Retry(why) => {
                        eprintln!("{why}");
                        ((StatusCode::BAD_REQUEST, why), None)
                    }
                    Verdict::Fail(why) => (
                        (StatusCode::BAD_REQUEST, why.clone()),
                        Some(Err(Failure::Credentials(why))),
                    ),
                };
                let _ = callback.reply.send(answer);
                if let Some(result) = result {
                    return result;
                }
            }
            line = line => {
                let Some(line) = line else {
                    // stdin is closed (e.g. /dev/null under a service manager): wait for the browser.
                    stdin_open = false;
                    if !listening {
                        return Err(Failure::Unexpected(anyhow::anyhow!(
                            "stdin closed before a code was pasted. Fix: run the login in a terminal"
                        )));
                    }
                    continue;
                };
                let text = line.trim();
                let params: Vec<(String, String)> = match Url::parse(text) {
                    Ok(url) if text.contains("://") => url.query_pairs().into_owned().collect(),
                    _ if text.starts_with('?') || text.contains("code=") => {
                        url::form_urlencoded::parse(text.trim_start_matches('?').as_bytes()).into_owned().collect()
                    }
                    _ => vec![(PASTED.to_owned(), text.to_owned())],
                };
                match judge(Source::Terminal, &params) {
                    Verdict::Accept(value) => return Ok(value),
                    Verdict::Retry(why) => eprintln!("{why}; paste again:"),
                    Verdict::Fail(why) => return Err(Failure::Credentials(why)),
                }
            }
        }
    }
}

/// Serves the loopback redirect with axum until `stop`: a GET to `path` is handed to the login
/// as a [`Callback`] and answered with its verdict; anything else is a 404. Connections are
/// served concurrently, so an idle or slow one never holds up the browser's.
async fn serve_callbacks(
    listener: TcpListener,
    path: String,
    callbacks: mpsc::Sender<Callback>,
    stop: oneshot::Receiver<()>,
) {
    // One fallback handler rather than a route: the redirect URI's path is taken literally,
    // whatever characters axum's route syntax would give a meaning to.
    let app = axum::Router::new().fallback(move |method: Method, uri: axum::http::Uri| {
        let callbacks = callbacks.clone();
        let expected = path.clone();
        async move {
            if method != Method::GET || uri.path() != expected {
                return page(StatusCode::NOT_FOUND, "Not found.");
            }
            let params: Vec<(String, String)> =
                url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let (reply, answer) = oneshot::channel();
            if callbacks.send(Callback { params, reply }).await.is_err() {
                return page(StatusCode::GONE, "This login is over.");
            }
            match answer.await {
                Ok((status, message)) => page(status, &message),
                Err(_) => page(StatusCode::GONE, "This login is over."),
            }
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the loopback listener for the login's redirect failed");
    }
}

/// Lines from stdin, read on a plain thread: a tokio blocking read would keep the runtime
/// from shutting down once the login is over.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A small HTML page for the browser, never cached.
fn page(status: StatusCode, message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>bynder-usage-sync</title></head>\
         <body><p>{}</p></body></html>",
        message
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    );
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        axum::response::Html(body),
    )
        .into_response()
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

    #[test]
    fn a_user_is_described_by_name_email_and_ids() {
        let user = serde_json::json!({
            "id": "U1", "username": "robot", "email": "r@example.com",
            "firstname": "Sync", "infix": "", "lastname": "Robot", "profileId": "P1"
        });
        assert_eq!(
            describe_user(&user),
            "Sync Robot <r@example.com> (username robot, user id U1, profile P1)"
        );
    }
}

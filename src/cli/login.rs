//! `auth login` (OAuth 2 authorization code + PKCE) and `auth oauth1-login` (the OAuth 1.0a
//! temporary-token handshake): the one-time logins that store credentials in the state database.
//!
//! Owns their terminal and browser interaction: the loopback axum server that receives the
//! browser's redirect and a code pasted on stdin. The protocol itself is `auth`'s. Secrets are
//! never taken as arguments: a pasted authorization code is read from stdin.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use url::Url;

use super::{Exit, Failure};
use crate::auth::{OAuth1Login, OAuth2Login};
use crate::config::{AuthSettings, Config, ConfigError};
use crate::gate::Gate;
use crate::store::{open_store, OpenMode};

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
    let database = store.describe();
    store.close().await;
    println!(
        "Logged in: the refresh token is stored in {database}. Granted scopes: {}",
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
    let database = store.describe();
    store.close().await;
    println!(
        "Logged in: the OAuth 1.0a token pair is stored in {database}. It expires on {}; `status` warns a week \
         before: run `bynder-usage-sync auth oauth1-login` again then.",
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

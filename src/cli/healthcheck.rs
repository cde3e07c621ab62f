//! `healthcheck`: asks a running daemon's `/healthz` (or `/readyz`), so a container
//! `HEALTHCHECK` needs no other tool.

use std::time::Duration;

/// `healthcheck`: asks a running daemon's `path` on `listen` (loopback when it listens on every
/// interface). `Ok` on 200; the error says what answered instead.
pub async fn probe(listen: std::net::SocketAddr, path: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut address = listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{address}{path}");
    // The daemon is on this host's (or container's) loopback: a proxy from HTTP_PROXY or
    // ALL_PROXY could not reach it, and would turn a healthy container unhealthy.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let response = client.get(&url).send().await.with_context(|| {
        format!("no answer from {url}: is `bynder-usage-sync run` running with this server.listen?")
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {}",
        body.trim()
    );
    Ok(())
}

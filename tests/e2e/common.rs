//! The `spawn_app` of this suite: a simulated portal, a temp folder with a config file and a
//! migrated state database, and helpers to run the binary and read both sides.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

use bynder_usage_sync::simulator::{Options, Simulator, Usage};
use sqlx::SqlitePool;

pub const INTEGRATION: &str = "0191a303-9d99-433e-ada4-d244f37e1d7d";
pub const OTHER_INTEGRATION: &str = "b242c16d-70f4-4101-8df5-87b35bbe56f0";
pub const TOKEN: &str = "e2e-permanent-token-5ecr3t";

/// A Bynder-like asset id for test number `n`.
pub fn asset(n: u32) -> String {
    format!("C078E8EE-C13A-4DA5-86EC8D6F3353{n:04X}")
}

pub fn page(n: u32) -> String {
    format!("https://cms.example/pages/{n}")
}

/// How the app's config is written.
pub struct Setup {
    pub portal: Options,
    /// The `[auth]` section's body.
    pub auth: String,
    /// The `[sync]` section's body.
    pub sync: String,
    /// More sections, appended verbatim.
    pub extra: String,
    /// Replaces the `[retry]` section's body.
    pub retry: String,
    /// Replaces the `[limits]` section's body.
    pub limits: String,
    /// `bynder.timeout`
    pub timeout: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            portal: Options {
                permanent_tokens: vec![TOKEN.to_owned()],
                ..Options::default()
            },
            auth: format!("method = \"permanent_token\"\npermanent_token = \"{TOKEN}\""),
            sync: String::new(),
            extra: String::new(),
            retry: "initial_backoff = \"10ms\"\nmax_backoff = \"100ms\"\nmax_attempts = 5"
                .to_owned(),
            limits: "requests_per_second = 1000\nblock_pause = \"1s\"".to_owned(),
            timeout: "2s".to_owned(),
        }
    }
}

pub struct App {
    pub dir: tempfile::TempDir,
    pub portal: Simulator,
    pub config_path: PathBuf,
    pub db_path: PathBuf,
    pub pool: SqlitePool,
}

/// Starts a portal and writes a config pointing at it; the database is migrated by the binary.
pub async fn spawn_app() -> App {
    spawn_app_with(Setup::default()).await
}

pub async fn spawn_app_with(setup: Setup) -> App {
    let portal = Simulator::start(setup.portal)
        .await
        .expect("start the simulated portal");
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    let db_path = dir.path().join("state.db");
    let config = format!(
        "[bynder]\nbase_url = \"{}\"\nintegration_id = \"{INTEGRATION}\"\nallow_insecure_http = true\ntimeout = \"{}\"\n\
         [auth]\n{}\n[database]\npath = \"state.db\"\n[sync]\n{}\n[retry]\n{}\n[limits]\n{}\n{}\n",
        portal.base_url(),
        setup.timeout,
        setup.auth,
        setup.sync,
        setup.retry,
        setup.limits,
        setup.extra
    );
    std::fs::write(&config_path, config).unwrap();
    let app = App {
        pool: SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
        dir,
        portal,
        config_path,
        db_path,
    };
    let out = app.run(&["migrate"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "migrate failed: {}",
        stderr(&out)
    );
    let pool = SqlitePool::connect(&format!("sqlite://{}", app.db_path.display()))
        .await
        .unwrap();
    App { pool, ..app }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The binary under test, with no inherited configuration (nor OpenTelemetry setting) from the
/// environment.
pub fn binary() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bynder-usage-sync"));
    for (key, _) in std::env::vars() {
        if key.starts_with("BYNDER_USAGE_SYNC_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.kill_on_drop(true);
    cmd
}

impl App {
    /// Runs the binary with this app's config.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[]).await
    }

    pub async fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = binary();
        cmd.arg("--config").arg(&self.config_path).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().await.expect("run the binary")
    }

    /// Runs `resync` and asserts its exit code.
    pub async fn resync_expecting(&self, code: i32) -> Output {
        let out = self.run(&["resync"]).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            stdout(&out),
            stderr(&out)
        );
        out
    }

    pub async fn insert(&self, asset_id: &str, uri: &str, additional: Option<&str>) {
        sqlx::query(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, ?)",
        )
        .bind(asset_id)
        .bind(uri)
        .bind(additional)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// The CMS table as (asset, uri, additional) sorted.
    pub async fn desired(&self) -> Vec<(String, String, String)> {
        sqlx::query_as("SELECT asset_id, uri, coalesce(additional, '') FROM cms_asset_references WHERE typeof(asset_id) = 'text' AND typeof(uri) = 'text' ORDER BY 1, 2")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Our integration's usages in the portal as (asset, uri, additional) sorted, duplicates kept.
    pub fn ours(&self) -> Vec<(String, String, String)> {
        let mut v: Vec<_> = self
            .portal
            .usages_for(INTEGRATION)
            .into_iter()
            .map(|u| (u.asset_id, u.uri, u.additional))
            .collect();
        v.sort();
        v
    }

    pub fn others(&self) -> Vec<Usage> {
        self.portal
            .usages()
            .into_iter()
            .filter(|u| u.integration_id != INTEGRATION)
            .collect()
    }

    /// Asserts the portal holds exactly the CMS table for our integration, with no duplicate.
    pub async fn assert_converged(&self) {
        assert_eq!(
            self.ours(),
            self.desired().await,
            "the portal must hold exactly the CMS rows"
        );
    }
}

/// Runs the `openssl` command in `dir`; the tests that need TLS servers make their certificates
/// with it.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("this test needs the openssl command: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS server on a free loopback port serving `cert` and `key` (files in `dir`): `openssl
/// s_server -www` answers every request with 200 and a status page. Returns the port and the
/// process, which is killed when dropped.
pub async fn openssl_s_server(
    dir: &std::path::Path,
    cert: &str,
    key: &str,
) -> (u16, tokio::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = tokio::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            cert,
            "-key",
            key,
            "-www",
            "-quiet",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start openssl s_server");
    // s_server offers no readiness signal through a pipe: wait until it accepts connections.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "openssl s_server did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (port, server)
}

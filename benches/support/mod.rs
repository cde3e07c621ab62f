//! What both benchmark binaries share: the portal's credentials, the binary under test, the
//! asset ids, and a workspace (a config pointing at a simulated portal, a migrated database).
// Each benchmark binary uses only part of what is here.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use bynder_usage_sync::simulator::Simulator;

pub const TOKEN: &str = "bench-token";
pub const INTEGRATION: &str = "0191a303-9d99-433e-ada4-d244f37e1d7d";
pub const BINARY: &str = env!("CARGO_BIN_EXE_bynder-usage-sync");

/// Reference `i`'s asset: seven references per asset (the pairs stay unique as long as the uri
/// count is at least seven).
pub fn asset(i: u64) -> String {
    format!("{:08X}-C13A-4DA5-86EC{:012X}", i / 7, i / 7)
}

/// A temporary folder with the config and the state database; removed when dropped.
pub struct Workspace {
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
}

/// A config for `portal` (with `extra` sections appended) and a migrated database.
pub fn workspace(portal: &Simulator, extra: &str) -> Workspace {
    workspace_on(portal, extra, "path = \"state.db\"")
}

/// [`workspace`] with `database` as the `[database]` section's body (a `url`, say).
pub fn workspace_on(portal: &Simulator, extra: &str, database: &str) -> Workspace {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let db = dir.path().join("state.db");
    std::fs::write(
        &config,
        format!(
            "[bynder]\nbase_url = \"{}\"\nintegration_id = \"{INTEGRATION}\"\nallow_insecure_http = true\n\
             [auth]\npermanent_token = \"{TOKEN}\"\n[database]\n{database}\n[log]\nlevel = \"warn\"\n{extra}\n",
            portal.base_url()
        ),
    )
    .unwrap();
    let status = Command::new(BINARY)
        .arg("--config")
        .arg(&config)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(status.status.success());
    Workspace {
        _dir: dir,
        config,
        db,
    }
}

/// A throwaway PostgreSQL cluster in a temporary folder (Debian's `postgresql` package; run as
/// root, it runs the server as the `postgres` user), listening on a free loopback port with trust
/// authentication, stopped and removed when dropped. `None` when the server is not installed.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub fn start() -> Option<PgCluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|v| Some(v.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .max()?;
        let dir = tempfile::Builder::new()
            .prefix("bench-pg-")
            .tempdir()
            .ok()?;
        let as_postgres = |program: &str| {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(bin.join(program));
            cmd
        };
        Command::new("chown")
            .arg("postgres:")
            .arg(dir.path())
            .status()
            .ok()?;
        let data = dir.path().join("data");
        let ok = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth=trust",
            ])
            .output()
            .ok()?
            .status
            .success();
        assert!(ok, "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        // Durable as in production (fsync on): the figures include the server's commits.
        let ok = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {}",
                dir.path().display()
            ))
            .args(["-w", "start"])
            .output()
            .ok()?
            .status
            .success();
        assert!(ok, "pg_ctl start failed");
        Some(PgCluster { dir, bin, port })
    }

    /// Creates `database` and returns its url.
    pub fn database(&self, database: &str) -> String {
        let ok = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                database,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "createdb failed");
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

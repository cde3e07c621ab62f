//! What both benchmark binaries share: the portal's credentials, the binary under test, the
//! asset ids, and a workspace (a config pointing at a simulated portal, a migrated database).

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
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let db = dir.path().join("state.db");
    std::fs::write(
        &config,
        format!(
            "[bynder]\nbase_url = \"{}\"\nintegration_id = \"{INTEGRATION}\"\nallow_insecure_http = true\n\
             [auth]\npermanent_token = \"{TOKEN}\"\n[database]\npath = \"state.db\"\n[log]\nlevel = \"warn\"\n{extra}\n",
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

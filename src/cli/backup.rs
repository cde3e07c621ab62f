//! `backup PATH`: a consistent, private, checked copy of the live state database.

use super::{Exit, Failure};
use crate::config::Config;
use crate::store::{inspect_copy, open_store, CopyCheck, OpenMode};

/// `backup PATH`: a consistent copy of the state database, checked before it is called done.
pub async fn backup(config: Config, path: &std::path::Path) -> Result<Exit, Failure> {
    if path.exists() {
        return Err(Failure::Usage(format!(
            "{} already exists; a backup never overwrites a file. Fix: give a new file name",
            path.display()
        )));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Failure::Usage(format!(
                "the folder {} does not exist. Fix: create it, or give a path in an existing folder",
                parent.display()
            )));
        }
    }
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let mode = crate::files::Modes::new(config.database.group_shared).file;
    let copied = store.copy_to(path, mode).await;
    store.close().await;
    copied.map_err(|e| {
        let _ = std::fs::remove_file(path);
        Failure::Unexpected(anyhow::anyhow!(
            "the backup to {} failed: {e}. Fix: check that folder's free space and permissions",
            path.display()
        ))
    })?;
    let CopyCheck {
        integrity,
        cms_rows: rows,
    } = inspect_copy(path).await?;
    if integrity != "ok" {
        return Err(Failure::Unexpected(anyhow::anyhow!(
            "the backup {} does not pass SQLite's integrity check ({integrity}); do not rely on it",
            path.display()
        )));
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "backed up {} to {} ({size} bytes, {rows} CMS row(s), integrity ok). To restore: stop the \
         daemon, copy the backup over database.path and delete the -wal and -shm files beside it",
        config.database.path.display(),
        path.display()
    );
    Ok(Exit::Ok)
}

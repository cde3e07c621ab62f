//! The daemon's own files beside the state database: who may read them, and the run lock.
//!
//! The state database holds stored refresh tokens and OAuth 1 token pairs in clear text, so its
//! folder, the database, its `-wal` and `-shm` files and the run lock are private to the daemon's
//! user (folders 0700, files 0600) whatever the umask; with `database.group_shared` they are shared
//! with the group instead (folders 2770, files 0660), for a CMS that writes `cms_asset_references`
//! as another user of that group. Files that already exist keep their mode; a warning says when
//! other users can read them.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The modes new state files and folders get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub folder: u32,
    pub file: u32,
}

impl Modes {
    pub fn new(group_shared: bool) -> Modes {
        if group_shared {
            Modes {
                folder: 0o2770,
                file: 0o660,
            }
        } else {
            Modes {
                folder: 0o700,
                file: 0o600,
            }
        }
    }
}

/// Creates the missing folders of `folder` with `modes.folder`, whatever the umask. Folders that
/// already exist are left alone (the parent may be `/tmp` or a home folder).
pub fn create_folders(folder: &Path, modes: Modes) -> std::io::Result<()> {
    let missing: Vec<&Path> = folder
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .take_while(|p| !p.exists())
        .collect();
    for path in missing.into_iter().rev() {
        match std::fs::create_dir(path) {
            Ok(()) => set_mode(path, modes.folder)?,
            // Another process created it between the check and here: theirs to keep.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `path` empty with `mode` (whatever the umask) unless it exists. SQLite gives the
/// `-wal` and `-shm` files it creates later the database file's own mode.
pub fn create_file(path: &Path, mode: u32) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    match options.open(path) {
        Ok(_) => set_mode(path, mode),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

/// The files that hold state beside the database, including the database itself.
pub fn state_files(database: &Path) -> [PathBuf; 4] {
    let with = |suffix: &str| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [
        database.to_path_buf(),
        with("-wal"),
        with("-shm"),
        with(".lock"),
    ]
}

/// One warning per existing state file that users outside the daemon's own user (and group,
/// when shared) can read or write. (A folder others may list is no leak while its files are
/// private, and a shared parent such as `/tmp` is like that by design.)
pub fn exposure_warnings(database: &Path, group_shared: bool) -> Vec<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let forbidden = if group_shared { 0o007 } else { 0o077 };
        let file_fix = if group_shared { "660" } else { "600" };
        let mut warnings = Vec::new();
        for path in state_files(database) {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mode = meta.permissions().mode() & 0o7777;
            if mode & forbidden != 0 {
                warnings.push(format!(
                    "the state file {} has mode {mode:04o}, so other users can read it, and it holds \
                     stored tokens. Fix: `chmod {file_fix} {}`{}",
                    path.display(),
                    path.display(),
                    if group_shared {
                        ""
                    } else {
                        " (or set database.group_shared = true when the CMS shares it as a group)"
                    }
                ));
            }
        }
        warnings
    }
    #[cfg(not(unix))]
    {
        let _ = (database, group_shared);
        Vec::new()
    }
}

/// Another process held the run lock for longer than `database.lock_timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "another process has been sending for this state database for longer than \
     database.lock_timeout ({}): the run lock {} is held{}. Fix: wait for it to finish and run \
     again, stop it, or raise database.lock_timeout",
    humantime::format_duration(*.waited),
    .lock,
    .holder.as_deref().map(|h| format!(" by {h}")).unwrap_or_default()
)]
pub struct LockTimeout {
    /// The lock: its file, or the database it is an advisory lock on.
    pub lock: String,
    pub waited: Duration,
    pub holder: Option<String>,
}

/// Why the run lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Timeout(#[from] LockTimeout),
    #[error("cannot take the run lock {}: {source}. Fix: check the state folder's owner and permissions", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot take the run lock on the state database {database}: {source}. Fix: check that the PostgreSQL server is up and database.url is right")]
    Database {
        database: String,
        source: sqlx::Error,
    },
}

/// Only one run sends at a time per state database: an OS file lock beside it, released by the
/// kernel when the process dies, so a crash never leaves a stale lock. The holder writes its
/// process id and command into the file, so a waiting run can name it.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Waits at most `timeout` for the lock. `what` names this run for a waiting process
    /// (`resync`, `run`…).
    pub async fn acquire(
        database: &Path,
        modes: Modes,
        timeout: Duration,
        what: &str,
    ) -> Result<FileLock, LockError> {
        let path = state_files(database)[3].clone();
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        create_file(&path, modes.file).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let started = Instant::now();
        let mut told = false;
        // Polled rather than a blocking `lock()`: a waiting task stays cancellable (the daemon's
        // shutdown must not hang behind a manual resync) and the wait stays bounded.
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let note = format!(
                        "process {} ({what}) since {}\n",
                        std::process::id(),
                        crate::model::now_text()
                    );
                    // Best effort: the note only helps a waiting process name the holder.
                    let _ = file
                        .set_len(0)
                        .and_then(|()| file.rewind())
                        .and_then(|()| file.write_all(note.as_bytes()));
                    return Ok(FileLock { _file: file });
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    if started.elapsed() >= timeout {
                        return Err(LockTimeout {
                            lock: path.display().to_string(),
                            waited: timeout,
                            holder: holder(&mut file),
                        }
                        .into());
                    }
                    if !told {
                        tracing::info!(
                            lock = %path.display(),
                            holder = holder(&mut file).as_deref().unwrap_or("unknown"),
                            "another run is sending for this database; waiting for it to finish"
                        );
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}

/// What the lock's holder wrote about itself, when it wrote anything sensible.
fn holder(file: &mut std::fs::File) -> Option<String> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(200).read_to_string(&mut text).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty() && line.chars().all(|c| !c.is_control())).then(|| line.to_owned())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_folders_and_files_get_the_modes_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b");
        create_folders(&deep, Modes::new(false)).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&deep), 0o700);
        let file = deep.join("state.db");
        create_file(&file, 0o600).unwrap();
        assert_eq!(mode(&file), 0o600);
        // An existing file keeps its mode, and is reported.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_file(&file, 0o600).unwrap();
        assert_eq!(mode(&file), 0o644);
        let warnings = exposure_warnings(&file, false);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("chmod 600"), "{warnings:?}");
        // Group-readable is what group_shared asks for: no warning then.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(exposure_warnings(&file, true).is_empty());
        assert_eq!(exposure_warnings(&file, false).len(), 1);

        let shared = dir.path().join("shared");
        create_folders(&shared, Modes::new(true)).unwrap();
        assert_eq!(mode(&shared), 0o2770);
    }

    #[tokio::test]
    async fn a_held_lock_is_waited_for_only_as_long_as_allowed_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let held = FileLock::acquire(&db, Modes::new(false), Duration::from_secs(1), "resync")
            .await
            .unwrap();
        assert_eq!(mode(&dir.path().join("state.db.lock")), 0o600);
        let err = FileLock::acquire(&db, Modes::new(false), Duration::from_millis(300), "run")
            .await
            .err()
            .expect("the second run must give up");
        let text = err.to_string();
        assert!(matches!(err, LockError::Timeout(_)), "{text}");
        assert!(
            text.contains(&format!("process {} (resync)", std::process::id())),
            "{text}"
        );
        assert!(text.contains("database.lock_timeout"), "{text}");
        drop(held);
        FileLock::acquire(&db, Modes::new(false), Duration::from_millis(300), "run")
            .await
            .expect("free once the holder is gone");
    }
}

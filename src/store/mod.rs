//! The state database: the CMS-facing table, the recorded state, the queue and run history, in
//! a SQLite file (`database.path`) or a PostgreSQL database (`database.url`), see [`db`].
//! Every SQL statement of the daemon is here: this file holds the state database's own, beside it
//! the change log and the record of the last full pass (`changes`), the CMS table's (`cms`), the
//! status page's reads (`status`) and the CMS source's read-only connection (`source`). Nothing
//! outside the store sees a pool.
//!
//! Opened one way only ([`open_store`]). SQLite: WAL, `synchronous = NORMAL`, a busy timeout, so
//! the CMS can write `cms_asset_references` while the daemon runs without either side seeing
//! "database is locked". One function per query; callers own transactions.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqlitePool};

use crate::config::DatabaseSettings;
use crate::model::SyncUsage;
use crate::model::{AssetId, RawRow, SkipReason, UsageUri};
use crate::plan::{Queued, Target};
use crate::queue::next::Next;

pub mod changes;
mod cms;
pub(crate) mod db;
pub mod lock;
pub mod source;
mod status;
#[cfg(test)]
mod tests;

pub use self::cms::CmsRow;
pub use self::status::{FoundCmsRow, FoundOperation, FoundRecorded};

use self::db::{on_pool, on_tx, Db, Tx};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Problems with the state database. Each names the database as [`Store::describe`] does (a
/// file's path, or a server's url without its password).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state database {0} does not exist. Fix: run `bynder-usage-sync migrate` once to create it (or check database.path)")]
    Missing(String),
    #[error("the state database {0} has no table cms_asset_references. Fix: run `bynder-usage-sync migrate` (or check that database.path or database.url names the right database)")]
    NotMigrated(String),
    #[error("the state database {0} has a table cms_asset_references, but `migrate` was never run on it (perhaps the CMS created the table itself), so the daemon's own tables are missing. Fix: run `bynder-usage-sync migrate` once; it keeps the CMS's rows")]
    MigrationsNotRun(String),
    #[error("cannot open the state database {path}: {source}. Fix: check database.path, its folder's permissions and free disk space")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot connect to the state database {url}: {cause}. Fix: check database.url (host, port, user, database name), the password in database.password_file, and that the server runs and accepts connections from this host")]
    Connect { url: String, cause: sqlx::Error },
    #[error("the state database {url} cannot be used: {reason}. Fix: {fix}")]
    Unsupported {
        url: String,
        reason: String,
        fix: &'static str,
    },
    #[error("migrating the state database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state database error: {0}")]
    Sqlx(#[from] sqlx::Error),
}

/// Whether opening may create the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file and schema if missing (`migrate`, `demo`).
    Create,
    /// The database must exist with its schema (everything else): a wrong `database.path` must
    /// not silently yield an empty CMS table, which would plan to delete every usage.
    Existing,
}

/// The opened state database.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// One connection of its own for health checks: however busy the pool is (searches, a big
    /// reconcile), readiness is answered from the database within its time limit.
    probe: Db,
    location: Location,
}

/// Where the state database is.
#[derive(Clone, Debug)]
pub enum Location {
    /// A SQLite file (`database.path`).
    File(PathBuf),
    /// A PostgreSQL database (`database.url`), its url without the password.
    Server(String),
}

/// An operation as stored in the queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    pub id: i64,
    pub asset_id: AssetId,
    pub uri: UsageUri,
    pub target: Target,
    pub state: OperationState,
    pub uncertain: bool,
    pub attempts: i64,
    pub run_attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Where an operation stands in the queue (the `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Waiting to be sent (or retried) when due.
    Pending,
    /// Claimed by a worker; its answer has not been recorded yet.
    InFlight,
    /// A dead letter: Bynder refused it for good; sent again only when its CMS row changes or
    /// on `queue retry`.
    Dead,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Pending => "pending",
            OperationState::InFlight => "in_flight",
            OperationState::Dead => "dead",
        }
    }
}

impl std::str::FromStr for OperationState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(OperationState::Pending),
            "in_flight" => Ok(OperationState::InFlight),
            "dead" => Ok(OperationState::Dead),
            other => Err(format!("unknown operation state {other:?}")),
        }
    }
}

// Stored as its text in either engine.
impl<DB: sqlx::Database> sqlx::Type<DB> for OperationState
where
    String: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <String as sqlx::Type<DB>>::type_info()
    }
    fn compatible(ty: &DB::TypeInfo) -> bool {
        <String as sqlx::Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for OperationState
where
    String: sqlx::Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(<String as sqlx::Decode<'r, DB>>::decode(value)?.parse()?)
    }
}

impl std::fmt::Display for OperationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finished or running reconcile.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct RunRecord {
    pub id: i64,
    pub command: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: Option<String>,
    pub creates: i64,
    pub updates: i64,
    pub deletes: i64,
    pub skipped_rows: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub requests: i64,
    pub message: Option<String>,
}

/// Counts for a run's record.
#[derive(Debug, Clone, Default)]
pub struct RunCounts {
    pub creates: i64,
    pub updates: i64,
    pub deletes: i64,
    pub skipped_rows: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub requests: i64,
}

/// Queue totals for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueSummary {
    pub pending: i64,
    pub in_flight: i64,
    pub dead: i64,
    pub oldest_pending_at: Option<String>,
}

pub use crate::model::{format_time, now_text};

/// The tables a PostgreSQL snapshot copies: every one the daemon reads or writes.
/// With each, its identity column.
const SNAPSHOT_TABLES: [(&str, Option<&str>); 8] = [
    ("_sqlx_migrations", None),
    ("cms_asset_references", None),
    ("cms_changes", Some("seq")),
    ("recorded_usages", None),
    ("operations", Some("id")),
    ("runs", Some("id")),
    ("settings", None),
    ("portal_profile", None),
];

/// What keeps a [`Store::snapshot`] alive: dropping it removes the copy.
pub enum Snapshot {
    Folder(tempfile::TempDir),
    Schema {
        pool: sqlx::PgPool,
        schema: String,
        /// Holds the copy's advisory lock for as long as the copy is in use: a copy whose lock
        /// is free was left behind by a process that died, and the next what-if drops it.
        _in_use: lock::CopyInUse,
    },
}

impl Snapshot {
    /// Removes the copy now (dropping the guard removes it too, but only eventually).
    pub async fn discard(mut self) {
        if let Snapshot::Schema { pool, schema, .. } = &mut self {
            let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&*pool).await {
                tracing::warn!(error = %e, "could not drop the what-if copy of the state database");
            }
            schema.clear();
        }
    }
}

/// The name every what-if copy's schema starts with.
const WHAT_IF_PREFIX: &str = "bynder_usage_sync_what_if_";

/// Drops the what-if copies no live process uses: a dry run killed (or cut off) mid-way left
/// them, each a full copy of the state's tables.
async fn drop_abandoned_copies(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let copies: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY nspname",
    )
    .bind(WHAT_IF_PREFIX)
    .fetch_all(pool)
    .await?;
    for schema in copies {
        // Only our own names reach the statement below (a schema name is not a bind parameter).
        if !schema[WHAT_IF_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        let Some(abandoned) = lock::CopyInUse::try_take(pool, &schema).await? else {
            continue;
        };
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
        drop(abandoned);
        tracing::info!(
            schema,
            "dropped a what-if copy of the state database that a dry run which did not finish left behind"
        );
    }
    Ok(())
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Snapshot::Schema { pool, schema, .. } = self {
            if schema.is_empty() {
                return;
            }
            let (pool, sql) = (
                pool.clone(),
                format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            );
            // Best effort, off the dropping task: a copy left behind only takes space, and its
            // name says what it is.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await {
                        tracing::warn!(error = %e, "could not drop the what-if copy of the state database");
                    }
                });
            }
        }
    }
}

/// Whether `db` has a table of that name (in PostgreSQL: on the search path).
async fn has_table(db: &Db, name: &str) -> Result<bool, sqlx::Error> {
    on_pool!(db, |pool, pg| {
        sqlx::query_scalar(if pg {
            "SELECT to_regclass($1) IS NOT NULL"
        } else {
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = $1"
        })
        .bind(name)
        .fetch_one(pool)
        .await
    })
}

/// Opens the state database with the one set of connection options the project uses.
pub async fn open_store(settings: &DatabaseSettings, mode: OpenMode) -> Result<Store, StoreError> {
    if let Some(url) = &settings.url {
        return open_postgres(settings, url, mode).await;
    }
    let path = settings.path.clone();
    let shown = path.display().to_string();
    if mode == OpenMode::Existing && !path.exists() {
        return Err(StoreError::Missing(shown));
    }
    let open_error = |source: sqlx::Error| StoreError::Open {
        path: shown.clone(),
        source,
    };
    // SQLite silently opens a file it may not write read-only, and the first write then fails
    // deep inside a run with "attempt to write a readonly database". Every command that opens
    // the store writes sooner or later, so say so up front, the way SQLite would decide it.
    if path.exists() {
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&path) {
            let read_only = std::io::Error::new(
                e.kind(),
                format!("the file is read-only for this process ({e})"),
            );
            return Err(open_error(read_only.into()));
        }
    }
    let modes = crate::files::Modes::new(settings.group_shared);
    if mode == OpenMode::Create {
        let created = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => crate::files::create_folders(parent, modes),
            None => Ok(()),
        };
        created
            .and_then(|()| crate::files::create_file(&path, modes.file))
            .map_err(|e| open_error(e.into()))?;
    }
    for warning in crate::files::exposure_warnings(&path, settings.group_shared) {
        tracing::warn!("{warning}");
    }
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(open_error)?
        .filename(&path)
        .create_if_missing(mode == OpenMode::Create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(settings.busy_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(settings.busy_timeout + std::time::Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .map_err(open_error)?;
    // Opened on first use, so commands that never check health never open it.
    let probe = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(settings.busy_timeout + std::time::Duration::from_secs(5))
        .connect_lazy_with(options.create_if_missing(false));
    let store = Store {
        db: Db::Sqlite(pool),
        probe: Db::Sqlite(probe),
        location: Location::File(path),
    };
    store.finish_opening(mode).await?;
    Ok(store)
}

/// The connection options of a PostgreSQL state database: its url, the password apart, a name
/// the server's activity view shows, and the server's side of TCP keep-alive short enough that a
/// lost machine's session (and the locks it holds) ends within seconds, not hours.
pub fn postgres_options(url: &crate::config::ServerUrl) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options = PgConnectOptions::from_url(&url.url)?
        .application_name("bynder-usage-sync")
        .options([
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
            // The idempotent statements `migrate` repeats at every start are not news.
            ("client_min_messages", "warning"),
        ]);
    if let Some(p) = &url.password {
        use secrecy::ExposeSecret as _;
        options = options.password(p.expose_secret());
    }
    Ok(options)
}

/// Opens a PostgreSQL state database (`database.url`). `migrate` creates the schema, the CMS
/// table included; the database itself must exist (as with any server, its owner creates it).
async fn open_postgres(
    settings: &DatabaseSettings,
    url: &crate::config::ServerUrl,
    mode: OpenMode,
) -> Result<Store, StoreError> {
    let shown = url.display();
    let connect_error = |cause: sqlx::Error| StoreError::Connect {
        url: shown.clone(),
        cause,
    };
    let options = postgres_options(url).map_err(connect_error)?;
    let acquire = settings.busy_timeout + std::time::Duration::from_secs(5);
    // One connection first: a refused connection or a wrong password is one clear error at
    // once, not a pool's retries until its timeout.
    let first = tokio::time::timeout(acquire, options.connect())
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {acquire:?}"),
            )))
        })
        .map_err(connect_error)?;
    let _ = sqlx::Connection::close(first).await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(acquire)
        .connect_with(options.clone())
        .await
        .map_err(connect_error)?;
    let probe = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(acquire)
        .connect_lazy_with(options);
    let store = Store {
        db: Db::Postgres(pool),
        probe: Db::Postgres(probe),
        location: Location::Server(shown),
    };
    store.finish_opening(mode).await?;
    Ok(store)
}

/// What a backup copy holds: SQLite's integrity check ("ok" when sound) and its CMS rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyCheck {
    pub integrity: String,
    pub cms_rows: i64,
}

/// Opens a copy made by [`Store::copy_to`] read-only and checks it.
pub async fn inspect_copy(path: &Path) -> Result<CopyCheck, sqlx::Error> {
    let copy = SqlitePool::connect_with(SqliteConnectOptions::new().filename(path).read_only(true))
        .await?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&copy)
        .await?;
    let cms_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cms_asset_references")
        .fetch_one(&copy)
        .await?;
    copy.close().await;
    Ok(CopyCheck {
        integrity,
        cms_rows,
    })
}

impl Store {
    /// The state database for messages: a file's path, or a server's url without its password.
    pub fn describe(&self) -> String {
        match &self.location {
            Location::File(path) => path.display().to_string(),
            Location::Server(url) => url.clone(),
        }
    }

    /// The SQLite file, when the state database is one.
    pub fn file(&self) -> Option<&Path> {
        match &self.location {
            Location::File(path) => Some(path),
            Location::Server(_) => None,
        }
    }

    /// The SQLite pool, for tests that look under the store.
    #[cfg(test)]
    pub(crate) fn test_pool(&self) -> &SqlitePool {
        match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(_) => panic!("a SQLite store"),
        }
    }

    /// Whether the state database is a PostgreSQL one (`database.url`).
    pub fn is_postgres(&self) -> bool {
        self.db.is_postgres()
    }

    /// The PostgreSQL pool, for the run lock's and leadership's own sessions.
    pub fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.db {
            Db::Postgres(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }

    async fn finish_opening(&self, mode: OpenMode) -> Result<(), StoreError> {
        match mode {
            OpenMode::Create => self.migrate().await,
            OpenMode::Existing => self.check_schema().await,
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(pool) => MIGRATOR.run(pool).await?,
            Db::Postgres(pool) => PG_MIGRATOR.run(pool).await?,
        }
        changes::install_capture(&self.db).await?;
        Ok(())
    }

    /// Checks an existing database has the schema; applies migrations newer than it (an upgrade).
    async fn check_schema(&self) -> Result<(), StoreError> {
        if !self.has_table("cms_asset_references").await? {
            return Err(StoreError::NotMigrated(self.describe()));
        }
        if !self.has_table("_sqlx_migrations").await? {
            return Err(StoreError::MigrationsNotRun(self.describe()));
        }
        self.migrate().await
    }

    /// Whether the database has a table of that name (in PostgreSQL: on the search path).
    pub(crate) async fn has_table(&self, name: &str) -> Result<bool, sqlx::Error> {
        has_table(&self.db, name).await
    }

    /// A private copy of the state database (removed when the returned guard is dropped):
    /// what-if runs (`resync --verify --dry-run`) repair and plan on it, so they show exactly
    /// what a real run would do while the real state stays untouched. A SQLite file is copied
    /// into a temporary folder; a PostgreSQL database into a schema of its own, dropped after.
    pub async fn snapshot(
        &self,
        settings: &DatabaseSettings,
    ) -> Result<(Snapshot, Store), StoreError> {
        if let Db::Postgres(pool) = &self.db {
            return self.postgres_snapshot(pool, settings).await;
        }
        let folder = tempfile::tempdir().map_err(|e| StoreError::Open {
            path: self.describe(),
            source: e.into(),
        })?;
        let path = folder.path().join("snapshot.db");
        self.copy_to(&path, 0o600).await?;
        let settings = DatabaseSettings {
            path,
            url: None,
            ..settings.clone()
        };
        let store = open_store(&settings, OpenMode::Existing).await?;
        Ok((Snapshot::Folder(folder), store))
    }

    /// [`Store::snapshot`] of a PostgreSQL database: every table copied into a new schema, and a
    /// store whose sessions look only there.
    async fn postgres_snapshot(
        &self,
        pool: &sqlx::PgPool,
        settings: &DatabaseSettings,
    ) -> Result<(Snapshot, Store), StoreError> {
        // Best effort: a copy this role may not drop only takes space, and says what it is.
        if let Err(e) = drop_abandoned_copies(pool).await {
            tracing::warn!(error = %e, "could not drop what-if copies that dry runs which did not finish left behind");
        }
        let schema = format!(
            "{WHAT_IF_PREFIX}{}_{}",
            std::process::id(),
            Utc::now().timestamp_millis()
        );
        let in_use = lock::CopyInUse::take(pool, &schema).await?;
        let mut tx = pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut *tx)
            .await?;
        for (table, identity) in SNAPSHOT_TABLES {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {schema}.{table} (LIKE {table} INCLUDING ALL)"
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {schema}.{table} SELECT * FROM {table}"
            )))
            .execute(&mut *tx)
            .await?;
            // The copy's own sequence carries on after the copied rows.
            if let Some(column) = identity {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{schema}.{table}', '{column}'), \
                         coalesce((SELECT max({column}) FROM {schema}.{table}), 0) + 1, false)"
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        let Some(url) = &settings.url else {
            unreachable!("a PostgreSQL store was opened from database.url")
        };
        let options = postgres_options(url)?.options([("search_path", schema.as_str())]);
        let copy = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        let store = Store {
            db: Db::Postgres(copy),
            probe: Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .connect_lazy_with(options),
            ),
            location: Location::Server(format!("{} (a private copy)", self.describe())),
        };
        Ok((
            Snapshot::Schema {
                pool: pool.clone(),
                schema,
                _in_use: in_use,
            },
            store,
        ))
    }

    /// A consistent copy of the whole SQLite database at `path`, which must not exist, made
    /// while other connections keep reading and writing (`VACUUM INTO`: one read transaction,
    /// WAL content included). The new file gets `mode` whatever the umask.
    pub async fn copy_to(&self, path: &Path, mode: u32) -> Result<(), StoreError> {
        let Db::Sqlite(pool) = &self.db else {
            return Err(StoreError::Unsupported {
                url: self.describe(),
                reason: "`backup` copies a SQLite state file; this one is a PostgreSQL database".into(),
                fix: "back it up with the server's own tools (pg_dump, or the base backups and WAL archive the server already keeps); see docs/operations.md",
            });
        };
        // `create_new`: never overwrite an existing file (VACUUM INTO needs it absent or empty).
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        let created = options.open(path).and_then(|_| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            Ok(())
        });
        created.map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(path.to_string_lossy().into_owned())
            .execute(pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.probe.close().await;
        self.db.close().await;
    }

    // ---- recorded state ---------------------------------------------------------------------

    /// Every recorded usage `(asset_id, uri, additional)` in key order, a page at a time (see
    /// [`prefetched_pages`]). Recorded values were validated before they were stored, so they
    /// hold no ASCII control character but tab, and the unit and record separators can join them.
    pub fn stream_recorded(
        &self,
    ) -> BoxStream<'static, Result<(String, String, String), sqlx::Error>> {
        const FIRST: &str = "SELECT count(*), group_concat(asset_id || char(31) || uri || char(31) || additional, \
                 char(30)) \
             FROM (SELECT asset_id, uri, additional FROM recorded_usages ORDER BY asset_id, uri LIMIT $1)";
        const NEXT: &str = "SELECT count(*), group_concat(asset_id || char(31) || uri || char(31) || additional, \
                 char(30)) \
             FROM (SELECT asset_id, uri, additional FROM recorded_usages WHERE (asset_id, uri) > ($2, $3) \
                   ORDER BY asset_id, uri LIMIT $1)";
        const PG_FIRST: &str = "SELECT count(*), string_agg(asset_id || chr(31) || uri || chr(31) || additional, \
                 chr(30) ORDER BY asset_id, uri) \
             FROM (SELECT asset_id, uri, additional FROM recorded_usages ORDER BY asset_id, uri LIMIT $1) AS page";
        const PG_NEXT: &str = "SELECT count(*), string_agg(asset_id || chr(31) || uri || chr(31) || additional, \
                 chr(30) ORDER BY asset_id, uri) \
             FROM (SELECT asset_id, uri, additional FROM recorded_usages WHERE (asset_id, uri) > ($2, $3) \
                   ORDER BY asset_id, uri LIMIT $1) AS page";
        let db = self.db.clone();
        prefetched_pages(move |cursor: Option<(String, String)>| {
            let db = db.clone();
            Box::pin(async move {
                let (count, joined): (i64, Option<String>) = on_pool!(&db, |pool, pg| {
                    match &cursor {
                        None => {
                            sqlx::query_as(if pg { PG_FIRST } else { FIRST })
                                .bind(PAGE_ROWS)
                                .fetch_one(pool)
                                .await?
                        }
                        Some((asset, uri)) => {
                            sqlx::query_as(if pg { PG_NEXT } else { NEXT })
                                .bind(PAGE_ROWS)
                                .bind(asset.clone())
                                .bind(uri.clone())
                                .fetch_one(pool)
                                .await?
                        }
                    }
                });
                let joined = joined.unwrap_or_default();
                let rows: Vec<(String, String, String)> = joined
                    .split('\u{1e}')
                    .take(count as usize)
                    .map(|r| {
                        let mut f = r.splitn(3, '\u{1f}');
                        let a = f.next().unwrap_or_default().to_owned();
                        let u = f.next().unwrap_or_default().to_owned();
                        let n = f.next().unwrap_or_default().to_owned();
                        (a, u, n)
                    })
                    .collect();
                // Rows are concatenated in the subquery's key order; check it rather than trust it.
                if rows.windows(2).any(|w| {
                    crate::model::key_order((&w[0].0, &w[0].1), (&w[1].0, &w[1].1)).is_ge()
                }) {
                    return Err(sqlx::Error::Protocol(
                        "a page of recorded_usages came out of key order".into(),
                    ));
                }
                let next = if count < PAGE_ROWS {
                    None
                } else {
                    rows.last().map(|(a, u, _)| (a.clone(), u.clone()))
                };
                Ok((rows, next))
            })
        })
    }

    pub async fn recorded_count(&self) -> Result<i64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT count(*) FROM recorded_usages"
        )
        .fetch_one(pool)
        .await)
    }

    pub async fn recorded_additional(
        &self,
        asset_id: &str,
        uri: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT additional FROM recorded_usages WHERE asset_id = $1 AND uri = $2"
        )
        .bind(asset_id)
        .bind(uri)
        .fetch_optional(pool)
        .await)
    }

    // ---- queue ------------------------------------------------------------------------------

    /// Every queued operation's key and target in key order.
    pub fn stream_queued(&self) -> BoxStream<'_, Result<(String, String, Queued), sqlx::Error>> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query(
            "SELECT asset_id, uri, action, additional, state, uncertain FROM operations ORDER BY asset_id, uri"
        )
        .fetch(pool)
        .map_ok(|row| {
            let queued = Queued {
                target: target_from(row.get(2), row.get(3)),
                dead: row.get::<OperationState, _>(4) == OperationState::Dead,
                uncertain: row.get(5),
            };
            (row.get(0), row.get(1), queued)
        })
        .boxed()
        })
    }

    /// Turns any operation left in flight by a crashed process back into a pending, uncertain
    /// one. Only called while holding the run lock, so nobody else is sending it.
    pub async fn recover_in_flight(&self) -> Result<u64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            let done = sqlx::query(
                "UPDATE operations SET state = 'pending', uncertain = TRUE, updated_at = $1 WHERE state = 'in_flight'",
            )
            .bind(now_text())
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })
    }

    /// Claims the next operation due for this run: one the run has not tried yet, or one whose
    /// backoff has passed and whose per-run attempts are not used up.
    pub async fn claim_next(
        &self,
        run_id: i64,
        max_run_attempts: u32,
    ) -> Result<Option<Operation>, sqlx::Error> {
        let now = now_text();
        let row: Option<OperationRow> = on_pool!(&self.db, |pool, pg| {
            sqlx::query_as(
            "UPDATE operations SET state = 'in_flight', \
                 run_attempts = CASE WHEN run_id IS NOT DISTINCT FROM $1 THEN run_attempts ELSE 0 END, \
                 run_id = $1, updated_at = $2 \
             WHERE id = (SELECT id FROM operations WHERE state = 'pending' \
                 AND (run_id IS DISTINCT FROM $1 OR (next_attempt_at <= $2 AND run_attempts < $3)) \
                 ORDER BY next_attempt_at, id LIMIT 1) \
             RETURNING id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                 next_attempt_at, last_error, created_at, updated_at",
        )
        .bind(run_id)
        .bind(&now)
        .bind(max_run_attempts as i64)
        .fetch_optional(pool)
        .await
        })?;
        row.map(operation_from).transpose()
    }

    /// When this run's next retry becomes due, if any operation waits for one.
    pub async fn next_retry_at(
        &self,
        run_id: i64,
        max_run_attempts: u32,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let next: Option<String> = on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT min(next_attempt_at) FROM operations WHERE state = 'pending' \
             AND run_id IS NOT DISTINCT FROM $1 AND run_attempts < $2",
        )
        .bind(run_id)
        .bind(max_run_attempts as i64)
        .fetch_one(pool)
        .await)?;
        Ok(next
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)))
    }

    /// Marks an operation as possibly applied before its request is sent (crash safety).
    pub async fn mark_uncertain(&self, id: i64) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query(
            "UPDATE operations SET uncertain = TRUE WHERE id = $1"
        )
        .bind(id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Bynder confirmed a usage: record it and finish the operation, in one transaction.
    pub async fn complete_upsert(
        &self,
        op: &Operation,
        additional: &str,
        usage_id: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        record_usages(
            &mut tx,
            &[(&op.asset_id, &op.uri, additional, usage_id)],
            &now_text(),
        )
        .await?;
        finish_operations(&mut tx, &[op.id]).await?;
        tx.commit().await
    }

    /// Bynder confirmed no usage of ours remains for the key: forget it and finish the operation.
    pub async fn complete_delete(&self, op: &Operation) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        forget_recorded(&mut tx, &op.asset_id, &op.uri).await?;
        finish_operations(&mut tx, &[op.id]).await?;
        tx.commit().await
    }

    /// The first half of an update went through (the old usage is gone) while the operation goes on.
    pub async fn forget_recorded(&self, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        forget_recorded(&mut tx, asset_id, uri).await?;
        tx.commit().await
    }

    /// Drift repair found exactly one usage of ours in Bynder for the key: record what it holds.
    pub async fn record_observed(
        &self,
        asset_id: &str,
        uri: &str,
        additional: &str,
    ) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query(
            "INSERT INTO recorded_usages (asset_id, uri, additional, usage_id, synced_at) VALUES ($1, $2, $3, NULL, $4) \
             ON CONFLICT (asset_id, uri) DO UPDATE SET additional = excluded.additional, synced_at = excluded.synced_at",
        )
        .bind(asset_id)
        .bind(uri)
        .bind(additional)
        .bind(now_text())
        .execute(pool)
        .await.map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Drift repair found duplicates for the key: forget the recorded usage and queue an uncertain
    /// operation, so whatever is sent next first reads Bynder back and collapses them.
    pub async fn mark_for_read_back(&self, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        forget_recorded(&mut tx, asset_id, uri).await?;
        let now = now_text();
        on_tx!(&mut tx, |conn, pg| {
            sqlx::query(
            "INSERT INTO operations (asset_id, uri, action, additional, state, uncertain, next_attempt_at, created_at, updated_at) \
             VALUES ($1, $2, 'delete', NULL, 'pending', TRUE, $3, $3, $3) \
             ON CONFLICT (asset_id, uri) DO UPDATE SET uncertain = TRUE, \
                 state = CASE WHEN operations.state = 'dead' THEN 'pending' ELSE operations.state END, \
                 updated_at = excluded.updated_at",
        )
        .bind(asset_id)
        .bind(uri)
        .bind(&now)
        .execute(&mut *conn)
        .await.map(|r| r.rows_affected())
        })?;
        tx.commit().await
    }

    /// An attempt failed (or was never made, for a released operation): what `next` says, back
    /// to pending with a due time and `error` as its last error, or a dead letter with its reason.
    pub async fn fail_operation(
        &self,
        id: i64,
        next: &Next,
        error: &str,
    ) -> Result<(), sqlx::Error> {
        let (state, uncertain, at, counts, last_error) = match next {
            Next::Retry {
                at,
                uncertain,
                counts,
            } => (OperationState::Pending, *uncertain, *at, *counts, error),
            Next::Dead { reason } => (
                OperationState::Dead,
                false,
                Utc::now(),
                true,
                reason.as_str(),
            ),
        };
        let step = i64::from(counts);
        on_pool!(&self.db, |pool, pg| {
            sqlx::query(
            "UPDATE operations SET state = $1, uncertain = $2, attempts = attempts + $3, run_attempts = run_attempts + $4, \
                 next_attempt_at = $5, last_error = $6, updated_at = $7 WHERE id = $8",
        )
        .bind(state.as_str())
        .bind(uncertain)
        .bind(step)
        .bind(step)
        .bind(format_time(at))
        .bind(last_error)
        .bind(now_text())
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Every operation, or only dead letters, in queue order.
    pub async fn list_operations(&self, dead_only: bool) -> Result<Vec<Operation>, sqlx::Error> {
        const ALL: &str = "SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                 next_attempt_at, last_error, created_at, updated_at FROM operations ORDER BY id";
        const DEAD: &str = "SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                 next_attempt_at, last_error, created_at, updated_at FROM operations WHERE state = 'dead' ORDER BY id";
        let rows: Vec<OperationRow> =
            on_pool!(&self.db, |pool, pg| sqlx::query_as(if dead_only {
                DEAD
            } else {
                ALL
            })
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(operation_from).collect()
    }

    /// Claims a batch for the sync endpoint: whole uris (every operation queued on them), taken in
    /// queue order until the listing would exceed `batch_size` usages (a single uri may exceed
    /// it alone). A uri with an operation still in flight is skipped: two requests listing the
    /// same uri at once could each undo what the other created. The listing is what Bynder must hold on those uris afterwards: the recorded
    /// usages with the queued targets applied; dead letters leave their key as recorded.
    pub async fn claim_sync_batch(
        &self,
        run_id: i64,
        max_run_attempts: u32,
        batch_size: usize,
    ) -> Result<Option<SyncBatch>, sqlx::Error> {
        let now = now_text();
        // The batch is read and claimed under one write lock, so nothing changes between.
        let mut tx = self.db.begin_immediate().await?;
        let candidates = sync_candidates(&mut tx, run_id, &now, max_run_attempts).await?;
        // The candidates' listings are read a chunk of uris at a time (one query for their
        // recorded usages, one for their pending operations; CROSS JOIN keeps the chunk's uris
        // the outer loop, which SQLite without statistics would not) until the batch is full;
        // then every taken uri's pending operations are claimed in one statement.
        let mut batch = SyncBatch::default();
        'chunks: for chunk in candidates.chunks(CLAIM_CHUNK_URIS) {
            let uris = json_text(chunk);
            // Per uri of the chunk, keyed by the asset id ignoring case (one usage), holding the
            // id to send: a queued target's (as the CMS wrote it last) over the recorded one.
            let mut wanted: Vec<std::collections::BTreeMap<String, (String, String)>> =
                vec![Default::default(); chunk.len()];
            let recorded: Vec<(i64, String, String)> =
                on_tx!(&mut tx, |conn, pg| sqlx::query_as(if pg {
                    "SELECT j.key - 1, r.asset_id, r.additional \
                     FROM json_array_elements_text($1::json) WITH ORDINALITY AS j(value, key) \
                     JOIN recorded_usages AS r ON r.uri = j.value"
                } else {
                    "SELECT j.key, r.asset_id, r.additional FROM json_each($1) AS j \
                     CROSS JOIN recorded_usages AS r ON r.uri = j.value"
                })
                .bind(&uris)
                .fetch_all(&mut *conn)
                .await)?;
            for (i, asset_id, additional) in recorded {
                wanted[i as usize].insert(asset_id.to_ascii_lowercase(), (asset_id, additional));
            }
            let queued: Vec<(i64, String, String, Option<String>)> =
                on_tx!(&mut tx, |conn, pg| sqlx::query_as(if pg {
                    "SELECT j.key - 1, o.asset_id, o.action, o.additional \
                     FROM json_array_elements_text($1::json) WITH ORDINALITY AS j(value, key) \
                     JOIN operations AS o ON o.uri = j.value AND o.state = 'pending'"
                } else {
                    "SELECT j.key, o.asset_id, o.action, o.additional FROM json_each($1) AS j \
                     CROSS JOIN operations AS o ON o.uri = j.value AND o.state = 'pending'"
                })
                .bind(&uris)
                .fetch_all(&mut *conn)
                .await)?;
            for (i, asset_id, action, additional) in queued {
                let folded = asset_id.to_ascii_lowercase();
                let wanted = &mut wanted[i as usize];
                match target_from(action, additional) {
                    Target::Upsert(a) => wanted.insert(folded, (asset_id, a)),
                    Target::Delete => wanted.remove(&folded),
                };
            }
            for (uri, wanted) in chunk.iter().zip(wanted) {
                if !batch.uris.is_empty() && batch.listing.len() + wanted.len() > batch_size {
                    break 'chunks;
                }
                batch
                    .listing
                    .extend(
                        wanted
                            .into_values()
                            .map(|(asset_id, additional)| SyncUsage {
                                asset_id,
                                uri: uri.clone(),
                                additional,
                            }),
                    );
                batch.uris.push(uri.clone());
            }
        }
        if !batch.uris.is_empty() {
            let rows: Vec<OperationRow> = on_tx!(&mut tx, |conn, pg| {
                sqlx::query_as(if pg {
                "UPDATE operations SET state = 'in_flight', \
                     run_attempts = CASE WHEN run_id IS NOT DISTINCT FROM $1 THEN run_attempts ELSE 0 END, \
                     run_id = $1, updated_at = $2 \
                 WHERE state = 'pending' AND uri IN (SELECT json_array_elements_text($3::json)) \
                 RETURNING id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                     next_attempt_at, last_error, created_at, updated_at"
            } else {
                "UPDATE operations SET state = 'in_flight', \
                     run_attempts = CASE WHEN run_id IS NOT DISTINCT FROM $1 THEN run_attempts ELSE 0 END, \
                     run_id = $1, updated_at = $2 \
                 WHERE state = 'pending' AND uri IN (SELECT value FROM json_each($3)) \
                 RETURNING id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                     next_attempt_at, last_error, created_at, updated_at"
            })
            .bind(run_id)
            .bind(&now)
            .bind(json_text(&batch.uris))
            .fetch_all(&mut *conn)
            .await
            })?;
            let mut claimed = rows
                .into_iter()
                .map(operation_from)
                .collect::<Result<Vec<_>, _>>()?;
            // In the batch's uri order, then queue order within a uri (RETURNING has none).
            let position: std::collections::HashMap<&str, usize> = batch
                .uris
                .iter()
                .enumerate()
                .map(|(i, uri)| (uri.as_str(), i))
                .collect();
            claimed.sort_by_key(|op| (position[op.uri.as_str()], op.id));
            batch.ops = claimed;
        }
        if batch.uris.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(batch))
    }

    /// Records what a sync answer confirmed, in one transaction: each operation of the batch by
    /// its [`SyncOpOutcome`] (`outcomes[i]` is `batch.ops[i]`'s); an unsettled one stays in flight
    /// for the caller to settle by a read-back. `rejected_listed` are listed usages that were no
    /// operation of the batch but that Bynder refused: their recorded usage is forgotten.
    pub async fn complete_sync_batch(
        &self,
        batch: &SyncBatch,
        outcomes: &[SyncOpOutcome],
        rejected_listed: &[(String, String)],
    ) -> Result<(), sqlx::Error> {
        let now = now_text();
        let mut tx = self.db.begin_immediate().await?;
        // Set-based, a statement per kind of write: the keys of a batch's operations are
        // distinct, and `rejected_listed` holds none of them, so the order of the kinds does not
        // change the result of writing them one operation at a time.
        let mut forget: Vec<(&str, &str)> = rejected_listed
            .iter()
            .map(|(a, u)| (a.as_str(), u.as_str()))
            .collect();
        let mut record: Vec<(&str, &str, &str, Option<&str>)> = Vec::new();
        let mut finish: Vec<i64> = Vec::new();
        let mut dead: Vec<(i64, String)> = Vec::new();
        for (op, outcome) in batch.ops.iter().zip(outcomes) {
            match outcome {
                SyncOpOutcome::Upserted {
                    additional,
                    usage_id,
                } => {
                    record.push((&op.asset_id, &op.uri, additional, usage_id.as_deref()));
                    finish.push(op.id);
                }
                SyncOpOutcome::Removed => {
                    forget.push((&op.asset_id, &op.uri));
                    finish.push(op.id);
                }
                SyncOpOutcome::Rejected(reason) => {
                    forget.push((&op.asset_id, &op.uri));
                    dead.push((op.id, format!("Bynder rejected the usage: {reason}")));
                }
                SyncOpOutcome::Unsettled => {}
            }
        }
        forget_recorded_all(&mut tx, &forget).await?;
        record_usages(&mut tx, &record, &now).await?;
        finish_operations(&mut tx, &finish).await?;
        if !dead.is_empty() {
            on_tx!(&mut tx, |conn, pg| {
                sqlx::query(if pg {
                "UPDATE operations SET state = 'dead', uncertain = FALSE, attempts = attempts + 1, \
                     last_error = j.value ->> 1, updated_at = $2 \
                 FROM json_array_elements($1::json) AS j WHERE operations.id = (j.value ->> 0)::bigint"
            } else {
                "UPDATE operations SET state = 'dead', uncertain = FALSE, attempts = attempts + 1, \
                     last_error = j.value ->> 1, updated_at = $2 \
                 FROM json_each($1) AS j WHERE operations.id = j.value ->> 0"
            })
            .bind(json_text(&dead))
            .bind(&now)
            .execute(&mut *conn)
            .await.map(|r| r.rows_affected())
            })?;
        }
        tx.commit().await
    }

    /// Puts dead letters back into the queue (all of them, or those with these ids). Returns how
    /// many were re-queued.
    pub async fn retry_dead(&self, ids: Option<&[i64]>) -> Result<u64, sqlx::Error> {
        const ALL: &str = "UPDATE operations SET state = 'pending', attempts = 0, run_attempts = 0, run_id = NULL, \
                   next_attempt_at = $1, updated_at = $1 WHERE state = 'dead'";
        const ONE: &str = "UPDATE operations SET state = 'pending', attempts = 0, run_attempts = 0, run_id = NULL, \
                   next_attempt_at = $1, updated_at = $1 WHERE state = 'dead' AND id = $2";
        let now = now_text();
        match ids {
            None => on_pool!(&self.db, |pool, pg| Ok(sqlx::query(ALL)
                .bind(&now)
                .execute(pool)
                .await?
                .rows_affected())),
            Some(ids) => {
                let mut tx = self.db.begin().await?;
                let mut n = 0;
                for id in ids {
                    n += on_tx!(&mut tx, |conn, pg| sqlx::query(ONE)
                        .bind(&now)
                        .bind(id)
                        .execute(&mut *conn)
                        .await
                        .map(|r| r.rows_affected()))?;
                }
                tx.commit().await?;
                Ok(n)
            }
        }
    }

    /// Of `ids`, those that are not dead letters, each with its state (`None`: no such operation).
    pub async fn not_dead_letters(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Option<OperationState>)>, sqlx::Error> {
        let mut found = Vec::new();
        for &id in ids {
            let state: Option<OperationState> = on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
                "SELECT state FROM operations WHERE id = $1"
            )
            .bind(id)
            .fetch_optional(pool)
            .await)?;
            if state != Some(OperationState::Dead) {
                found.push((id, state));
            }
        }
        Ok(found)
    }

    /// Deletes the dead letters. The last full pass is forgotten with them: a row that still
    /// asks for a purged change must be planned again by the next reconcile, skipped or not.
    pub async fn purge_dead(&self) -> Result<u64, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let purged = on_tx!(&mut tx, |conn, pg| sqlx::query(
            "DELETE FROM operations WHERE state = 'dead'"
        )
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected()))?;
        changes::save_full_pass(&mut tx, None).await?;
        tx.commit().await?;
        Ok(purged)
    }

    pub async fn queue_summary(&self) -> Result<QueueSummary, sqlx::Error> {
        let (pending, in_flight, dead, oldest_pending_at) = on_pool!(&self.db, |pool, pg| {
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'in_flight'), \
                     count(*) FILTER (WHERE state = 'dead'), min(CASE WHEN state != 'dead' THEN created_at END) \
                 FROM operations",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(QueueSummary {
            pending,
            in_flight,
            dead,
            oldest_pending_at,
        })
    }

    // ---- runs -------------------------------------------------------------------------------

    pub async fn start_run(&self, command: &str) -> Result<i64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "INSERT INTO runs (command, started_at) VALUES ($1, $2) RETURNING id"
        )
        .bind(command)
        .bind(now_text())
        .fetch_one(pool)
        .await)
    }

    pub async fn finish_run(
        &self,
        id: i64,
        outcome: &str,
        counts: &RunCounts,
        message: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query(
            "UPDATE runs SET finished_at = $1, outcome = $2, creates = $3, updates = $4, deletes = $5, \
                 skipped_rows = $6, succeeded = $7, failed = $8, requests = $9, message = $10 WHERE id = $11",
        )
        .bind(now_text())
        .bind(outcome)
        .bind(counts.creates)
        .bind(counts.updates)
        .bind(counts.deletes)
        .bind(counts.skipped_rows)
        .bind(counts.succeeded)
        .bind(counts.failed)
        .bind(counts.requests)
        .bind(message)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Deletes finished runs that ended before `keep` ago, except the last successful reconcile
    /// (which `status`, the status page and the staleness gauge go by). Returns how many went.
    pub async fn prune_runs(&self, keep: std::time::Duration) -> Result<u64, sqlx::Error> {
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(keep)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        on_pool!(&self.db, |pool, pg| Ok(sqlx::query(
            "DELETE FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1 \
             AND id IS DISTINCT FROM (SELECT max(id) FROM runs WHERE command <> 'drain' \
                            AND outcome IN ('converged', 'nothing_to_do'))",
        )
        .bind(format_time(cutoff))
        .execute(pool)
        .await?
        .rows_affected()))
    }

    pub async fn recent_runs(&self, limit: i64) -> Result<Vec<RunRecord>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query_as(
            "SELECT id, command, started_at, finished_at, outcome, creates, updates, deletes, skipped_rows, \
                 succeeded, failed, requests, message FROM runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await
        })
    }

    /// Another asset than `asset_id` (ignoring case), for `probe`: one Bynder confirmed a usage
    /// of (it certainly exists), else one the CMS table names.
    pub async fn other_known_asset(&self, asset_id: &str) -> Result<Option<String>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query_scalar(if pg {
            "SELECT asset_id FROM (SELECT asset_id::text COLLATE \"C\" AS asset_id, 0 AS pref FROM recorded_usages \
                 WHERE asset_id != $1 \
             UNION ALL SELECT asset_id, 1 FROM cms_asset_references \
                 WHERE lower(asset_id COLLATE \"C\") != lower($1 COLLATE \"C\")) AS known ORDER BY pref LIMIT 1"
        } else {
            "SELECT asset_id FROM (SELECT asset_id, 0 AS pref FROM recorded_usages WHERE asset_id != $1 \
             UNION ALL SELECT asset_id, 1 FROM cms_asset_references \
             WHERE typeof(asset_id) = 'text' AND asset_id != $1 COLLATE NOCASE) ORDER BY pref LIMIT 1"
        })
        .bind(asset_id)
        .fetch_optional(pool)
        .await
        })
    }

    // ---- portal profile ---------------------------------------------------------------------

    /// What was learned about one portal: `(fact, value, learned_at, evidence)` rows.
    pub async fn portal_facts(
        &self,
        portal: &str,
    ) -> Result<Vec<(String, String, String, String)>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query_as(
            "SELECT fact, value, learned_at, evidence FROM portal_profile WHERE portal = $1 ORDER BY fact",
        )
        .bind(portal)
        .fetch_all(pool)
        .await
        })
    }

    /// Stores one learned fact about a portal, replacing what was known of it.
    pub async fn save_portal_fact(
        &self,
        portal: &str,
        fact: &str,
        value: &str,
        learned_at: &str,
        evidence: &str,
    ) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query(
            "INSERT INTO portal_profile (portal, fact, value, learned_at, evidence) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (portal, fact) DO UPDATE SET value = excluded.value, learned_at = excluded.learned_at, \
                 evidence = excluded.evidence",
        )
        .bind(portal)
        .bind(fact)
        .bind(value)
        .bind(learned_at)
        .bind(evidence)
        .execute(pool)
        .await.map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    // ---- settings ---------------------------------------------------------------------------

    pub async fn set_setting(&self, key: &str, value: Option<&str>) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        changes::put_setting(&mut tx, key, value).await?;
        tx.commit().await
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT value FROM settings WHERE key = $1"
        )
        .bind(key)
        .fetch_optional(pool)
        .await)
    }

    /// A transaction the caller owns (a plan is written in one).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.db.begin().await
    }

    /// The transaction a plan is written in, its queue writes collected a chunk at a time (see
    /// [`PlanWriter`]).
    pub async fn begin_plan(&self) -> Result<PlanWriter, sqlx::Error> {
        Ok(PlanWriter::new(self.db.begin().await?))
    }

    /// Whether the pool still answers (the systemd watchdog is fed only then).
    pub async fn alive(&self) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))
    }

    /// Whether a pending operation's retry is due now (one indexed query, polled by the daemon).
    pub async fn has_due_operations(&self) -> Result<bool, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM operations WHERE state = 'pending' AND next_attempt_at <= $1)",
        )
        .bind(now_text())
        .fetch_one(pool)
        .await
        })
    }

    /// Every asset id with a recorded usage or a queued operation: what drift repair reads back.
    pub async fn managed_asset_ids(&self) -> Result<Vec<AssetId>, sqlx::Error> {
        let ids: Vec<String> = on_pool!(&self.db, |pool, pg| {
            sqlx::query_scalar(
            "SELECT DISTINCT asset_id FROM recorded_usages UNION SELECT DISTINCT asset_id FROM operations",
        )
        .fetch_all(pool)
        .await
        })?;
        ids.into_iter()
            .map(|id| AssetId::parse(&id).map_err(|r| invalid_key("asset_id", r)))
            .collect()
    }

    /// The recorded usages of one asset: `(uri, additional)`.
    pub async fn recorded_for_asset(
        &self,
        asset_id: &str,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_as(
            "SELECT uri, additional FROM recorded_usages WHERE asset_id = $1"
        )
        .bind(asset_id)
        .fetch_all(pool)
        .await)
    }

    /// Health check: the CMS table can be read, on the connection kept for health checks.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_pool!(&self.probe, |pool, pg| sqlx::query(
            "SELECT 1 FROM cms_asset_references LIMIT 1"
        )
        .fetch_optional(pool)
        .await
        .map(drop))
    }

    /// The end of a rate-limit pause another process recorded, read like [`Store::ping`].
    pub async fn recorded_pause(&self) -> Result<Option<String>, sqlx::Error> {
        on_pool!(&self.probe, |pool, pg| sqlx::query_scalar(
            "SELECT value FROM settings WHERE key = 'rate_limit_paused_until'"
        )
        .fetch_optional(pool)
        .await)
    }
}

/// What a sync answer said about one operation of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOpOutcome {
    /// Listed in `new` or `accepted`: Bynder holds the usage with this note.
    Upserted {
        additional: String,
        usage_id: Option<String>,
    },
    /// Listed in `removed`: Bynder holds no usage of ours for the key.
    Removed,
    /// Listed in `rejected`, with Bynder's reason: a dead letter.
    Rejected(String),
    /// The answer does not say: settled by reading Bynder back.
    Unsettled,
}

/// Operations claimed together for one sync-endpoint request.
#[derive(Debug, Clone, Default)]
pub struct SyncBatch {
    /// The uris Bynder is authoritative for in this request.
    pub uris: Vec<String>,
    /// The claimed operations on those uris.
    pub ops: Vec<Operation>,
    /// Every usage Bynder must hold on those uris afterwards.
    pub listing: Vec<SyncUsage>,
}

/// Rows per page of a paged scan.
pub(crate) const PAGE_ROWS: i64 = 5000;

/// One page of rows and the cursor of the next page (`None`: this was the last).
pub(crate) type Page<T, C> = Result<(Vec<T>, Option<C>), sqlx::Error>;

/// The rows of a keyset-paged scan, one SQL round trip per page instead of one per row (sqlx's
/// per-row cost dominates a scan of a million rows), fetched by a task one page ahead of the
/// consumer so SQLite works while the plan merges. The task ends with the scan, on an error, or
/// as soon as the stream is dropped.
pub(crate) fn prefetched_pages<T, C, F>(
    mut next_page: F,
) -> BoxStream<'static, Result<T, sqlx::Error>>
where
    T: Send + 'static,
    C: Send + 'static,
    F: FnMut(Option<C>) -> futures::future::BoxFuture<'static, Page<T, C>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<T>, sqlx::Error>>(2);
    tokio::spawn(async move {
        let mut cursor = None;
        loop {
            match next_page(cursor.take()).await {
                Ok((rows, next)) => {
                    if tx.send(Ok(rows)).await.is_err() {
                        return;
                    }
                    match next {
                        Some(c) => cursor = Some(c),
                        None => return,
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|page| (page, rx))
    })
    .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
    .try_flatten()
    .boxed()
}

/// A source row plus whether its key columns are TEXT (only those take part in the key merge).
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub raw: RawRow,
    pub text_keys: bool,
}

/// Queues a target for a key, replacing any operation for it (coalescing). An uncertain flag is
/// kept: whatever the new target, the key must first be read back. One row at a time: the
/// semantics [`PlanWriter`] is tested against (plans write through it).
#[cfg(test)]
pub async fn enqueue(
    tx: &mut Tx,
    asset_id: &str,
    uri: &str,
    target: &Target,
) -> Result<(), sqlx::Error> {
    let (action, additional) = match target {
        Target::Upsert(a) => ("upsert", Some(a.as_str())),
        Target::Delete => ("delete", None),
    };
    let now = now_text();
    on_tx!(tx, |conn, pg| {
        sqlx::query(
        "INSERT INTO operations (asset_id, uri, action, additional, state, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 'pending', $5, $5, $5) \
         ON CONFLICT (asset_id, uri) DO UPDATE SET asset_id = excluded.asset_id, action = excluded.action, \
             additional = excluded.additional, state = 'pending', attempts = 0, run_attempts = 0, run_id = NULL, next_attempt_at = excluded.next_attempt_at, \
             last_error = NULL, updated_at = excluded.updated_at",
    )
    .bind(asset_id)
    .bind(uri)
    .bind(action)
    .bind(additional)
    .bind(&now)
    .execute(&mut *conn)
    .await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Removes a queued operation that is no longer needed, one at a time (see [`enqueue`]).
#[cfg(test)]
pub async fn cancel(tx: &mut Tx, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
    on_tx!(tx, |conn, pg| sqlx::query(
        "DELETE FROM operations WHERE asset_id = $1 AND uri = $2 AND state != 'in_flight'"
    )
    .bind(asset_id)
    .bind(uri)
    .execute(&mut *conn)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Most uris one sync batch is chosen from.
const SYNC_CANDIDATES: usize = 1024;

/// Queued operations read per query while choosing them.
const CANDIDATE_PAGE_ROWS: i64 = 2048;

/// The uris a sync batch is chosen from, in queue order: every uri with an operation this run
/// may send now and none in flight, by the earliest due time among those operations, then by
/// uri; the first [`SYNC_CANDIDATES`]. The pending operations are walked in due order (their
/// index) a page at a time, and the walk stops once no later operation can change the first
/// uris: grouping the whole queue by uri instead cost each batch of a first sync a scan of every
/// queued operation.
async fn sync_candidates(
    tx: &mut Tx,
    run_id: i64,
    now: &str,
    max_run_attempts: u32,
) -> Result<Vec<String>, sqlx::Error> {
    // `(earliest due time, uri)`, in the order found: due times never decrease along the walk,
    // so each uri is found at its earliest.
    let mut found: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor = (String::new(), 0i64);
    'walk: loop {
        let page: Vec<(String, String, i64)> = on_tx!(&mut *tx, |conn, pg| sqlx::query_as(
            "SELECT uri, next_attempt_at, id FROM operations WHERE state = 'pending' \
                 AND (run_id IS DISTINCT FROM $1 OR (next_attempt_at <= $2 AND run_attempts < $3)) \
                 AND uri NOT IN (SELECT uri FROM operations WHERE state = 'in_flight') \
                 AND (next_attempt_at, id) > ($4, $5) \
             ORDER BY next_attempt_at, id LIMIT $6",
        )
        .bind(run_id)
        .bind(now)
        .bind(max_run_attempts as i64)
        .bind(&cursor.0)
        .bind(cursor.1)
        .bind(CANDIDATE_PAGE_ROWS)
        .fetch_all(&mut *conn)
        .await)?;
        let last_page = (page.len() as i64) < CANDIDATE_PAGE_ROWS;
        for (uri, due, id) in page {
            // Enough uris, and past every operation due at the same time as the last of them
            // (a uri due then may still sort before it).
            if found.len() >= SYNC_CANDIDATES && due > found[SYNC_CANDIDATES - 1].0 {
                break 'walk;
            }
            if seen.insert(uri.clone()) {
                found.push((due.clone(), uri));
            }
            cursor = (due, id);
        }
        if last_page {
            break;
        }
    }
    found.sort();
    found.truncate(SYNC_CANDIDATES);
    Ok(found.into_iter().map(|(_, uri)| uri).collect())
}

/// Uris of sync-batch candidates whose listings are read per query.
const CLAIM_CHUNK_URIS: usize = 100;

/// Queue writes a [`PlanWriter`] collects before writing them in one statement.
pub const PLAN_WRITE_CHUNK: usize = 1000;

/// `value` as JSON text, bound as one parameter and read back with `json_each` (SQLite) or
/// `json_array_elements` (PostgreSQL).
fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Strings, numbers, options and tuples of them always serialise.
    serde_json::to_string(value).expect("plain values serialise to JSON")
}

/// The transaction a plan is written in. Its writes are [`enqueue`] and [`cancel`] exactly, but
/// collected and written [`PLAN_WRITE_CHUNK`] at a time (one `INSERT ... SELECT` over a JSON
/// array, one `DELETE`), the statement per usage being what a first sync of 100,000 usages spent its
/// time on. Everything is written in the one transaction: [`PlanWriter::commit`] writes what is
/// still collected first; [`PlanWriter::rollback`] (or dropping the writer) discards all of it.
pub struct PlanWriter {
    tx: Tx,
    /// `(asset_id, uri, action, additional, queued_at)`, in the order they were planned.
    enqueues: Vec<(String, String, &'static str, Option<String>, String)>,
    cancels: Vec<(String, String)>,
    /// The collected keys (asset id folded, as the queue compares it): a key planned twice has
    /// what was collected written first, so the later write wins as it would one at a time.
    keys: std::collections::HashSet<(String, String)>,
}

impl PlanWriter {
    fn new(tx: Tx) -> PlanWriter {
        PlanWriter {
            tx,
            enqueues: Vec::new(),
            cancels: Vec::new(),
            keys: Default::default(),
        }
    }

    /// [`enqueue`], collected.
    pub async fn enqueue(
        &mut self,
        asset_id: &str,
        uri: &str,
        target: &Target,
    ) -> Result<(), sqlx::Error> {
        self.collect(asset_id, uri).await?;
        let (action, additional) = match target {
            Target::Upsert(a) => ("upsert", Some(a.clone())),
            Target::Delete => ("delete", None),
        };
        self.enqueues.push((
            asset_id.to_owned(),
            uri.to_owned(),
            action,
            additional,
            now_text(),
        ));
        self.flush_if_full().await
    }

    /// [`cancel`], collected.
    pub async fn cancel(&mut self, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
        self.collect(asset_id, uri).await?;
        self.cancels.push((asset_id.to_owned(), uri.to_owned()));
        self.flush_if_full().await
    }

    /// Writes what is collected, then commits the whole plan.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        self.flush().await?;
        self.tx.commit().await
    }

    /// Discards the whole plan, written or collected.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }

    async fn collect(&mut self, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
        if !self
            .keys
            .insert((asset_id.to_ascii_lowercase(), uri.to_owned()))
        {
            self.flush().await?;
            self.keys
                .insert((asset_id.to_ascii_lowercase(), uri.to_owned()));
        }
        Ok(())
    }

    async fn flush_if_full(&mut self) -> Result<(), sqlx::Error> {
        if self.enqueues.len() + self.cancels.len() >= PLAN_WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes what is collected: the collected keys are distinct, so the order of the two
    /// statements does not matter.
    async fn flush(&mut self) -> Result<(), sqlx::Error> {
        if !self.enqueues.is_empty() {
            let enqueues = json_text(&self.enqueues);
            on_tx!(&mut self.tx, |conn, pg| {
                sqlx::query(if pg {
                "INSERT INTO operations (asset_id, uri, action, additional, state, next_attempt_at, created_at, updated_at) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, 'pending', value ->> 4, value ->> 4, value ->> 4 \
                 FROM json_array_elements($1::json) AS j(value) \
                 ON CONFLICT (asset_id, uri) DO UPDATE SET asset_id = excluded.asset_id, action = excluded.action, \
                     additional = excluded.additional, state = 'pending', attempts = 0, run_attempts = 0, run_id = NULL, next_attempt_at = excluded.next_attempt_at, \
                     last_error = NULL, updated_at = excluded.updated_at"
            } else {
                "INSERT INTO operations (asset_id, uri, action, additional, state, next_attempt_at, created_at, updated_at) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, 'pending', value ->> 4, value ->> 4, value ->> 4 \
                 FROM json_each($1) WHERE true \
                 ON CONFLICT (asset_id, uri) DO UPDATE SET asset_id = excluded.asset_id, action = excluded.action, \
                     additional = excluded.additional, state = 'pending', attempts = 0, run_attempts = 0, run_id = NULL, next_attempt_at = excluded.next_attempt_at, \
                     last_error = NULL, updated_at = excluded.updated_at"
            })
            .bind(enqueues)
            .execute(&mut *conn)
            .await.map(|r| r.rows_affected())
            })?;
            self.enqueues.clear();
        }
        if !self.cancels.is_empty() {
            let cancels = json_text(&self.cancels);
            on_tx!(&mut self.tx, |conn, pg| {
                sqlx::query(if pg {
                "DELETE FROM operations AS o USING json_array_elements($1::json) AS j(value) \
                 WHERE o.asset_id = j.value ->> 0 AND o.uri = j.value ->> 1 AND o.state != 'in_flight'"
            } else {
                "DELETE FROM operations WHERE id IN (SELECT o.id FROM json_each($1) AS j \
                 CROSS JOIN operations AS o ON o.asset_id = j.value ->> 0 AND o.uri = j.value ->> 1 \
                 WHERE o.state != 'in_flight')"
            })
            .bind(cancels)
            .execute(&mut *conn)
            .await.map(|r| r.rows_affected())
            })?;
            self.cancels.clear();
        }
        self.keys.clear();
        Ok(())
    }
}

/// Finishes (deletes) these operations in one statement.
async fn finish_operations(tx: &mut Tx, ids: &[i64]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    on_tx!(tx, |conn, pg| {
        sqlx::query(if pg {
        "DELETE FROM operations WHERE id IN (SELECT value::bigint FROM json_array_elements_text($1::json) AS j(value))"
    } else {
        "DELETE FROM operations WHERE id IN (SELECT value FROM json_each($1))"
    })
    .bind(json_text(ids))
    .execute(&mut *conn)
    .await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Records these `(asset_id, uri, additional, usage_id)` in one statement, all synced at `now`.
/// The keys must be distinct.
async fn record_usages(
    tx: &mut Tx,
    usages: &[(&str, &str, &str, Option<&str>)],
    now: &str,
) -> Result<(), sqlx::Error> {
    if usages.is_empty() {
        return Ok(());
    }
    on_tx!(tx, |conn, pg| {
        sqlx::query(if pg {
        "INSERT INTO recorded_usages (asset_id, uri, additional, usage_id, synced_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, $2 FROM json_array_elements($1::json) AS j(value) \
         ON CONFLICT (asset_id, uri) DO UPDATE SET asset_id = excluded.asset_id, additional = excluded.additional, \
             usage_id = coalesce(excluded.usage_id, recorded_usages.usage_id), synced_at = excluded.synced_at"
    } else {
        "INSERT INTO recorded_usages (asset_id, uri, additional, usage_id, synced_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, $2 FROM json_each($1) WHERE true \
         ON CONFLICT (asset_id, uri) DO UPDATE SET asset_id = excluded.asset_id, additional = excluded.additional, \
             usage_id = coalesce(excluded.usage_id, recorded_usages.usage_id), synced_at = excluded.synced_at"
    })
    .bind(json_text(usages))
    .bind(now)
    .execute(&mut *conn)
    .await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Forgets the recorded usages of these `(asset_id, uri)` in one statement.
async fn forget_recorded_all(tx: &mut Tx, keys: &[(&str, &str)]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    on_tx!(tx, |conn, pg| sqlx::query(if pg {
        "DELETE FROM recorded_usages AS r USING json_array_elements($1::json) AS j(value) \
         WHERE r.asset_id = j.value ->> 0 AND r.uri = j.value ->> 1"
    } else {
        "DELETE FROM recorded_usages WHERE (asset_id, uri) IN \
         (SELECT value ->> 0, value ->> 1 FROM json_each($1))"
    })
    .bind(json_text(keys))
    .execute(&mut *conn)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

async fn forget_recorded(tx: &mut Tx, asset_id: &str, uri: &str) -> Result<(), sqlx::Error> {
    forget_recorded_all(tx, &[(asset_id, uri)]).await
}

fn target_from(action: String, additional: Option<String>) -> Target {
    if action == "upsert" {
        Target::Upsert(additional.unwrap_or_default())
    } else {
        Target::Delete
    }
}

/// An operation's columns as selected (`id, asset_id, uri, action, additional, state,
/// uncertain, attempts, run_attempts, next_attempt_at, last_error, created_at, updated_at`).
type OperationRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    OperationState,
    bool,
    i64,
    i64,
    String,
    Option<String>,
    String,
    String,
);

/// An operation as stored. Its key was valid when it was queued; a row whose key no longer
/// parses (a database edited by hand) is a decode error, never a delete without a uri.
fn operation_from(row: OperationRow) -> Result<Operation, sqlx::Error> {
    let (
        id,
        asset_id,
        uri,
        action,
        additional,
        state,
        uncertain,
        attempts,
        run_attempts,
        next_attempt_at,
        last_error,
        created_at,
        updated_at,
    ) = row;
    Ok(Operation {
        id,
        asset_id: AssetId::parse(&asset_id).map_err(|r| invalid_key("asset_id", r))?,
        uri: UsageUri::parse(&uri).map_err(|r| invalid_key("uri", r))?,
        target: target_from(action, additional),
        state,
        uncertain,
        attempts,
        run_attempts,
        next_attempt_at,
        last_error,
        created_at,
        updated_at,
    })
}

/// A stored key that no longer parses (a database edited by hand), as a decode error.
fn invalid_key(column: &str, reason: SkipReason) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: reason.to_string().into(),
    }
}

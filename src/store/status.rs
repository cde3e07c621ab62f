//! The read-only queries behind the status page: the last successful reconcile, the first dead
//! letters, and the asset tracking search over the CMS table, the recorded usages and the queue.
//! What the page makes of the rows is `http`'s.

use super::db::on_pool;
use super::{operation_from, Operation, OperationRow, OperationState, Store};

/// A search's condition: the asset id is `$1` (any case), the uri is `$1`, or (when `$2`) the
/// uri contains `$1`; in key order, at most `$3` rows.
const MATCHES: &str =
    "WHERE asset_id = $1 COLLATE NOCASE OR uri = $1 OR ($2 AND instr(uri, $1) > 0) \
     ORDER BY asset_id, uri LIMIT $3";

/// [`MATCHES`] in PostgreSQL, over the daemon's own tables (whose asset ids compare ignoring
/// case already).
const MATCHES_PG: &str = "WHERE asset_id = $1 OR uri = $1 OR ($2 AND strpos(uri, $1) > 0) \
     ORDER BY asset_id, uri LIMIT $3";

/// [`MATCHES`] in PostgreSQL, over the CMS table (whose asset ids are plain text).
const CMS_MATCHES_PG: &str = "WHERE lower(asset_id COLLATE \"C\") = lower($1 COLLATE \"C\") OR uri = $1 \
     OR ($2 AND strpos(uri, $1) > 0) ORDER BY lower(asset_id COLLATE \"C\"), uri COLLATE \"C\" LIMIT $3";

/// A CMS row the search found, keys as stored (bytes: a row may hold anything).
#[derive(Debug, Clone)]
pub struct FoundCmsRow {
    pub asset_id: Vec<u8>,
    pub uri: Vec<u8>,
    pub additional: Option<Vec<u8>>,
    /// Whether the key columns are TEXT (only those are ever sent).
    pub text_keys: bool,
}

/// A recorded usage the search found.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FoundRecorded {
    pub asset_id: Vec<u8>,
    pub uri: Vec<u8>,
    pub usage_id: Option<String>,
    pub additional: String,
    pub synced_at: String,
}

/// A queued operation the search found.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FoundOperation {
    pub asset_id: Vec<u8>,
    pub uri: Vec<u8>,
    pub state: OperationState,
    pub action: String,
    pub additional: Option<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: String,
    pub uncertain: bool,
}

impl Store {
    /// When the last reconcile that converged (or had nothing to do) finished.
    pub async fn last_successful_reconcile(&self) -> Result<Option<String>, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| {
            sqlx::query_scalar(
            "SELECT max(finished_at) FROM runs WHERE outcome IN ('converged', 'nothing_to_do') AND command NOT IN ('drain', 'changes')",
        )
        .fetch_one(pool)
        .await
        })
    }

    /// The oldest `limit` dead letters.
    pub async fn first_dead_letters(&self, limit: i64) -> Result<Vec<Operation>, sqlx::Error> {
        let rows: Vec<OperationRow> = on_pool!(&self.db, |pool, pg| {
            sqlx::query_as(
            "SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                 next_attempt_at, last_error, created_at, updated_at FROM operations \
             WHERE state = 'dead' ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await
        })?;
        rows.into_iter().map(operation_from).collect()
    }

    /// CMS rows in `cms_asset_references` matching `q` (see [`MATCHES`]).
    pub async fn search_cms_rows(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundCmsRow>, sqlx::Error> {
        type Found = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>, bool);
        let rows: Vec<Found> = on_pool!(&self.db, |pool, pg| {
            let sql = if pg {
                format!(
                        "SELECT convert_to(asset_id, 'UTF8'), convert_to(uri, 'UTF8'), \
                             convert_to(additional, 'UTF8'), TRUE FROM cms_asset_references {CMS_MATCHES_PG}"
                    )
            } else {
                format!(
                        "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), \
                             typeof(asset_id) IN ('text', 'null') AND typeof(uri) IN ('text', 'null') \
                         FROM cms_asset_references {MATCHES}"
                    )
            };
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(q)
                .bind(substring)
                .bind(limit)
                .fetch_all(pool)
                .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(asset_id, uri, additional, text_keys)| FoundCmsRow {
                asset_id: asset_id.unwrap_or_default(),
                uri: uri.unwrap_or_default(),
                additional,
                text_keys,
            })
            .collect())
    }

    /// Recorded usages matching `q`.
    pub async fn search_recorded(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundRecorded>, sqlx::Error> {
        self.search(
            "convert_to(asset_id, 'UTF8') AS asset_id, convert_to(uri, 'UTF8') AS uri, usage_id, \
             additional, synced_at FROM recorded_usages",
            "CAST(asset_id AS BLOB) AS asset_id, CAST(uri AS BLOB) AS uri, usage_id, additional, \
             synced_at FROM recorded_usages",
            q,
            substring,
            limit,
        )
        .await
    }

    /// Queued operations (dead letters included) matching `q`.
    pub async fn search_operations(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundOperation>, sqlx::Error> {
        self.search(
            "convert_to(asset_id, 'UTF8') AS asset_id, convert_to(uri, 'UTF8') AS uri, state, action, \
             additional, attempts, last_error, next_attempt_at, uncertain FROM operations",
            "CAST(asset_id AS BLOB) AS asset_id, CAST(uri AS BLOB) AS uri, state, action, additional, \
             attempts, last_error, next_attempt_at, uncertain FROM operations",
            q,
            substring,
            limit,
        )
        .await
    }

    /// `SELECT` what (PostgreSQL's, or SQLite's) from the daemon's own tables, where
    /// [`MATCHES`] `q`.
    async fn search<T>(
        &self,
        postgres: &str,
        sqlite: &str,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        on_pool!(&self.db, |pool, pg| {
            let sql = if pg {
                format!("SELECT {postgres} {MATCHES_PG}")
            } else {
                format!("SELECT {sqlite} {MATCHES}")
            };
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(q)
                .bind(substring)
                .bind(limit)
                .fetch_all(pool)
                .await
        })
    }
}

//! The read-only queries behind the status page: the last successful reconcile, the first dead
//! letters, and the asset tracking search over the CMS table, the recorded usages and the queue.
//! What the page makes of the rows is `http`'s.

use sqlx::Row;

use super::{operation_from_row, Operation, OperationState, Store};

/// A search's condition: the asset id is `?1` (any case), the uri is `?1`, or (when `?2`) the
/// uri contains `?1`; in key order, at most `?3` rows.
const MATCHES: &str =
    "WHERE asset_id = ?1 COLLATE NOCASE OR uri = ?1 OR (?2 AND instr(uri, ?1) > 0) \
     ORDER BY asset_id, uri LIMIT ?3";

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
#[derive(Debug, Clone)]
pub struct FoundRecorded {
    pub asset_id: Vec<u8>,
    pub uri: Vec<u8>,
    pub usage_id: Option<String>,
    pub additional: String,
    pub synced_at: String,
}

/// A queued operation the search found.
#[derive(Debug, Clone)]
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
        sqlx::query_scalar(
            "SELECT max(finished_at) FROM runs WHERE outcome IN ('converged', 'nothing_to_do') AND command NOT IN ('drain', 'changes')",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// The oldest `limit` dead letters.
    pub async fn first_dead_letters(&self, limit: i64) -> Result<Vec<Operation>, sqlx::Error> {
        sqlx::query(
            "SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_attempts, \
                 next_attempt_at, last_error, created_at, updated_at FROM operations \
             WHERE state = 'dead' ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .try_map(operation_from_row)
        .fetch_all(&self.pool)
        .await
    }

    /// CMS rows in `cms_asset_references` matching `q` (see [`MATCHES`]).
    pub async fn search_cms_rows(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundCmsRow>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), \
                 typeof(asset_id) IN ('text', 'null') AND typeof(uri) IN ('text', 'null') \
             FROM cms_asset_references {MATCHES}"
        )))
        .bind(q)
        .bind(substring)
        .bind(limit)
        .map(|row: sqlx::sqlite::SqliteRow| FoundCmsRow {
            asset_id: row.get::<Option<Vec<u8>>, _>(0).unwrap_or_default(),
            uri: row.get::<Option<Vec<u8>>, _>(1).unwrap_or_default(),
            additional: row.get(2),
            text_keys: row.get(3),
        })
        .fetch_all(&self.pool)
        .await
    }

    /// Recorded usages matching `q`.
    pub async fn search_recorded(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundRecorded>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), usage_id, additional, synced_at \
             FROM recorded_usages {MATCHES}"
        )))
        .bind(q)
        .bind(substring)
        .bind(limit)
        .map(|row: sqlx::sqlite::SqliteRow| FoundRecorded {
            asset_id: row.get(0),
            uri: row.get(1),
            usage_id: row.get(2),
            additional: row.get(3),
            synced_at: row.get(4),
        })
        .fetch_all(&self.pool)
        .await
    }

    /// Queued operations (dead letters included) matching `q`.
    pub async fn search_operations(
        &self,
        q: &str,
        substring: bool,
        limit: i64,
    ) -> Result<Vec<FoundOperation>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), state, action, additional, attempts, \
                 last_error, next_attempt_at, uncertain FROM operations {MATCHES}"
        )))
        .bind(q)
        .bind(substring)
        .bind(limit)
        .map(|row: sqlx::sqlite::SqliteRow| FoundOperation {
            asset_id: row.get(0),
            uri: row.get(1),
            state: row.get(2),
            action: row.get(3),
            additional: row.get(4),
            attempts: row.get(5),
            last_error: row.get(6),
            next_attempt_at: row.get(7),
            uncertain: row.get(8),
        })
        .fetch_all(&self.pool)
        .await
    }
}

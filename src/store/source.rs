//! Where the desired state is read from: `cms_asset_references` in the state database (the
//! default), the CMS's own SQLite file (`source.database`), or a custom `SELECT`
//! (`source.query`). Always through a read-only connection: the daemon never writes the source.
//! Rows come out sorted by (asset_id ignoring ASCII case, uri), the order the plan's merge relies
//! on ([`crate::model::key_order`]); then by the asset id's bytes and by `additional`, so that of
//! rows sharing a key the one the plan keeps does not depend on the order the query happens to
//! return them in.

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

use crate::config::{Config, ConfigError};
use crate::model::RawRow;
use crate::store::{prefetched_pages, SourceRow, PAGE_ROWS};

/// Where the next page of the table starts: after this key, bound with these types.
struct Cursor {
    asset_id: Vec<u8>,
    asset_is_blob: bool,
    uri: Vec<u8>,
    uri_is_blob: bool,
}

/// Reads the page records `<asset is blob><uri is blob><len>:<asset bytes><len>:<uri bytes><len>:
/// <additional bytes>…`, one after the other: lengths delimit the raw values, so any bytes
/// survive without an encoding to undo.
fn decode_page(mut bytes: &[u8], count: usize) -> Option<(Vec<SourceRow>, Option<Cursor>)> {
    fn field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let colon = bytes.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
        let value = bytes.get(colon + 1..colon + 1 + len)?;
        *bytes = &bytes[colon + 1 + len..];
        Some(value)
    }
    let mut rows = Vec::with_capacity(count);
    let mut last = None;
    for _ in 0..count {
        let (flags, rest) = bytes.split_at_checked(2)?;
        bytes = rest;
        let (asset_is_blob, uri_is_blob) = (flags[0] == b'1', flags[1] == b'1');
        let asset_id = field(&mut bytes)?;
        let uri = field(&mut bytes)?;
        let additional = field(&mut bytes)?;
        rows.push(SourceRow {
            raw: RawRow {
                asset_id: Some(asset_id.to_vec()),
                uri: Some(uri.to_vec()),
                additional: Some(additional.to_vec()),
            },
            text_keys: !asset_is_blob && !uri_is_blob,
        });
        last = Some((asset_id, asset_is_blob, uri, uri_is_blob));
    }
    let cursor = last.map(|(a, ab, u, ub)| Cursor {
        asset_id: a.to_vec(),
        asset_is_blob: ab,
        uri: u.to_vec(),
        uri_is_blob: ub,
    });
    bytes.is_empty().then_some((rows, cursor))
}

/// The query used when `source.query` is not set.
pub const DEFAULT_QUERY: &str = "SELECT asset_id, uri, additional FROM cms_asset_references";

/// An opened, validated source of CMS rows.
#[derive(Clone)]
pub struct Source {
    pool: SqlitePool,
    /// The full statement, the user's query wrapped to read bytes in key order.
    statement: String,
    /// What reading it means, for errors: which key and file to look at.
    reading: String,
    /// The source is the product's own table (no `source.query`): it is read a page at a time
    /// along its key index, which is much faster than row by row.
    paged: bool,
    /// The source is the state database's own table, whose writes the capture triggers log:
    /// the daemon can plan only what changed.
    captured: bool,
}

/// Why the source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Opens the configured source read-only and checks the query yields the needed columns.
pub async fn open_source(config: &Config) -> Result<Source, SourceError> {
    let (path, key) = match &config.source.database {
        Some(p) => (p.clone(), "source.database"),
        None => (config.database.path.clone(), "database.path"),
    };
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .busy_timeout(config.database.busy_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(|e| {
            ConfigError::new(format!(
                "cannot open {} (`{key}`) read-only: {e}. Fix: check the path and that the service user may read it",
                path.display()
            ))
        })?;
    let query = config.source.query.as_deref().unwrap_or(DEFAULT_QUERY);
    // The user's SELECT runs as written, as a subquery; no value is ever formatted into SQL.
    let probe = format!("SELECT asset_id, uri, additional FROM ({query}) LIMIT 0");
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(probe))
        .fetch_all(&pool)
        .await
    {
        let (key, fix) = if config.source.query.is_some() {
            ("source.query", "make it a SELECT over the CMS's tables returning columns named asset_id, uri and additional")
        } else {
            (
                "source.database",
                "point it at a database with a cms_asset_references table, or set source.query",
            )
        };
        return Err(ConfigError::new(format!(
            "`{key}` cannot be read from {}: {e}. Fix: {fix}",
            path.display()
        ))
        .into());
    }
    // A NULL key counts as text: it is reported as empty, not as a BLOB or number. The last
    // sort term only orders duplicates (a key can appear twice in a custom query's result);
    // over cms_asset_references the key index makes it free.
    let encoding: String = sqlx::query_scalar("PRAGMA encoding")
        .fetch_one(&pool)
        .await
        .unwrap_or_default();
    let statement = format!(
        "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), \
                typeof(asset_id) IN ('text', 'null') AND typeof(uri) IN ('text', 'null') \
         FROM ({query}) ORDER BY asset_id COLLATE NOCASE, uri COLLATE BINARY, asset_id COLLATE BINARY, \
                additional COLLATE BINARY"
    );
    // The table is read a page at a time along the index `migrate` creates; a CMS's own copy of
    // the table without it is read in one sorted pass instead (a page-wise read would sort the
    // whole table once per page).
    let indexed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'cms_asset_references_by_key_nocase'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or(0);
    let reading = match &config.source.query {
        Some(_) => format!("running `source.query` over {}", path.display()),
        None => format!("reading cms_asset_references from {}", path.display()),
    };
    Ok(Source {
        pool,
        statement,
        reading,
        // Raw bytes travel through SQLite text concatenation, which is byte-exact in UTF-8 only.
        paged: config.source.query.is_none()
            && encoding.eq_ignore_ascii_case("UTF-8")
            && indexed > 0,
        captured: config.source.query.is_none() && config.source.database.is_none(),
    })
}

/// A row of the sorted statement: the three values as bytes, then whether both keys are text.
fn source_row(row: sqlx::sqlite::SqliteRow) -> SourceRow {
    SourceRow {
        raw: RawRow {
            asset_id: row.get(0),
            uri: row.get(1),
            additional: row.get(2),
        },
        text_keys: row.get::<bool, _>(3),
    }
}

impl Source {
    /// Every row in key order. Values are read as bytes: a CMS may store anything, and a bad row
    /// must become a report, not an aborted run.
    pub fn stream_rows(&self) -> BoxStream<'_, Result<SourceRow, sqlx::Error>> {
        if self.paged {
            return self.table_rows();
        }
        sqlx::query(sqlx::AssertSqlSafe(self.statement.clone()))
            .fetch(&self.pool)
            .map_ok(source_row)
            .boxed()
    }

    /// Whether writes to the source are logged by the capture triggers (the state database's own
    /// `cms_asset_references`; not a CMS's own file, not a custom query).
    pub fn captures_changes(&self) -> bool {
        self.captured
    }

    /// Whether the source has no row at all.
    pub async fn is_empty(&self) -> Result<bool, sqlx::Error> {
        let statement = format!("SELECT NOT EXISTS (SELECT 1 FROM ({DEFAULT_QUERY}))");
        sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
            .fetch_one(&self.pool)
            .await
    }

    /// The rows of these assets (ids compared ignoring ASCII case), in the order of
    /// [`Source::stream_rows`]; only for the captured table ([`Source::captures_changes`]).
    pub fn rows_of_assets(
        &self,
        assets: &[String],
    ) -> BoxStream<'_, Result<SourceRow, sqlx::Error>> {
        const ROWS: &str = "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), \
                typeof(asset_id) IN ('text', 'null') AND typeof(uri) IN ('text', 'null') \
             FROM cms_asset_references WHERE asset_id COLLATE NOCASE IN (SELECT value FROM json_each(?1)) \
             ORDER BY asset_id COLLATE NOCASE, uri COLLATE BINARY, asset_id COLLATE BINARY, \
                additional COLLATE BINARY";
        let assets = serde_json::to_string(assets).expect("strings serialise");
        sqlx::query(ROWS)
            .bind(assets)
            .fetch(&self.pool)
            .map_ok(source_row)
            .boxed()
    }

    /// `cms_asset_references` a page at a time along its key index (asset id ignoring case, uri,
    /// asset id). Values travel raw behind
    /// their byte length (any bytes survive), with flags for BLOB keys; the next page starts after
    /// the last key, bound with the same type so that SQLite's ordering (TEXT before BLOB) carries
    /// on exactly (the extra `asset_id >=` term lets SQLite seek the index instead of scanning it
    /// from the start for every page). The rows of a page are concatenated in the subquery's order; the plan's merge
    /// checks that order and stops the run if it were ever broken. Rows
    /// with a NULL key (impossible under the documented schema, possible in a CMS's own copy) sort
    /// first and are read apart: a NULL cannot be a page cursor.
    fn table_rows(&self) -> BoxStream<'_, Result<SourceRow, sqlx::Error>> {
        const NULL_KEYS: &str =
            "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB) \
             FROM cms_asset_references WHERE asset_id IS NULL OR uri IS NULL";
        const ROW: &str = "(typeof(asset_id) = 'blob') || (typeof(uri) = 'blob') \
             || length(CAST(asset_id AS BLOB)) || ':' || CAST(asset_id AS BLOB) \
             || length(CAST(uri AS BLOB)) || ':' || CAST(uri AS BLOB) \
             || length(ifnull(CAST(additional AS BLOB), X'')) || ':' || ifnull(CAST(additional AS BLOB), X'')";
        let first = format!(
            "SELECT count(*), CAST(group_concat({ROW}, '') AS BLOB) FROM (SELECT asset_id, uri, additional \
             FROM cms_asset_references WHERE asset_id IS NOT NULL AND uri IS NOT NULL \
             ORDER BY asset_id COLLATE NOCASE, uri, asset_id LIMIT ?1)"
        );
        let next = format!(
            "SELECT count(*), CAST(group_concat({ROW}, '') AS BLOB) FROM (SELECT asset_id, uri, additional \
             FROM cms_asset_references WHERE asset_id IS NOT NULL AND uri IS NOT NULL \
             AND asset_id COLLATE NOCASE >= (CASE WHEN ?3 THEN ?2 ELSE CAST(?2 AS TEXT) END) \
             AND (asset_id COLLATE NOCASE, uri, asset_id) > (CASE WHEN ?3 THEN ?2 ELSE CAST(?2 AS TEXT) END, \
                                    CASE WHEN ?5 THEN ?4 ELSE CAST(?4 AS TEXT) END, \
                                    CASE WHEN ?3 THEN ?2 ELSE CAST(?2 AS TEXT) END) \
             ORDER BY asset_id COLLATE NOCASE, uri, asset_id LIMIT ?1)"
        );
        let nulls = sqlx::query(NULL_KEYS)
            .fetch(&self.pool)
            .map_ok(|row| SourceRow {
                raw: RawRow {
                    asset_id: row.get(0),
                    uri: row.get(1),
                    additional: row.get(2),
                },
                text_keys: true,
            });
        let pool = self.pool.clone();
        let pages = prefetched_pages(move |cursor: Option<Cursor>| {
            let pool = pool.clone();
            let (first, next) = (first.clone(), next.clone());
            Box::pin(async move {
                let (count, joined): (i64, Option<Vec<u8>>) = match cursor {
                    None => {
                        sqlx::query_as(sqlx::AssertSqlSafe(first))
                            .bind(PAGE_ROWS)
                            .fetch_one(&pool)
                            .await?
                    }
                    Some(c) => {
                        sqlx::query_as(sqlx::AssertSqlSafe(next))
                            .bind(PAGE_ROWS)
                            .bind(c.asset_id)
                            .bind(c.asset_is_blob)
                            .bind(c.uri)
                            .bind(c.uri_is_blob)
                            .fetch_one(&pool)
                            .await?
                    }
                };
                let joined = joined.unwrap_or_default();
                let (rows, last) =
                    decode_page(&joined, count.max(0) as usize).ok_or_else(|| {
                        sqlx::Error::Protocol(
                            "a page of cms_asset_references could not be decoded".into(),
                        )
                    })?;
                Ok((rows, if count < PAGE_ROWS { None } else { last }))
            })
        });
        nulls.chain(pages).boxed()
    }

    /// Names what a failure while streaming rows is about (`source.query` or the table, and
    /// the file), for the error's context.
    pub fn reading(&self) -> &str {
        &self.reading
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

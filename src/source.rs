//! Where the desired state is read from: `cms_asset_references` in the state database (the
//! default), the CMS's own SQLite file (`source.database`), or a custom `SELECT`
//! (`source.query`). Always through a read-only connection: the daemon never writes the source.
//! Rows come out sorted by (asset_id, uri) in byte order, which the plan's merge relies on, and
//! rows sharing a key by `additional`, so that the one the plan keeps does not depend on the
//! order the query happens to return them in.

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

/// One `flags:hex(asset_id):hex(uri):hex(additional)` record of a page.
fn decode_record(record: &str) -> Option<(SourceRow, Cursor)> {
    let mut fields = record.split(':');
    let flags = fields.next()?.as_bytes();
    let asset_id = hex::decode(fields.next()?).ok()?;
    let uri = hex::decode(fields.next()?).ok()?;
    let additional = hex::decode(fields.next()?).ok()?;
    let (asset_is_blob, uri_is_blob) = (*flags.first()? == b'1', *flags.get(1)? == b'1');
    let row = SourceRow {
        raw: RawRow {
            asset_id: Some(asset_id.clone()),
            uri: Some(uri.clone()),
            additional: Some(additional),
        },
        text_keys: !asset_is_blob && !uri_is_blob,
    };
    Some((
        row,
        Cursor {
            asset_id,
            asset_is_blob,
            uri,
            uri_is_blob,
        },
    ))
}

/// The query used when `source.query` is not set.
pub const DEFAULT_QUERY: &str = "SELECT asset_id, uri, additional FROM cms_asset_references";

/// An opened, validated source of CMS rows.
pub struct Source {
    pool: SqlitePool,
    /// The full statement, the user's query wrapped to read bytes in key order.
    statement: String,
    /// What reading it means, for errors: which key and file to look at.
    reading: String,
    /// The source is the product's own table (no `source.query`): it is read a page at a time
    /// along its primary key, which is much faster than row by row.
    paged: bool,
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
    // over cms_asset_references the primary key makes it free.
    let statement = format!(
        "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), \
                typeof(asset_id) IN ('text', 'null') AND typeof(uri) IN ('text', 'null') \
         FROM ({query}) ORDER BY asset_id COLLATE BINARY, uri COLLATE BINARY, additional COLLATE BINARY"
    );
    let reading = match &config.source.query {
        Some(_) => format!("running `source.query` over {}", path.display()),
        None => format!("reading cms_asset_references from {}", path.display()),
    };
    Ok(Source {
        pool,
        statement,
        reading,
        paged: config.source.query.is_none(),
    })
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
            .map_ok(|row| SourceRow {
                raw: RawRow {
                    asset_id: row.get(0),
                    uri: row.get(1),
                    additional: row.get(2),
                },
                text_keys: row.get::<bool, _>(3),
            })
            .boxed()
    }

    /// `cms_asset_references` a page at a time along its primary key. Values travel hex-encoded
    /// (any bytes survive) with flags for BLOB keys; the next page starts after the last key, bound
    /// with the same type so that SQLite's ordering (TEXT before BLOB) carries on exactly. Rows
    /// with a NULL key (impossible under the documented schema, possible in a CMS's own copy) sort
    /// first and are read apart: a NULL cannot be a page cursor.
    fn table_rows(&self) -> BoxStream<'_, Result<SourceRow, sqlx::Error>> {
        const NULL_KEYS: &str =
            "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB) \
             FROM cms_asset_references WHERE asset_id IS NULL OR uri IS NULL";
        const ROW: &str =
            "(typeof(asset_id) = 'blob') || (typeof(uri) = 'blob') || ':' || hex(asset_id) || ':' \
             || hex(uri) || ':' || ifnull(hex(additional), '')";
        let first = format!(
            "SELECT count(*), group_concat({ROW}, ';' ORDER BY asset_id, uri) FROM (SELECT asset_id, uri, additional \
             FROM cms_asset_references WHERE asset_id IS NOT NULL AND uri IS NOT NULL \
             ORDER BY asset_id, uri LIMIT ?1)"
        );
        let next = format!(
            "SELECT count(*), group_concat({ROW}, ';' ORDER BY asset_id, uri) FROM (SELECT asset_id, uri, additional \
             FROM cms_asset_references WHERE asset_id IS NOT NULL AND uri IS NOT NULL \
             AND (asset_id, uri) > (CASE WHEN ?3 THEN ?2 ELSE CAST(?2 AS TEXT) END, \
                                    CASE WHEN ?5 THEN ?4 ELSE CAST(?4 AS TEXT) END) \
             ORDER BY asset_id, uri LIMIT ?1)"
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
                let (count, joined): (i64, Option<String>) = match cursor {
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
                let mut rows = Vec::with_capacity(count.max(0) as usize);
                let mut last = None;
                for record in joined.split(';').take(count.max(0) as usize) {
                    let (row, cursor) = decode_record(record).ok_or_else(|| {
                        sqlx::Error::Protocol(format!("undecodable page record {record:?}"))
                    })?;
                    rows.push(row);
                    last = Some(cursor);
                }
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

//! Where the desired state is read from: `cms_asset_references` in the state database (the
//! default), the CMS's own SQLite file (`source.database`), the CMS's own PostgreSQL or
//! MySQL/MariaDB database (`source.url`), or a custom `SELECT` (`source.query`) over any of them.
//! Always through a read-only connection: the daemon never writes the source.
//! Rows come out sorted by (asset_id ignoring ASCII case, uri), the order the plan's merge relies
//! on ([`crate::model::key_order`]); then by the asset id's bytes and by `additional`, so that of
//! rows sharing a key the one the plan keeps does not depend on the order the query happens to
//! return them in.

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Row, SqlitePool};

use crate::config::{Config, ConfigError, ServerUrl, SourceServer};
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

/// An opened, validated source of CMS rows.
#[derive(Clone)]
pub struct Source {
    backend: Backend,
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

/// The connections a source reads through.
#[derive(Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// Why the source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `source.url` server could not be reached (refused, timed out, TLS failed): perhaps
    /// only for now.
    #[error("{0}")]
    Unreachable(String),
}

/// The configuration error for a source whose query cannot run at `place`: it names
/// `source.query` when one is set, else `table_key` (where the table was looked for).
fn unreadable(
    config: &Config,
    table_key: &str,
    place: &str,
    error: &dyn std::fmt::Display,
) -> SourceError {
    let (key, fix) = match config.source.query {
        Some(_) => (
            "source.query",
            "make it a SELECT over the CMS's tables returning columns named asset_id, uri and additional",
        ),
        None => (
            table_key,
            "point it at a database with a cms_asset_references table, or set source.query",
        ),
    };
    ConfigError::new(format!(
        "`{key}` cannot be read from {place}: {error}. Fix: {fix}"
    ))
    .into()
}

/// Opens the configured source read-only and checks the query yields the needed columns.
pub async fn open_source(config: &Config) -> Result<Source, SourceError> {
    if let Some(url) = &config.source.url {
        return open_server(config, url, "source.url").await;
    }
    // A PostgreSQL state database holds the CMS table itself.
    if let (None, Some(url)) = (&config.source.database, &config.database.url) {
        return open_server(config, url, "database.url").await;
    }
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
    let query = config.source.query();
    // The user's SELECT runs as written, as a subquery; no value is ever formatted into SQL.
    let probe = format!("SELECT asset_id, uri, additional FROM ({query}) LIMIT 0");
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(probe))
        .fetch_all(&pool)
        .await
    {
        return Err(unreadable(
            config,
            "source.database",
            &path.display().to_string(),
            &e,
        ));
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
        backend: Backend::Sqlite(pool),
        statement,
        reading,
        // Raw bytes travel through SQLite text concatenation, which is byte-exact in UTF-8 only.
        paged: config.source.query.is_none()
            && encoding.eq_ignore_ascii_case("UTF-8")
            && indexed > 0,
        captured: config.source.is_state_table(),
    })
}

/// Opens a PostgreSQL or MySQL/MariaDB `source.url`: one connection first, so that a wrong url
/// or an unreachable server is one clear error at start rather than a pool's retries, then a
/// small pool whose every session is read-only.
async fn open_server(
    config: &Config,
    url: &ServerUrl,
    key: &'static str,
) -> Result<Source, SourceError> {
    let shown = url.display();
    let password_key = if key == "database.url" {
        "database.password_file"
    } else {
        "source.password_file"
    };
    let connect_error = |e: sqlx::Error| -> SourceError {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
                SourceError::Unreachable(format!(
                    "cannot reach the CMS database `{key}` ({shown}): {e}. Fix: check the host \
                     and port, that the server runs and accepts connections from this host; the \
                     run is tried again later"
                ))
            }
            e => SourceError::Config(ConfigError::new(format!(
                "cannot connect to the CMS database `{key}` ({shown}): {e}. Fix: check the \
                 user, the database name and the password in {password_key}"
            ))),
        }
    };
    let query = config.source.query();
    let probe = format!("SELECT asset_id, uri, additional FROM ({query}) AS source LIMIT 0");
    let (backend, probed, statement) = match url.server {
        SourceServer::Postgres => {
            let options = crate::store::postgres_options(url)
                .map_err(connect_error)?
                // Every transaction of the session is read-only: the server refuses any write.
                .options([("default_transaction_read_only", "on")]);
            let mut conn = connect(&options).await.map_err(connect_error)?;
            let probed = conn.execute(sqlx::AssertSqlSafe(probe)).await.map(|_| ());
            let _ = conn.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect_lazy_with(options);
            (Backend::Postgres(pool), probed, postgres_statement(query))
        }
        SourceServer::MySql => {
            let mut options = MySqlConnectOptions::from_url(&url.url).map_err(connect_error)?;
            if let Some(p) = &url.password {
                use secrecy::ExposeSecret as _;
                options = options.password(p.expose_secret());
            }
            let mut conn = connect(&options).await.map_err(connect_error)?;
            let probed = async {
                prepare_mysql(&mut conn).await?;
                conn.execute(sqlx::AssertSqlSafe(probe)).await.map(|_| ())
            }
            .await;
            let _ = conn.close().await;
            let pool = MySqlPoolOptions::new()
                .max_connections(2)
                .after_connect(|conn, _| Box::pin(prepare_mysql(conn)))
                .connect_lazy_with(options);
            (Backend::MySql(pool), probed, mysql_statement(query))
        }
    };
    if let Err(e) = probed {
        return Err(unreadable(
            config,
            key,
            &format!("the CMS database {shown}"),
            &e,
        ));
    }
    let reading = match &config.source.query {
        Some(_) => format!("running `source.query` on {shown}"),
        None => format!("reading cms_asset_references from {shown}"),
    };
    Ok(Source {
        backend,
        statement,
        reading,
        paged: false,
        // The state database's own table: its triggers log every write.
        captured: key == "database.url" && config.source.is_state_table(),
    })
}

/// How long the first connection to a `source.url` server may take (a host that drops packets
/// would otherwise hold the start for the system's TCP timeout, minutes).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn connect<O>(options: &O) -> Result<O::Connection, sqlx::Error>
where
    O: ConnectOptions,
    O::Connection: Sized,
{
    tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection within {}",
                    humantime::format_duration(CONNECT_TIMEOUT)
                ),
            )))
        })
}

/// Every MySQL/MariaDB session: read-only, and sorting on the first 8192 bytes of each value
/// rather than the default 1024, so that the longest valid uri (2048 characters of up to 4
/// bytes, [`crate::model::MAX_URI_LEN`]) is compared whole; a longer value is skipped as too long
/// whatever its place. (Whole values, 8 MiB, do not fit MariaDB's default sort buffer.)
const MYSQL_SESSION: [&str; 2] = [
    "SET SESSION TRANSACTION READ ONLY",
    "SET SESSION max_sort_length = 8192",
];

async fn prepare_mysql(conn: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    for statement in MYSQL_SESSION {
        conn.execute(statement).await?;
    }
    Ok(())
}

/// The captured table's rows of some assets (a JSON array of ids, compared ignoring ASCII case)
/// in PostgreSQL, before [`postgres_statement`] sorts them.
const ROWS_PG: &str = "SELECT asset_id, uri, additional FROM cms_asset_references \
     WHERE lower(asset_id COLLATE \"C\") IN (SELECT lower(json_array_elements_text($1::json) COLLATE \"C\"))";

/// The user's query in PostgreSQL, as UTF-8 bytes in key order. `lower` under the "C" collation
/// lowercases ASCII letters only, and `bytea` compares byte by byte (a shorter prefix first):
/// exactly [`crate::model::key_order`], then the asset id's and `additional`'s bytes. Keys of
/// another type than text (a number, `bytea`) are reported as not text, as in SQLite.
fn postgres_statement(query: &str) -> String {
    format!(
        "SELECT a, u, d, t FROM (SELECT convert_to(asset_id::text, 'UTF8') AS a, \
                convert_to(uri::text, 'UTF8') AS u, convert_to(additional::text, 'UTF8') AS d, \
                convert_to(lower(asset_id::text COLLATE \"C\"), 'UTF8') AS l, \
                pg_typeof(asset_id) IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype, 'unknown'::regtype) \
                AND pg_typeof(uri) IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype, 'unknown'::regtype) AS t \
            FROM ({query}) AS source) AS keyed \
         ORDER BY l NULLS FIRST, u NULLS FIRST, a NULLS FIRST, d NULLS FIRST"
    )
}

/// The user's query in MySQL/MariaDB, as bytes in key order. `LOWER` would lowercase more than
/// ASCII (and not bytes at all), so the ASCII letters are replaced one by one on the binary
/// value; binary strings compare byte by byte (a shorter prefix first): exactly
/// [`crate::model::key_order`], then the asset id's and `additional`'s bytes. The column types
/// of a MySQL result are not known per row, so every key counts as text (a number is read as its
/// digits and then fails the id check).
fn mysql_statement(query: &str) -> String {
    let mut lowered = "a".to_owned();
    for c in b'A'..=b'Z' {
        let (upper, lower) = (c as char, c.to_ascii_lowercase() as char);
        lowered = format!("REPLACE({lowered}, _binary'{upper}', _binary'{lower}')");
    }
    format!(
        "SELECT a, u, d FROM (SELECT CAST(asset_id AS BINARY) AS a, CAST(uri AS BINARY) AS u, \
                CAST(additional AS BINARY) AS d FROM ({query}) AS source) AS keyed \
         ORDER BY {lowered}, u, a, d"
    )
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
        let statement = sqlx::AssertSqlSafe(self.statement.clone());
        match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(statement)
                .fetch(pool)
                .map_ok(source_row)
                .boxed(),
            Backend::Postgres(pool) => sqlx::query(statement)
                .fetch(pool)
                .map_ok(|row: sqlx::postgres::PgRow| SourceRow {
                    raw: RawRow {
                        asset_id: row.get(0),
                        uri: row.get(1),
                        additional: row.get(2),
                    },
                    text_keys: row.get::<bool, _>(3),
                })
                .boxed(),
            Backend::MySql(pool) => sqlx::query(statement)
                .fetch(pool)
                .map_ok(|row: sqlx::mysql::MySqlRow| SourceRow {
                    raw: RawRow {
                        asset_id: row.get(0),
                        uri: row.get(1),
                        additional: row.get(2),
                    },
                    text_keys: true,
                })
                .boxed(),
        }
    }

    /// The state database's pool: only the captured table and the paged read use it.
    fn sqlite(&self) -> Result<&SqlitePool, sqlx::Error> {
        match &self.backend {
            Backend::Sqlite(pool) => Ok(pool),
            _ => Err(sqlx::Error::Protocol(
                "only a SQLite source is read by key or page".into(),
            )),
        }
    }

    /// Whether writes to the source are logged by the capture triggers (the state database's own
    /// `cms_asset_references`; not a CMS's own file, not a custom query).
    pub fn captures_changes(&self) -> bool {
        self.captured
    }

    /// Whether the source has no row at all.
    pub async fn is_empty(&self) -> Result<bool, sqlx::Error> {
        match &self.backend {
            // The captured table (the one change runs ask about): one look at its index.
            Backend::Sqlite(pool) if self.captured => {
                sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM cms_asset_references)")
                    .fetch_one(pool)
                    .await
            }
            Backend::Postgres(pool) if self.captured => {
                sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM cms_asset_references)")
                    .fetch_one(pool)
                    .await
            }
            _ => Ok(self.stream_rows().try_next().await?.is_none()),
        }
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
        if let Backend::Postgres(pool) = &self.backend {
            return sqlx::query(sqlx::AssertSqlSafe(postgres_statement(ROWS_PG)))
                .bind(assets)
                .fetch(pool)
                .map_ok(|row: sqlx::postgres::PgRow| SourceRow {
                    raw: RawRow {
                        asset_id: row.get(0),
                        uri: row.get(1),
                        additional: row.get(2),
                    },
                    text_keys: row.get::<bool, _>(3),
                })
                .boxed();
        }
        let pool = match self.sqlite() {
            Ok(pool) => pool,
            Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
        };
        sqlx::query(ROWS)
            .bind(assets)
            .fetch(pool)
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
        let pool = match self.sqlite() {
            Ok(pool) => pool,
            Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
        };
        let nulls = sqlx::query(NULL_KEYS).fetch(pool).map_ok(|row| SourceRow {
            raw: RawRow {
                asset_id: row.get(0),
                uri: row.get(1),
                additional: row.get(2),
            },
            text_keys: true,
        });
        let pool = pool.clone();
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
        match &self.backend {
            Backend::Sqlite(pool) => pool.close().await,
            Backend::Postgres(pool) => pool.close().await,
            Backend::MySql(pool) => pool.close().await,
        }
    }
}

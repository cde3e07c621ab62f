//! `source.url`: the CMS rows read from the CMS's own PostgreSQL or MariaDB database, through
//! the binary, against real servers the tests start themselves (see `databases`).

use bynder_usage_sync::app::build_context;
use bynder_usage_sync::config::{load_config, ConfigSource};
use bynder_usage_sync::run;

use crate::common::*;
use crate::databases::{MariaDb, Postgres, DB_PASSWORD};

struct NoProgress;

impl run::Progress for NoProgress {}

/// An app whose `[source]` section is `source` (the url and what goes with it).
async fn app_reading(source: &str) -> App {
    spawn_app_with(Setup {
        extra: format!("[source]\n{source}\n"),
        ..Setup::default()
    })
    .await
}

/// An app whose config gets `[source]` `source` after `migrate` (which would refuse it).
async fn app_then_source(source: &str) -> App {
    let app = spawn_app().await;
    let mut config = std::fs::read_to_string(&app.config_path).unwrap();
    config.push_str(&format!("[source]\n{source}\n"));
    std::fs::write(&app.config_path, config).unwrap();
    app
}

fn pg_url(pg: &Postgres, user: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{}/cms", pg.port)
}

fn maria_url(db: &MariaDb, user: &str) -> String {
    format!("mariadb://{user}@127.0.0.1:{}/cms", db.port)
}

async fn pg_exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

async fn maria_exec(pool: &sqlx::MySqlPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

/// `('asset', 'uri', 'additional')` as SQL values, `None` as NULL.
fn values(rows: &[(String, String, Option<&str>)]) -> String {
    rows.iter()
        .map(|(a, u, d)| {
            format!(
                "('{a}', '{u}', {})",
                d.map_or("NULL".to_owned(), |d| format!("'{d}'"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn expected(rows: &[(String, String, Option<&str>)]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|(a, u, d)| (a.clone(), u.clone(), d.unwrap_or("").to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_postgres_cms_table_converges_then_follows_creates_updates_and_deletes() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    let mut rows: Vec<_> = (0..6)
        .map(|n| (asset(n), page(n % 3), Some("note")))
        .collect();
    rows.push((asset(9), page(9), None));
    pg_exec(
        &cms,
        &format!("INSERT INTO cms_asset_references VALUES {}", values(&rows)),
    )
    .await;
    let app = app_reading(&format!("url = \"{}\"", pg_url(&pg, "cms"))).await;
    app.resync_expecting(0).await;
    assert_eq!(app.ours(), expected(&rows));

    pg_exec(
        &cms,
        &format!(
            "UPDATE cms_asset_references SET additional = 'changed' WHERE asset_id = '{}'",
            asset(1)
        ),
    )
    .await;
    pg_exec(
        &cms,
        &format!(
            "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
            asset(2)
        ),
    )
    .await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', 'added')",
            asset(7),
            page(7)
        ),
    )
    .await;
    rows[1].2 = Some("changed");
    rows.remove(2);
    rows.push((asset(7), page(7), Some("added")));
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(
        text.contains("1 create(s), 1 update(s), 1 delete(s)"),
        "{text}"
    );
    assert_eq!(app.ours(), expected(&rows));
}

#[tokio::test]
async fn a_custom_query_over_two_joined_postgres_tables_is_what_is_synced() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    pg_exec(
        &cms,
        "CREATE TABLE pages (id int PRIMARY KEY, path text NOT NULL, published boolean NOT NULL)",
    )
    .await;
    pg_exec(
        &cms,
        "CREATE TABLE page_assets (page_id int NOT NULL, media text NOT NULL, caption text)",
    )
    .await;
    pg_exec(
        &cms,
        "INSERT INTO pages VALUES (1, '/a', true), (2, '/b', true), (3, '/draft', false)",
    )
    .await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO page_assets VALUES (1, '{}', 'hero'), (2, '{}', NULL), (3, '{}', 'draft')",
            asset(1),
            asset(2),
            asset(3)
        ),
    )
    .await;
    let query = "SELECT a.media AS asset_id, 'https://cms.example' || p.path AS uri, a.caption AS additional \
                 FROM page_assets a JOIN pages p ON p.id = a.page_id WHERE p.published";
    let app = app_reading(&format!(
        "url = \"{}\"\nquery = \"{query}\"",
        pg_url(&pg, "cms")
    ))
    .await;
    app.resync_expecting(0).await;
    assert_eq!(
        app.ours(),
        vec![
            (
                asset(1),
                "https://cms.example/a".to_owned(),
                "hero".to_owned()
            ),
            (asset(2), "https://cms.example/b".to_owned(), String::new()),
        ]
    );
}

#[tokio::test]
async fn bad_postgres_rows_are_skipped_and_reported_while_the_good_ones_sync() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', 'good'), ('not an id', '{}', NULL), \
             ('{}', ' {} ', NULL), ('{}', '{}', 'a' || chr(27) || 'b')",
            asset(1),
            page(1),
            page(2),
            asset(3),
            page(3),
            asset(4),
            page(4)
        ),
    )
    .await;
    // A NULL key, as a custom query over a LEFT JOIN can give.
    let query = "SELECT asset_id, uri, additional FROM cms_asset_references \
                 UNION ALL SELECT NULL, 'https://cms.example/null', NULL";
    let app = app_reading(&format!(
        "url = \"{}\"\nquery = \"{query}\"",
        pg_url(&pg, "cms")
    ))
    .await;
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    for reason in [
        "asset_id has characters no Bynder id has",
        "uri has leading or trailing whitespace",
        "additional contains a control character",
        "4 skipped",
    ] {
        assert!(text.contains(reason), "{reason}: {text}");
    }
    assert_eq!(
        app.ours(),
        vec![(asset(1), page(1), "good".to_owned())],
        "only the good row is synced"
    );
}

/// Mixed case interleaves under byte order (`C078…` before `c078…`), and uris with letters
/// beyond ASCII sort by their bytes (`Z` < `z` < `é`): the rows must still come out in the
/// merge's order (else the run aborts), and ids differing only in case are one usage.
#[tokio::test]
async fn mixed_case_postgres_ids_come_out_in_key_order_and_case_variants_are_one_usage() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    let lower = |n| asset(n).to_lowercase();
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL), ('{}', '{}', NULL), \
             ('{}', '{}', NULL), ('{}', '{}', 'upper'), ('{}', '{}', 'lower'), \
             ('{a6}', 'https://cms.example/é', NULL), ('{a6}', 'https://cms.example/z', NULL), \
             ('{a6}', 'https://cms.example/Z', NULL)",
            asset(1),
            page(1),
            lower(2),
            page(2),
            asset(3),
            page(3),
            asset(4),
            page(4),
            lower(4),
            page(4),
            a6 = asset(6)
        ),
    )
    .await;
    let app = app_reading(&format!("url = \"{}\"", pg_url(&pg, "cms"))).await;
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(
        text.contains("differs only in letter case") && text.contains("1 skipped"),
        "{text}"
    );
    let ours = app.ours();
    assert_eq!(ours.len(), 7, "{ours:?}");
    assert!(
        ours.iter().any(|(a, u, _)| *a == lower(2) && *u == page(2)),
        "{ours:?}"
    );
}

#[tokio::test]
async fn a_postgres_password_from_password_file_works_and_is_never_shown() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL)",
            asset(1),
            page(1)
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pg-password");
    std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
    let app = app_reading(&format!(
        "url = \"{}\"\npassword_file = \"{}\"",
        pg_url(&pg, "cms_pw"),
        password_file.display()
    ))
    .await;
    let out = app.run(&["resync", "-v"]).await;
    let mut seen = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{seen}");
    assert_eq!(app.ours(), vec![(asset(1), page(1), String::new())]);
    for args in [&["config", "show"][..], &["config", "show", "--json"][..]] {
        let out = app.run(args).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(&pg_url(&pg, "cms_pw")), "{text}");
        seen.push_str(&text);
        seen.push_str(&stderr(&out));
    }
    // A wrong password is refused by the server: a configuration error, the password not shown.
    std::fs::write(&password_file, "wrong-password-Xk2\n").unwrap();
    let out = app.run(&["resync"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("source.url") && err.contains("Fix:") && !err.contains("wrong-password-Xk2"),
        "{err}"
    );
    seen.push_str(&err);
    assert!(!seen.contains(DB_PASSWORD), "the password leaked:\n{seen}");
}

#[tokio::test]
async fn a_password_inside_source_url_is_refused_as_a_configuration_error() {
    for url in [
        "postgres://cms:hunter2-secret@127.0.0.1:5432/cms",
        "mysql://cms:hunter2-secret@127.0.0.1:3306/cms",
    ] {
        let app = app_then_source(&format!("url = \"{url}\"")).await;
        let out = app.run(&["resync"]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{url}: {err}");
        assert!(
            err.contains("source.url")
                && err.contains("source.password_file")
                && !err.contains("hunter2-secret"),
            "{url}: {err}"
        );
    }
}

#[tokio::test]
async fn source_url_and_source_database_together_are_a_configuration_error() {
    let app =
        app_then_source("url = \"postgres://cms@127.0.0.1:5432/cms\"\ndatabase = \"state.db\"")
            .await;
    let out = app.run(&["resync"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("source.url") && err.contains("source.database"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_database_server_exits_1_naming_source_url_and_the_fix() {
    // A port nothing listens on (taken and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for scheme in ["postgres", "mariadb"] {
        let url = format!("{scheme}://cms@127.0.0.1:{port}/cms");
        let app = app_reading(&format!("url = \"{url}\"")).await;
        let out = app.run(&["resync"]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{scheme}: {err}");
        assert!(
            err.contains("cannot reach the CMS database `source.url`")
                && err.contains(&format!("127.0.0.1:{port}"))
                && err.contains("Fix:"),
            "{scheme}: {err}"
        );
        assert!(app.ours().is_empty());
    }
}

/// A query that would write runs in a read-only session: the server refuses it (while the rows
/// are read, so the run fails as any query failing on a row does) and nothing is changed.
#[tokio::test]
async fn the_postgres_session_is_read_only() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL)",
            asset(1),
            page(1)
        ),
    )
    .await;
    // nextval writes the sequence: refused in a read-only transaction.
    pg_exec(&cms, "CREATE SEQUENCE seen").await;
    pg_exec(&cms, "GRANT ALL ON SEQUENCE seen TO cms").await;
    let query =
        "SELECT asset_id, uri, additional FROM cms_asset_references WHERE nextval('seen') > 0";
    let app = app_reading(&format!(
        "url = \"{}\"\nquery = \"{query}\"",
        pg_url(&pg, "cms")
    ))
    .await;
    let out = app.run(&["resync"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("source.query") && err.contains("read-only transaction"),
        "{err}"
    );
    let (called,): (bool,) = sqlx::query_as("SELECT is_called FROM seen")
        .fetch_one(&cms)
        .await
        .unwrap();
    assert!(!called, "the sequence was not advanced");
}

#[tokio::test]
async fn a_mariadb_cms_table_converges_then_follows_creates_updates_and_deletes() {
    let db = MariaDb::start();
    let cms = db.cms().await;
    let mut rows: Vec<_> = (0..6)
        .map(|n| (asset(n), page(n % 3), Some("note")))
        .collect();
    rows.push((asset(9), page(9), None));
    maria_exec(
        &cms,
        &format!("INSERT INTO cms_asset_references VALUES {}", values(&rows)),
    )
    .await;
    let app = app_reading(&format!("url = \"{}\"", maria_url(&db, "cms"))).await;
    app.resync_expecting(0).await;
    assert_eq!(app.ours(), expected(&rows));

    maria_exec(
        &cms,
        &format!(
            "UPDATE cms_asset_references SET additional = 'changed' WHERE asset_id = '{}'",
            asset(1)
        ),
    )
    .await;
    maria_exec(
        &cms,
        &format!(
            "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
            asset(2)
        ),
    )
    .await;
    maria_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', 'added')",
            asset(7),
            page(7)
        ),
    )
    .await;
    rows[1].2 = Some("changed");
    rows.remove(2);
    rows.push((asset(7), page(7), Some("added")));
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(
        text.contains("1 create(s), 1 update(s), 1 delete(s)"),
        "{text}"
    );
    assert_eq!(app.ours(), expected(&rows));
}

/// Under MariaDB's case-insensitive collation (where `é` sorts as `e`, before `z`) and with uris
/// differing only past the default 1024-byte sort prefix, the rows still come out in the merge's
/// byte order (else the run aborts).
#[tokio::test]
async fn mixed_case_mariadb_ids_and_long_uris_come_out_in_key_order() {
    let db = MariaDb::start();
    let cms = db.cms().await;
    let lower = |n| asset(n).to_lowercase();
    let long = |tail: &str| format!("https://cms.example/{}{tail}", "x".repeat(1100));
    maria_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL), ('{}', '{}', NULL), \
             ('{}', '{}', NULL), ('{}', '{}', 'upper'), ('{}', '{}', 'lower'), \
             ('{}', '{}', NULL), ('{}', '{}', NULL), ('{}', '{}', NULL), \
             ('{a6}', 'https://cms.example/é', NULL), ('{a6}', 'https://cms.example/z', NULL), \
             ('{a6}', 'https://cms.example/Z', NULL)",
            asset(1),
            page(1),
            lower(2),
            page(2),
            asset(3),
            page(3),
            asset(4),
            page(4),
            lower(4),
            page(4),
            asset(5),
            long("b"),
            asset(5),
            long("a"),
            asset(5),
            long("B"),
            a6 = asset(6)
        ),
    )
    .await;
    let app = app_reading(&format!("url = \"{}\"", maria_url(&db, "cms"))).await;
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    assert!(
        text.contains("differs only in letter case") && text.contains("1 skipped"),
        "{text}"
    );
    let ours = app.ours();
    assert_eq!(ours.len(), 10, "{ours:?}");
    assert!(
        ours.iter().any(|(a, u, _)| *a == lower(2) && *u == page(2)),
        "{ours:?}"
    );
}

#[tokio::test]
async fn a_mariadb_password_from_password_file_works_and_is_never_shown() {
    let db = MariaDb::start();
    let cms = db.cms().await;
    maria_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL)",
            asset(1),
            page(1)
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("db-password");
    std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
    let app = app_reading(&format!(
        "url = \"{}\"\npassword_file = \"{}\"",
        maria_url(&db, "cms_pw"),
        password_file.display()
    ))
    .await;
    let out = app.run(&["resync", "-v"]).await;
    let mut seen = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{seen}");
    assert_eq!(app.ours(), vec![(asset(1), page(1), String::new())]);
    let out = app.run(&["config", "show"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    seen.push_str(&stdout(&out));
    seen.push_str(&stderr(&out));
    assert!(!seen.contains(DB_PASSWORD), "the password leaked:\n{seen}");
}

/// A query that would write runs in a read-only session: the server refuses it.
#[tokio::test]
async fn the_mariadb_session_is_read_only() {
    let db = MariaDb::start();
    let cms = db.cms().await;
    maria_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL)",
            asset(1),
            page(1)
        ),
    )
    .await;
    // A function that writes, called by the query: refused in a read-only transaction.
    maria_exec(&cms, "CREATE TABLE calls (n int)").await;
    maria_exec(
        &cms,
        "CREATE FUNCTION touch() RETURNS int MODIFIES SQL DATA BEGIN INSERT INTO calls VALUES (1); RETURN 1; END",
    )
    .await;
    let query = "SELECT asset_id, uri, additional FROM cms_asset_references WHERE touch() = 1";
    let app = app_reading(&format!(
        "url = \"{}\"\nquery = \"{query}\"",
        maria_url(&db, "cms")
    ))
    .await;
    let out = app.run(&["resync"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("source.query") && err.contains("READ ONLY"),
        "{err}"
    );
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&cms)
        .await
        .unwrap();
    assert_eq!(calls, 0, "the source was not written");
}

/// Change capture is the state database's own table's: with `source.url` a change run plans
/// nothing and the daemon keeps to the schedule.
#[tokio::test]
async fn a_postgres_source_is_not_planned_by_change_capture() {
    let pg = Postgres::start();
    let cms = pg.create_cms().await;
    pg_exec(
        &cms,
        &format!(
            "INSERT INTO cms_asset_references VALUES ('{}', '{}', NULL)",
            asset(1),
            page(1)
        ),
    )
    .await;
    let app = app_reading(&format!("url = \"{}\"", pg_url(&pg, "cms"))).await;
    let source = ConfigSource::Explicit(app.config_path.clone());
    let ctx = build_context(load_config(&source).unwrap()).await.unwrap();
    assert!(!ctx.source.captures_changes());
    let report = run::changes_once(&ctx, std::sync::Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(report.is_none(), "a source.url keeps the schedule alone");
    assert!(app.ours().is_empty());
    ctx.source.close().await;
    ctx.store.close().await;
}

#[tokio::test]
async fn bad_mariadb_rows_are_skipped_and_reported_and_a_joined_query_is_what_is_synced() {
    let db = MariaDb::start();
    let cms = db.cms().await;
    maria_exec(
        &cms,
        "CREATE TABLE pages (id int PRIMARY KEY, path varchar(200) NOT NULL, published bool NOT NULL)",
    )
    .await;
    maria_exec(
        &cms,
        "CREATE TABLE page_assets (page_id int NOT NULL, media varchar(200) NOT NULL, caption varbinary(200))",
    )
    .await;
    maria_exec(
        &cms,
        "INSERT INTO pages VALUES (1, '/a', true), (2, '/b', true), (3, '/c', true), (4, '/draft', false)",
    )
    .await;
    // A caption that is not UTF-8 (read as bytes, reported, not an aborted run) and an id that
    // is not one.
    maria_exec(
        &cms,
        &format!(
            "INSERT INTO page_assets VALUES (1, '{}', 'hero'), (2, '{}', X'6E6FFF'), \
             (3, 'not an id', NULL), (4, '{}', 'draft')",
            asset(1),
            asset(2),
            asset(4)
        ),
    )
    .await;
    let query = "SELECT a.media AS asset_id, CONCAT('https://cms.example', p.path) AS uri, a.caption AS additional \
                 FROM page_assets a JOIN pages p ON p.id = a.page_id WHERE p.published";
    let app = app_reading(&format!(
        "url = \"{}\"\nquery = \"{query}\"",
        maria_url(&db, "cms")
    ))
    .await;
    let out = app.resync_expecting(0).await;
    let text = stdout(&out);
    for reason in [
        "additional is not valid UTF-8",
        "asset_id has characters no Bynder id has",
        "2 skipped",
    ] {
        assert!(text.contains(reason), "{reason}: {text}");
    }
    assert_eq!(
        app.ours(),
        vec![(
            asset(1),
            "https://cms.example/a".to_owned(),
            "hero".to_owned()
        )]
    );
}

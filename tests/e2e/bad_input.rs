//! Issue: reliability evidence — the bad-input catalogue.
//!
//! Every case feeds the real binary one kind of bad input and checks the documented behaviour:
//! a clear message naming the cause, the documented exit code, the rest of the work still done,
//! nothing lost and nothing sent twice. Each case prints one `catalogue:` line (input, expected
//! message fragment, exit code, whether the valid rows converged); `cargo test --test e2e
//! bad_input -- --nocapture` lists the whole catalogue. Inputs already covered by `resync.rs`
//! (empty and non-hex ids, empty, over-long and non-UTF-8 uris, a control character in a note,
//! a missing key, broken TOML, a missing file or table) and `strategies.rs` (a custom query that
//! does not compile, a non-SELECT query) are not repeated here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::common::*;

/// Prints one line of the catalogue, once the case's assertions have passed: the input, the
/// message fragment it gets, the exit code, and what became of the rest of the work.
fn catalogue(input: &str, expected: &str, exit: Option<i32>, rest: &str) {
    let exit = exit.map_or_else(|| "signal".to_owned(), |c| c.to_string());
    println!("catalogue: input={input:?} message={expected:?} exit={exit} rest={rest:?}");
}

/// Environment variables for one run of the binary.
type Env<'a> = Vec<(&'a str, &'a str)>;

const SAME_RUN: &str = "valid rows converged in the same run";
const AFTER_FIX: &str = "nothing sent; converged once fixed";

fn per_usage() -> Setup {
    Setup {
        sync: "strategy = \"per_usage\"".to_owned(),
        ..Setup::default()
    }
}

fn route(app: &App, key: &str) -> u64 {
    app.portal
        .counters()
        .by_route
        .get(key)
        .copied()
        .unwrap_or(0)
}

// ---- rows ------------------------------------------------------------------------------------

/// One bad row: how it gets into the source, how it is removed again, what the report says.
struct RowCase {
    input: &'static str,
    setup: String,
    cleanup: String,
    expected: &'static str,
}

#[tokio::test]
async fn each_bad_row_is_reported_with_its_reason_while_the_rest_of_the_rows_converge() {
    let app = spawn_app().await;
    // Rows `cms_asset_references` cannot hold (NULLs, numbers) reach the daemon through a custom
    // query, exactly as a CMS's own schema would deliver them.
    app.exec("CREATE TABLE loose_rows (asset_id, uri, additional)")
        .await;
    let query = "SELECT asset_id, uri, additional FROM cms_asset_references \
                 UNION ALL SELECT asset_id, uri, additional FROM loose_rows";
    let env = [("BYNDER_USAGE_SYNC_SOURCE__QUERY", query)];
    let mut valid = Vec::new();
    for n in 1..=3 {
        app.insert(&asset(n), &page(n), Some("fine")).await;
        valid.push((asset(n), page(n), "fine".to_owned()));
    }
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(app.ours(), valid);

    let cms = |a: &str, u: &str, n: &str| {
        format!(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ({a}, {u}, {n})"
        )
    };
    let loose = |a: &str, u: &str, n: &str| {
        format!("INSERT INTO loose_rows (asset_id, uri, additional) VALUES ({a}, {u}, {n})")
    };
    let q = |s: &str| format!("'{s}'");
    let delete_cms =
        "DELETE FROM cms_asset_references WHERE asset_id NOT IN (SELECT asset_id FROM kept)";
    let set_note = |n: u32, note: &str| {
        format!(
            "UPDATE cms_asset_references SET additional = {note} WHERE asset_id = '{}'",
            asset(n)
        )
    };
    // The ids the cleanup keeps: the valid rows, plus the new valid row of every case.
    app.exec("CREATE TABLE kept (asset_id TEXT)").await;
    let cases = vec![
        RowCase {
            input: "asset_id with a leading space",
            setup: cms(&q(&format!(" {}", asset(90))), &q(&page(90)), "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "asset_id has leading or trailing whitespace",
        },
        RowCase {
            input: "uri with a trailing space",
            setup: cms(&q(&asset(90)), &q(&format!("{} ", page(90))), "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "uri has leading or trailing whitespace",
        },
        RowCase {
            input: "asset_id of 65 hex digits",
            setup: cms(&q(&"A".repeat(65)), &q(&page(90)), "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "asset_id is longer than 64 characters",
        },
        RowCase {
            input: "asset_id that is not valid UTF-8",
            setup: cms("CAST(X'43303738FF' AS TEXT)", &q(&page(90)), "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "asset_id is not valid UTF-8",
        },
        RowCase {
            input: "asset_id stored as a BLOB",
            setup: cms("X'43303738'", &q(&page(90)), "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "stored as a BLOB or number",
        },
        RowCase {
            input: "uri stored as a BLOB",
            setup: cms(&q(&asset(90)), "X'2F70'", "NULL"),
            cleanup: delete_cms.to_owned(),
            expected: "stored as a BLOB or number",
        },
        RowCase {
            input: "asset_id NULL (custom query)",
            setup: loose("NULL", &q(&page(90)), "NULL"),
            cleanup: "DELETE FROM loose_rows".to_owned(),
            expected: "asset_id is empty",
        },
        RowCase {
            input: "uri NULL (custom query)",
            setup: loose(&q(&asset(90)), "NULL", "NULL"),
            cleanup: "DELETE FROM loose_rows".to_owned(),
            expected: "uri is empty",
        },
        RowCase {
            input: "asset_id stored as an integer (custom query)",
            setup: loose("12345", &q(&page(90)), "NULL"),
            cleanup: "DELETE FROM loose_rows".to_owned(),
            expected: "stored as a BLOB or number",
        },
        RowCase {
            input: "additional that is not valid UTF-8, on a new row (nothing is created)",
            setup: cms(&q(&asset(90)), &q(&page(90)), "CAST(X'6E6FFF' AS TEXT)"),
            cleanup: delete_cms.to_owned(),
            expected: "additional is not valid UTF-8",
        },
        RowCase {
            input: "additional with a control character, on a new row (nothing is created)",
            setup: cms(&q(&asset(90)), &q(&page(90)), "'a' || char(27) || 'b'"),
            cleanup: delete_cms.to_owned(),
            expected: "additional contains a control character",
        },
        RowCase {
            input: "additional that is not valid UTF-8, on a synced row (its usage is kept)",
            setup: set_note(2, "CAST(X'6E6FFF' AS TEXT)"),
            cleanup: set_note(2, "'fine'"),
            expected: "additional is not valid UTF-8",
        },
        RowCase {
            input: "additional of 1025 characters, on a synced row (its usage is kept)",
            setup: set_note(3, &q(&"n".repeat(1025))),
            cleanup: set_note(3, "'fine'"),
            expected: "additional is longer than 1024 characters",
        },
    ];
    for n in 1..=3 {
        app.exec(&format!("INSERT INTO kept VALUES ('{}')", asset(n)))
            .await;
    }
    let tried = cases.len();
    for (i, case) in cases.into_iter().enumerate() {
        // The same run also has a good change to make: the bad row must not hold it back.
        let n = 100 + i as u32;
        app.insert(&asset(n), &page(n), Some("new")).await;
        app.exec(&format!("INSERT INTO kept VALUES ('{}')", asset(n)))
            .await;
        valid.push((asset(n), page(n), "new".to_owned()));
        valid.sort();
        app.exec(&case.setup).await;
        let out = app.run_env(&["resync"], &env).await;
        let text = stdout(&out);
        let converged = app.ours() == valid;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {text}{}",
            case.input,
            stderr(&out)
        );
        assert!(
            text.contains(case.expected) && text.contains(", 1 skipped"),
            "{}: {text}",
            case.input
        );
        assert!(converged, "{}: {:?} != {valid:?}", case.input, app.ours());
        catalogue(case.input, case.expected, out.status.code(), SAME_RUN);
        app.exec(&case.cleanup).await;
    }
    // With every bad row gone, nothing is left to do: nothing was queued for them meanwhile.
    app.portal.reset_counters();
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(app.portal.counters().total, 0, "{}", stdout(&out));
    println!("figures: bad_rows_tried={tried}");
}

#[tokio::test]
async fn duplicate_rows_from_a_custom_query_are_reported_and_sent_once() {
    let app = spawn_app_with(per_usage()).await;
    for n in 1..=3 {
        app.insert(&asset(n), &page(n), Some("note")).await;
    }
    // The table's primary key forbids duplicates; a custom query can still produce them.
    let query = format!(
        "SELECT asset_id, uri, additional FROM cms_asset_references \
         UNION ALL SELECT asset_id, uri, additional FROM cms_asset_references WHERE asset_id <> '{}'",
        asset(3)
    );
    let out = app
        .run_env(&["resync"], &[("BYNDER_USAGE_SYNC_SOURCE__QUERY", &query)])
        .await;
    let text = stdout(&out);
    let converged = app.ours() == app.desired().await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        text.contains("another row has the same asset_id and uri") && text.contains("2 skipped"),
        "{text}"
    );
    assert!(converged, "{:?}", app.ours());
    assert_eq!(
        route(&app, "POST /api/media/usage/"),
        3,
        "one create per distinct row"
    );
    catalogue(
        "duplicate rows (custom query with UNION ALL)",
        "another row has the same asset_id and uri",
        out.status.code(),
        "each key sent once; valid rows converged in the same run",
    );
}

/// REGRESSION: when a custom query returned two rows for one (asset_id, uri) with different
/// notes, the note used was whichever row the query happened to return first, so the same data
/// stored in another physical order made the next run "update" the usage to the other note.
#[tokio::test]
async fn duplicate_rows_with_different_notes_pick_the_same_note_whatever_the_row_order() {
    let app = spawn_app_with(per_usage()).await;
    // An image used twice on one page, with two captions: a realistic source of duplicates.
    app.exec("CREATE TABLE captions (asset_id TEXT, uri TEXT, caption TEXT)")
        .await;
    let fill = |order: [&'static str; 2]| {
        let mut sql = "DELETE FROM captions;".to_owned();
        for caption in order {
            sql += &format!(
                "INSERT INTO captions VALUES ('{}', '{}', '{caption}');",
                asset(1),
                page(1)
            );
        }
        sql + &format!(
            "INSERT INTO captions VALUES ('{}', '{}', 'single');",
            asset(2),
            page(2)
        )
    };
    let env = [(
        "BYNDER_USAGE_SYNC_SOURCE__QUERY",
        "SELECT asset_id, uri, caption AS additional FROM captions",
    )];
    app.exec(&fill(["hero", "gallery"])).await;
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let first = app.ours();
    assert_eq!(first.len(), 2, "{first:?}");

    // Same rows, stored the other way round.
    app.exec(&fill(["gallery", "hero"])).await;
    app.portal.reset_counters();
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        app.portal.counters().total,
        0,
        "the same rows must plan nothing: {}",
        stdout(&out)
    );
    assert_eq!(app.ours(), first);
    catalogue(
        "duplicate rows with different notes, stored in another physical order",
        "another row has the same asset_id and uri",
        out.status.code(),
        "the same note wins every run; nothing re-sent",
    );
}

// ---- uris ------------------------------------------------------------------------------------

/// Uris that break naive encoding: reserved characters, percent signs, plus versus space,
/// fragments, emoji, right-to-left text, the two Unicode forms of one visible string.
fn tricky_uris() -> Vec<&'static str> {
    vec![
        "https://cms.example/search?q=a&lang=de",
        "https://cms.example/search?q=a",
        "https://cms.example/page#section-2",
        "https://cms.example/100%25-sure",
        "https://cms.example/100%-sure",
        "https://cms.example/a+b",
        "https://cms.example/a b",
        "https://cms.example/x?a=1&b=%26&c=%2B&d=",
        "https://cms.example/semi;colon=1,comma/",
        "https://cms.example/emoji/🖼️/👩‍👩‍👧",
        "https://cms.example/ar/صفحة-الرئيسية",
        "https://cms.example/\u{200F}rtl-mark",
        "https://cms.example/caf\u{e9}",
        "https://cms.example/cafe\u{301}",
        "urn:cms:page:42",
        "/relative/path?x=1&y=2",
    ]
}

#[tokio::test]
async fn reserved_and_unicode_characters_in_uris_reach_the_portal_byte_exact_per_usage() {
    tricky_uris_round_trip("per_usage").await;
}

#[tokio::test]
async fn reserved_and_unicode_characters_in_uris_reach_the_portal_byte_exact_with_the_sync_endpoint(
) {
    tricky_uris_round_trip("sync_endpoint").await;
}

async fn tricky_uris_round_trip(strategy: &str) {
    let app = spawn_app_with(Setup {
        sync: format!("strategy = \"{strategy}\"\nbatch_size = 5"),
        ..Setup::default()
    })
    .await;
    let uris = tricky_uris();
    let notes = [
        "hero & teaser + more #1 100%",
        "تعليق",
        "🙂\twith a tab",
        "a=b&c=d",
    ];
    for (i, uri) in uris.iter().enumerate() {
        app.insert(&asset(1), uri, Some(notes[i % notes.len()]))
            .await;
        // The same uri on a second asset.
        if i % 3 == 0 {
            app.insert(&asset(2), uri, None).await;
        }
    }
    let out = app.resync_expecting(0).await;
    let created = app.ours() == app.desired().await;

    // Deleting "…?q=a&lang=de" must not touch "…?q=a"; "a+b" must not touch "a b".
    for uri in [uris[0], uris[5], uris[12]] {
        sqlx::query("DELETE FROM cms_asset_references WHERE uri = ?")
            .bind(uri)
            .execute(&app.pool)
            .await
            .unwrap();
    }
    app.exec("UPDATE cms_asset_references SET additional = 'changed ?&#%+' WHERE rowid % 2 = 0")
        .await;
    app.resync_expecting(0).await;
    let changed = app.ours() == app.desired().await;
    // Read back from the portal (the GET's answer), the uris match the table exactly too.
    let verify = app
        .run(&["resync", "--verify", "--detailed-exitcode"])
        .await;
    assert!(created, "after creating");
    assert!(changed, "after deleting and updating");
    app.assert_converged().await;
    assert!(
        app.ours().iter().any(|(_, u, _)| u == uris[1])
            && app.ours().iter().any(|(_, u, _)| u == uris[6]),
        "the neighbours of deleted uris survive"
    );
    assert_eq!(
        verify.status.code(),
        Some(0),
        "no drift found: {}",
        stdout(&verify)
    );
    catalogue(
        &format!("uris with ?, &, #, %, +, inner spaces, emoji, RTL text, NFC/NFD ({strategy})"),
        "(none: valid, sent byte-exact)",
        out.status.code(),
        "created, updated and deleted byte-exact; neighbours untouched; --verify finds no drift",
    );
}

// ---- databases -------------------------------------------------------------------------------

#[tokio::test]
async fn a_corrupt_database_file_exits_78_naming_the_file_and_sends_nothing() {
    let app = spawn_app().await;
    for n in 0..3 {
        app.insert(&asset(n), &page(n), None).await;
    }
    app.pool.close().await;
    let good = std::fs::read(&app.db_path).unwrap();
    let garbage: Vec<u8> = (0..16384u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cms = app.dir.path().join("cms.sqlite");
    std::fs::write(&cms, &garbage).unwrap();
    let cms_env = cms.display().to_string();
    let truncated = &good[..good.len().min(2048)];
    let cases: [(&str, &[u8], Env, &str); 3] = [
        (
            "state database of garbage bytes",
            &garbage,
            vec![],
            "file is not a database",
        ),
        (
            "state database truncated to 2 KiB",
            truncated,
            vec![],
            "malformed",
        ),
        (
            "source.database of garbage bytes",
            &good,
            vec![("BYNDER_USAGE_SYNC_SOURCE__DATABASE", cms_env.as_str())],
            "file is not a database",
        ),
    ];
    let mut lines = Vec::new();
    for (input, state, env, fragment) in cases {
        remove_wal(&app.db_path);
        std::fs::write(&app.db_path, state).unwrap();
        let out = app.run_env(&["resync"], &env).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{input}: {err}");
        let file = if env.is_empty() {
            "state.db"
        } else {
            "cms.sqlite"
        };
        assert!(
            err.contains(fragment) && err.contains(file) && err.contains("Fix:"),
            "{input}: {err}"
        );
        assert_eq!(app.portal.counters().total, 0, "{input}: nothing is sent");
        lines.push((input, fragment, out.status.code()));
    }
    // The good file back: everything goes through.
    remove_wal(&app.db_path);
    std::fs::write(&app.db_path, &good).unwrap();
    let out = app.resync_expecting(0).await;
    assert!(stdout(&out).contains("3 create(s)"), "{}", stdout(&out));
    assert_eq!(app.portal.usages_for(INTEGRATION).len(), 3);
    for (input, fragment, code) in lines {
        catalogue(input, fragment, code, AFTER_FIX);
    }
}

fn remove_wal(db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// Clears the immutable attribute again, even when the test fails, so the temp folder can go.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

fn opens_for_writing(path: &Path) -> bool {
    std::fs::OpenOptions::new().write(true).open(path).is_ok()
}

/// Makes `path` unwritable for this process: a 0444 mode, and for root (whom modes do not stop)
/// the immutable attribute. None when neither works here (root without CAP_LINUX_IMMUTABLE, or
/// a file system without attributes).
fn make_read_only(path: &Path) -> Option<Option<Immutable>> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
    if !opens_for_writing(path) {
        return Some(None);
    }
    let chattr = std::process::Command::new("chattr")
        .arg("+i")
        .arg(path)
        .output();
    let guard = Immutable(path.to_owned());
    match chattr {
        Ok(out) if out.status.success() && !opens_for_writing(path) => Some(Some(guard)),
        _ => None,
    }
}

#[tokio::test]
async fn a_read_only_database_file_exits_78_with_a_clear_message_and_loses_nothing() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    app.resync_expecting(0).await;
    app.insert(&asset(2), &page(2), None).await;
    app.pool.close().await;
    app.portal.reset_counters();
    let Some(guard) = make_read_only(&app.db_path) else {
        println!(
            "catalogue: input=\"read-only state database\" NOT TRIED: neither the file mode nor \
             the immutable attribute stops this process from writing (root without \
             CAP_LINUX_IMMUTABLE?)"
        );
        return;
    };
    let out = app.run(&["resync"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let out_code = out.status.code();
    assert!(
        err.contains("state.db")
            && err.contains("the file is read-only for this process")
            && err.contains("Fix:"),
        "{err}"
    );
    assert_eq!(app.portal.counters().total, 0, "nothing is sent");

    // Writable again: the change the CMS made meanwhile goes through.
    drop(guard);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app.db_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = app.resync_expecting(0).await;
    assert!(stdout(&out).contains("1 create(s)"), "{}", stdout(&out));
    assert_eq!(app.portal.usages_for(INTEGRATION).len(), 2);
    catalogue(
        "read-only state database file",
        "the file is read-only for this process",
        out_code,
        AFTER_FIX,
    );
}

#[tokio::test]
async fn a_custom_query_that_fails_while_rows_are_read_stops_before_anything_is_sent() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), Some(r#"{"note": "one"}"#))
        .await;
    app.resync_expecting(0).await;
    // Compiles (so the start-up check passes) but fails on a row: json_extract of a non-JSON note.
    app.insert(&asset(2), &page(2), Some("not json")).await;
    let query = "SELECT asset_id, uri, json_extract(additional, '$.note') AS additional \
                 FROM cms_asset_references";
    let env = [("BYNDER_USAGE_SYNC_SOURCE__QUERY", query)];
    app.portal.reset_counters();
    let out = app.run_env(&["resync"], &env).await;
    let err = stderr(&out);
    // Exit 1: the failure surfaces mid-run, past the start-up check that maps to 78.
    assert_eq!(out.status.code(), Some(1), "{err}");
    let out_code = out.status.code();
    assert!(
        err.contains("source.query") && err.contains("malformed JSON"),
        "{err}"
    );
    assert_eq!(
        app.portal.counters().total,
        0,
        "nothing is sent, above all no delete"
    );
    let out = app.run(&["queue", "list"]).await;
    assert!(
        stdout(&out).contains("the queue is empty"),
        "{}",
        stdout(&out)
    );
    // Fixed data: the run goes through.
    app.exec(&format!(
        r#"UPDATE cms_asset_references SET additional = '{{"note": "two"}}' WHERE asset_id = '{}'"#,
        asset(2)
    ))
    .await;
    let out = app.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        app.ours(),
        vec![
            (asset(1), page(1), "one".to_owned()),
            (asset(2), page(2), "two".to_owned())
        ]
    );
    catalogue(
        "custom source.query that fails on a row while it is read",
        "source.query",
        out_code,
        AFTER_FIX,
    );
}

// ---- configuration ---------------------------------------------------------------------------

#[tokio::test]
async fn a_config_with_unknown_keys_or_wrong_types_exits_78_naming_the_key() {
    let app = spawn_app().await;
    app.insert(&asset(1), &page(1), None).await;
    let good = std::fs::read_to_string(&app.config_path).unwrap();
    let in_section = |section: &str, line: &str| {
        good.replacen(
            &format!("[{section}]\n"),
            &format!("[{section}]\n{line}\n"),
            1,
        )
    };
    let cases: Vec<(&str, String, Env, &str)> = vec![
        (
            "misspelt key sync.uri_prefix",
            in_section("sync", "uri_prefix = [\"https://cms.example/\"]"),
            vec![],
            "unknown key `sync.uri_prefix",
        ),
        (
            "unknown section [synk]",
            format!("{good}\n[synk]\nstrategy = \"auto\"\n"),
            vec![],
            "unknown key `synk",
        ),
        (
            "limits.concurrency = \"many\"",
            good.replace("[limits]\n", "[limits]\nconcurrency = \"many\"\n"),
            vec![],
            "limits.concurrency",
        ),
        (
            "retry.initial_backoff = \"soon\"",
            good.replace("initial_backoff = \"10ms\"", "initial_backoff = \"soon\""),
            vec![],
            "retry.initial_backoff",
        ),
        (
            "bynder.timeout = 30 (a number, not a duration)",
            good.replace("timeout = \"2s\"", "timeout = 30"),
            vec![],
            "bynder.timeout",
        ),
        (
            "sync.strategy = \"fastest\"",
            in_section("sync", "strategy = \"fastest\""),
            vec![],
            "sync.strategy",
        ),
        (
            "sync.max_deletes = -5",
            in_section("sync", "max_deletes = -5"),
            vec![],
            "sync.max_deletes",
        ),
        (
            "sync.uri_prefixes = \"https://cms.example/\" (a string, not a list)",
            in_section("sync", "uri_prefixes = \"https://cms.example/\""),
            vec![],
            "sync.uri_prefixes",
        ),
        (
            "env BYNDER_USAGE_SYNC_LIMITS__CONCURRENCY=many",
            good.clone(),
            vec![("BYNDER_USAGE_SYNC_LIMITS__CONCURRENCY", "many")],
            "limits.concurrency",
        ),
        (
            "env BYNDER_USAGE_SYNC_SYNC__URI_PREFIX (unknown key)",
            good.clone(),
            vec![("BYNDER_USAGE_SYNC_SYNC__URI_PREFIX", "x")],
            "sync.uri_prefix",
        ),
    ];
    let bad = app.dir.path().join("bad.toml");
    let mut lines = Vec::new();
    let tried = cases.len();
    for (input, text, env, fragment) in cases {
        std::fs::write(&bad, &text).unwrap();
        let out = binary()
            .arg("--config")
            .arg(&bad)
            .arg("resync")
            .envs(env)
            .output()
            .await
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{input}: {err}");
        assert!(
            err.contains(fragment) && err.contains("Fix:"),
            "{input}: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{input}: one message: {err}"
        );
        lines.push((input, fragment, out.status.code()));
    }
    assert_eq!(app.portal.counters().total, 0, "nothing was sent");
    // The good config: the row waiting all along goes through.
    app.resync_expecting(0).await;
    app.assert_converged().await;
    for (input, fragment, code) in lines {
        catalogue(input, fragment, code, AFTER_FIX);
    }
    println!("figures: bad_configs_tried={tried}");
}

// ---- a broken portal -------------------------------------------------------------------------

/// What the broken portal answers, always with status 200.
#[derive(Clone, Copy, Debug)]
enum Garbage {
    Html,
    TruncatedJson,
    EmptyBody,
    /// Well-formed JSON of the wrong shape.
    UnexpectedObject,
}

impl Garbage {
    const ALL: [Garbage; 4] = [
        Garbage::Html,
        Garbage::TruncatedJson,
        Garbage::EmptyBody,
        Garbage::UnexpectedObject,
    ];

    fn answer(self) -> Response {
        let (content_type, body) = match self {
            Garbage::Html => (
                "text/html",
                "<!DOCTYPE html><html><body><h1>Scheduled maintenance</h1></body></html>",
            ),
            Garbage::TruncatedJson => ("application/json", r#"{"id": "5f1c0a"#),
            Garbage::EmptyBody => ("application/json", ""),
            Garbage::UnexpectedObject => ("application/json", r#"{"status": "ok"}"#),
        };
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response()
    }
}

/// Which requests the broken portal spoils, and whether the simulated portal applies them first.
#[derive(Clone)]
struct Spoil {
    /// Requests whose query or body contain this text.
    marker: String,
    garbage: Garbage,
    /// True: the change is applied, only the answer is garbage (a lost answer). False: nothing
    /// is applied (a broken gateway answering for the portal).
    applied: bool,
}

struct Relay {
    upstream: String,
    http: reqwest::Client,
    spoil: Mutex<Option<Spoil>>,
    spoiled: AtomicU64,
}

/// A portal in front of the simulated one that passes requests through, except those it spoils.
struct BrokenPortal {
    base_url: String,
    relay: Arc<Relay>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for BrokenPortal {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl BrokenPortal {
    async fn start(upstream: String) -> BrokenPortal {
        let relay = Arc::new(Relay {
            upstream,
            http: reqwest::Client::new(),
            spoil: Mutex::new(None),
            spoiled: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(relay_request)
            .with_state(relay.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        BrokenPortal {
            base_url,
            relay,
            server,
        }
    }

    fn spoil(&self, spoil: Option<Spoil>) {
        *self.relay.spoil.lock().unwrap() = spoil;
    }

    fn spoiled(&self) -> u64 {
        self.relay.spoiled.load(Ordering::SeqCst)
    }
}

async fn relay_request(
    axum::extract::State(relay): axum::extract::State<Arc<Relay>>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let spoil =
        relay.spoil.lock().unwrap().clone().filter(|s| {
            path.contains(&s.marker) || String::from_utf8_lossy(&body).contains(&s.marker)
        });
    let forward = spoil.as_ref().is_none_or(|s| s.applied);
    let mut answer = None;
    if forward {
        let mut request = relay
            .http
            .request(parts.method.clone(), format!("{}{path}", relay.upstream));
        for (name, value) in &parts.headers {
            if name != header::HOST && name != header::CONTENT_LENGTH {
                request = request.header(name, value);
            }
        }
        answer = Some(match request.body(body).send().await {
            Ok(response) => {
                let status = response.status();
                let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
                let bytes = response.bytes().await.unwrap_or_default();
                let mut out = (status, bytes).into_response();
                if let Some(ct) = content_type {
                    out.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                out
            }
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        });
    }
    match (spoil, answer) {
        (Some(spoil), _) => {
            relay.spoiled.fetch_add(1, Ordering::SeqCst);
            spoil.garbage.answer()
        }
        (None, Some(answer)) => answer,
        (None, None) => unreachable!("unspoiled requests are always forwarded"),
    }
}

#[tokio::test]
async fn a_portal_answering_200_with_html_or_garbage_keeps_that_operation_queued_per_usage() {
    let cases = Garbage::ALL
        .into_iter()
        .flat_map(|g| [(g, true), (g, false)])
        .map(|(garbage, applied)| broken_answers_per_usage(garbage, applied));
    futures::future::join_all(cases).await;
}

async fn broken_answers_per_usage(garbage: Garbage, applied: bool) {
    let app = spawn_app_with(per_usage()).await;
    let broken = BrokenPortal::start(app.portal.base_url()).await;
    let via_broken = [(
        "BYNDER_USAGE_SYNC_BYNDER__BASE_URL",
        broken.base_url.as_str(),
    )];
    for n in 1..=4 {
        app.insert(&asset(n), &page(n), Some("note")).await;
    }
    broken.spoil(Some(Spoil {
        marker: asset(2),
        garbage,
        applied,
    }));
    let out = app.run_env(&["resync"], &via_broken).await;
    let input = format!(
        "portal answers 200 with {garbage:?} for one asset (per_usage, change {})",
        if applied { "applied" } else { "not applied" }
    );
    let others_done = app.ours().iter().filter(|(a, _, _)| *a != asset(2)).count() == 3;
    let code = out.status.code();
    assert_eq!(code, Some(3), "{input}: {}{}", stdout(&out), stderr(&out));
    assert!(broken.spoiled() > 0, "{input}: the broken portal answered");
    assert!(
        stdout(&out).contains("1 still queued"),
        "{input}: {}",
        stdout(&out)
    );
    assert!(others_done, "{input}: the other rows went through");
    let list = stdout(&app.run(&["queue", "list"]).await);
    assert!(
        list.contains(&asset(2)) && list.contains("could not be understood"),
        "{input}: {list}"
    );
    // The portal answers properly again: one usage for the spoiled asset, never two.
    broken.spoil(None);
    let out = app.run_env(&["resync"], &via_broken).await;
    assert_eq!(out.status.code(), Some(0), "{input}: {}", stderr(&out));
    app.assert_converged().await;
    catalogue(
        &input,
        "the portal's answer could not be understood",
        code,
        "other rows converged in the same run; that one stayed queued, then converged without a duplicate",
    );
}

#[tokio::test]
async fn a_portal_answering_200_with_html_or_garbage_keeps_the_batch_queued_with_the_sync_endpoint()
{
    let cases = Garbage::ALL
        .into_iter()
        .flat_map(|g| [(g, true), (g, false)])
        .map(|(garbage, applied)| broken_answers_sync(garbage, applied));
    futures::future::join_all(cases).await;
}

async fn broken_answers_sync(garbage: Garbage, applied: bool) {
    let app = spawn_app_with(Setup {
        // One uri per batch: the spoiled batch is that of one asset.
        sync: "strategy = \"sync_endpoint\"\nbatch_size = 1".to_owned(),
        ..Setup::default()
    })
    .await;
    let broken = BrokenPortal::start(app.portal.base_url()).await;
    let via_broken = [(
        "BYNDER_USAGE_SYNC_BYNDER__BASE_URL",
        broken.base_url.as_str(),
    )];
    for n in 1..=4 {
        app.insert(&asset(n), &page(n), Some("note")).await;
    }
    broken.spoil(Some(Spoil {
        marker: asset(2),
        garbage,
        applied,
    }));
    let out = app.run_env(&["resync"], &via_broken).await;
    let input = format!(
        "portal answers 200 with {garbage:?} for one batch (sync_endpoint, change {})",
        if applied { "applied" } else { "not applied" }
    );
    let others_done = app.ours().iter().filter(|(a, _, _)| *a != asset(2)).count() == 3;
    assert!(broken.spoiled() > 0, "{input}: the broken portal answered");
    assert!(others_done, "{input}: the other batches went through");
    broken.spoil(None);
    let code = out.status.code();
    assert_eq!(code, Some(3), "{input}: {}{}", stdout(&out), stderr(&out));
    let list = stdout(&app.run(&["queue", "list"]).await);
    assert!(
        list.contains(&asset(2)) && list.contains("could not be understood"),
        "{input}: {list}"
    );
    let out = app.run_env(&["resync"], &via_broken).await;
    assert_eq!(out.status.code(), Some(0), "{input}: {}", stderr(&out));
    app.assert_converged().await;
    catalogue(
        &input,
        "the portal's answer could not be understood",
        code,
        "other batches converged in the same run; that one stayed queued, then converged without a duplicate",
    );
}

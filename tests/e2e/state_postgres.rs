//! `database.url`: the state and the CMS table in PostgreSQL, through the binary, against a real
//! server the tests start themselves (see `databases`): what only that backend has (the what-if
//! copy in a schema of its own, the run lock as an advisory lock, `backup` pointing at the
//! server's tools, the password apart).

use std::time::Duration;

use bynder_usage_sync::simulator::{Options, SyncAnswer, SyncSemantics};
use rand::{Rng, SeedableRng};
use sqlx::Connection as _;

use crate::common::*;
use crate::daemon::{daemon_sections, daemon_setup, eventually, per_usage_daemon_setup, Daemon};
use crate::databases::{Postgres, DB_PASSWORD};
use crate::reliability::rounds_or;

/// An app whose state (and CMS table) is the PostgreSQL database `state` of `pg`, migrated.
pub struct PgApp {
    pub app: App,
    pub cms: sqlx::PgPool,
    pub url: String,
}

pub async fn spawn_pg_app(pg: &Postgres, setup: Setup) -> PgApp {
    spawn_pg_app_as(pg, setup, "postgres", "").await
}

/// [`spawn_pg_app`] connecting as `user`, with `database` keys `extra` beside the url.
async fn spawn_pg_app_as(pg: &Postgres, setup: Setup, user: &str, extra: &str) -> PgApp {
    let admin = sqlx::PgPool::connect(&pg.admin_url("postgres"))
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'state')")
            .fetch_one(&admin)
            .await
            .unwrap();
    if !exists {
        sqlx::query("CREATE DATABASE state")
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let app = spawn_app_with(setup).await;
    let url = format!("postgres://{user}@127.0.0.1:{}/state", pg.port);
    let config = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "[database]\npath = \"state.db\"",
        &format!("[database]\nurl = \"{url}\"\n{extra}"),
    );
    std::fs::write(&app.config_path, config).unwrap();
    let out = app.run(&["migrate"]).await;
    assert_eq!(out.status.code(), Some(0), "migrate: {}", stderr(&out));
    let cms = sqlx::PgPool::connect(&pg.admin_url("state")).await.unwrap();
    PgApp { app, cms, url }
}

impl PgApp {
    pub async fn exec(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.cms)
            .await
            .unwrap();
    }

    pub async fn insert(&self, asset_id: &str, uri: &str, additional: &str) {
        sqlx::query(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ($1, $2, $3)",
        )
        .bind(asset_id)
        .bind(uri)
        .bind(additional)
        .execute(&self.cms)
        .await
        .unwrap();
    }

    pub async fn desired(&self) -> Vec<(String, String, String)> {
        let mut rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT asset_id, uri, coalesce(additional, '') FROM cms_asset_references",
        )
        .fetch_all(&self.cms)
        .await
        .unwrap();
        rows.sort();
        rows
    }

    pub async fn assert_converged(&self) {
        assert_eq!(self.app.ours(), self.desired().await);
    }
}

#[tokio::test]
async fn a_postgres_state_database_syncs_follows_changes_and_sends_nothing_once_converged() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    // `migrate` made the CMS table as documented.
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'cms_asset_references' ORDER BY ordinal_position",
    )
    .fetch_all(&app.cms)
    .await
    .unwrap();
    assert_eq!(
        columns,
        [
            ("asset_id".into(), "text".into()),
            ("uri".into(), "text".into()),
            ("additional".into(), "text".into()),
            ("updated_at".into(), "timestamp with time zone".into())
        ]
    );
    for n in 0..30 {
        app.insert(&asset(n), &page(n % 7), "note").await;
    }
    app.app.resync_expecting(0).await;
    app.assert_converged().await;
    app.app.portal.reset_counters();
    let out = app.app.resync_expecting(0).await;
    assert_eq!(app.app.portal.counters().total, 0, "{}", stdout(&out));

    // A note changed, a row moved, a row deleted, an id written in another case.
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'changed' WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    app.exec(&format!(
        "UPDATE cms_asset_references SET uri = '{}' WHERE asset_id = '{}'",
        page(40),
        asset(2)
    ))
    .await;
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(3)
    ))
    .await;
    app.exec(&format!(
        "UPDATE cms_asset_references SET asset_id = lower(asset_id) WHERE asset_id = '{}'",
        asset(4)
    ))
    .await;
    app.app.resync_expecting(0).await;
    let ours = app.app.ours();
    assert_eq!(ours.len(), 29);
    assert!(ours.contains(&(asset(1), page(1), "changed".into())));
    assert!(ours.contains(&(asset(2), page(40), "note".into())));
    assert!(!ours.iter().any(|u| u.0 == asset(3)));
    // One usage per asset ignoring case: the re-cased row is the same usage, left alone.
    assert_eq!(
        ours.iter()
            .filter(|u| u.0.eq_ignore_ascii_case(&asset(4)))
            .count(),
        1
    );

    let out = app.app.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("127.0.0.1"), "{}", stdout(&out));
}

#[tokio::test]
async fn a_what_if_verify_on_postgres_changes_nothing_and_leaves_no_copy_behind() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    for n in 0..5 {
        app.insert(&asset(n), &page(n), "note").await;
    }
    app.app.resync_expecting(0).await;
    let removed = app.app.portal.usages_for(INTEGRATION)[0].clone();
    app.app.portal.remove_usage(&removed.id);
    let before = app.app.ours();

    let out = app.app.run(&["resync", "--verify", "--dry-run"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(app.app.ours(), before, "a dry run sends nothing");
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bynder_usage_sync_what_if%'",
    )
    .fetch_one(&app.cms)
    .await
    .unwrap();
    assert_eq!(copies, 0, "the what-if copy is dropped");

    app.app.run(&["resync", "--verify"]).await;
    app.assert_converged().await;
}

/// A dry run killed mid-way leaves its copy behind (a schema holding every table): the next
/// what-if drops each copy no live process holds, and leaves alone the one another dry run
/// still uses.
#[tokio::test]
async fn a_what_if_drops_the_copies_dead_dry_runs_left_and_keeps_one_in_use() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    app.insert(&asset(1), &page(1), "note").await;
    app.app.resync_expecting(0).await;
    let (left, in_use) = (
        "bynder_usage_sync_what_if_4242_1764000000000",
        "bynder_usage_sync_what_if_4343_1764000000001",
    );
    for schema in [left, in_use] {
        app.exec(&format!("CREATE SCHEMA {schema}")).await;
        app.exec(&format!(
            "CREATE TABLE {schema}.recorded_usages (LIKE recorded_usages INCLUDING ALL)"
        ))
        .await;
    }
    // Another dry run, alive, holds its copy's lock.
    let mut other = sqlx::PgConnection::connect(&pg.admin_url("state"))
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(1112866819, hashtext($1))")
        .bind(in_use)
        .execute(&mut other)
        .await
        .unwrap();

    let out = app.app.run(&["resync", "--verify", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let copies: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'bynder_usage_sync_what_if%'",
    )
    .fetch_all(&app.cms)
    .await
    .unwrap();
    assert_eq!(copies, vec![in_use.to_owned()]);
    other.close().await.unwrap();
    let out = app.app.run(&["resync", "--verify", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bynder_usage_sync_what_if%'",
    )
    .fetch_one(&app.cms)
    .await
    .unwrap();
    assert_eq!(copies, 0, "once its dry run is gone, that copy goes too");
}

#[tokio::test]
async fn a_resync_waits_for_the_advisory_run_lock_and_names_its_holder() {
    let pg = Postgres::start();
    let app = spawn_pg_app(
        &pg,
        Setup {
            extra: String::new(),
            ..Setup::default()
        },
    )
    .await;
    let config = std::fs::read_to_string(&app.app.config_path)
        .unwrap()
        .replace(
            &format!("url = \"{}\"\n", app.url),
            &format!("url = \"{}\"\nlock_timeout = \"1s\"\n", app.url),
        );
    std::fs::write(&app.app.config_path, config).unwrap();
    app.insert(&asset(1), &page(1), "note").await;
    // Someone else holds the run lock: a session of its own, named like a daemon would be.
    let mut holder = sqlx::PgConnection::connect(&pg.admin_url("state"))
        .await
        .unwrap();
    sqlx::query("SELECT set_config('application_name', 'the other daemon', false)")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(1112866817, hashtext(current_schema()))")
        .execute(&mut holder)
        .await
        .unwrap();
    let out = app.app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the other daemon"),
        "{}",
        stderr(&out)
    );
    assert!(
        app.app.ours().is_empty(),
        "nothing was sent under another's lock"
    );

    // Released (its session ends): the next resync runs.

    holder.close().await.unwrap();
    app.app.resync_expecting(0).await;
    app.assert_converged().await;
}

#[tokio::test]
async fn backup_of_a_postgres_state_database_names_the_servers_own_tools() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    let target = app.app.dir.path().join("copy.db");
    let out = app.app.run(&["backup", target.to_str().unwrap()]).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("pg_dump"), "{}", stderr(&out));
    assert!(!target.exists());
}

#[tokio::test]
async fn the_state_databases_password_comes_from_its_file_and_never_shows() {
    let pg = Postgres::start();
    let admin = sqlx::PgPool::connect(&pg.admin_url("postgres"))
        .await
        .unwrap();
    for sql in [
        "CREATE DATABASE state".to_owned(),
        format!("CREATE ROLE cms_pw LOGIN PASSWORD '{DB_PASSWORD}'"),
        "ALTER DATABASE state OWNER TO cms_pw".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let app = spawn_pg_app_as(
        &pg,
        Setup::default(),
        "cms_pw",
        &format!("password_file = \"{}\"\n", password_file.display()),
    )
    .await;
    app.insert(&asset(1), &page(1), "note").await;
    let out = app.app.resync_expecting(0).await;
    app.assert_converged().await;
    let shown = app.app.run(&["config", "show"]).await;
    for text in [stdout(&out), stderr(&out), stdout(&shown), stderr(&shown)] {
        assert!(!text.contains(DB_PASSWORD), "the password leaked: {text}");
    }

    // A password written into the url itself is refused (the config is shown and logged).
    let config = std::fs::read_to_string(&app.app.config_path)
        .unwrap()
        .replace(
            "postgres://cms_pw@",
            &format!("postgres://cms_pw:{}@", DB_PASSWORD.replace('#', "%23")),
        );
    std::fs::write(&app.app.config_path, config).unwrap();
    let out = app.app.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("database.password_file"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&DB_PASSWORD.replace('#', "%23")));
}

#[tokio::test]
async fn database_url_and_database_path_together_are_a_config_error() {
    let app = spawn_app().await;
    let config = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "[database]\npath = \"state.db\"",
        "[database]\npath = \"state.db\"\nurl = \"postgres://sync@127.0.0.1:5432/state\"",
    );
    std::fs::write(&app.config_path, config).unwrap();
    let out = app.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("database.url"), "{}", stderr(&out));
    assert!(stderr(&out).contains("database.path"), "{}", stderr(&out));
}

/// Which of `daemons` says it leads, once exactly one does and every other stands by, ready.
async fn leader_among(daemons: &[Daemon]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut leaders = Vec::new();
        let mut standing_by = 0;
        for (i, d) in daemons.iter().enumerate() {
            let (code, body) = d.get("/readyz").await;
            if body.contains("\"role\":\"leader\"") {
                leaders.push(i);
            } else if code == 200 && body.contains("\"role\":\"standby\"") {
                standing_by += 1;
            }
        }
        if leaders.len() == 1 && standing_by == daemons.len() - 1 {
            return leaders[0];
        }
        assert!(leaders.len() <= 1, "two daemons lead at once: {leaders:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no single leader with the others standing by; logs:\n{}",
            daemons
                .iter()
                .map(|d| d.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Daemons reconciling every second with one request per usage (a create is not idempotent
/// there, so a create sent twice shows as a duplicate usage), against a portal answering after
/// `latency`, at `rate` requests a second, with `grace` as `daemon.shutdown_timeout`.
fn per_usage_daemons(latency: Duration, rate: u32, grace: &str) -> Setup {
    Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            latency,
            ..Options::default()
        },
        limits: format!("requests_per_second = {rate}\nconcurrency = 4"),
        extra: daemon_sections(grace),
        ..per_usage_daemon_setup()
    }
}

#[tokio::test]
async fn two_daemons_share_one_postgres_database_and_the_survivor_of_a_kill_converges_without_duplicates(
) {
    fail_over(
        per_usage_daemons(Duration::from_millis(5), 1000, "5s"),
        rounds_or(4),
        25,
    )
    .await;
}

/// The same fail-over where Bynder's documentation leaves the most open, all at once: a sync
/// that keeps the assets a request leaves out (literal), answered 204 with nothing to read, and
/// usages listed without an asset id. What the dead leader had in flight is settled by reading
/// it back, never by trusting an answer.
#[tokio::test]
async fn fail_over_on_a_literal_portal_that_answers_sync_with_204_converges_by_read_back() {
    fail_over(
        Setup {
            sync: "schedule = \"*/1 * * * * *\"\nstrategy = \"sync_endpoint\"\nbatch_size = 4"
                .to_owned(),
            portal: Options {
                permanent_tokens: vec![TOKEN.to_owned()],
                latency: Duration::from_millis(5),
                sync_semantics: SyncSemantics::Literal,
                sync_answer: SyncAnswer::NoContent,
                list_without_asset_id: true,
                ..Options::default()
            },
            limits: "requests_per_second = 1000\nconcurrency = 4".to_owned(),
            ..daemon_setup()
        },
        rounds_or(2),
        // Killed within its first requests, so every round falls mid-run.
        3,
    )
    .await;
}

/// Two `run` daemons on one database under `setup`: for `rounds` rounds the CMS writes, the
/// leader is killed after fewer than `kill_within` of its requests, more rows arrive, and the
/// survivor must converge with no duplicate and no lost change; a new replica joins each time.
async fn fail_over(setup: Setup, rounds: usize, kill_within: u64) {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, setup).await;
    app.app
        .portal
        .seed_usage(OTHER_INTEGRATION, &asset(900), &page(900), "theirs");
    let seed: u64 = rand::random();
    println!("fail-over test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut daemons = vec![Daemon::start(&app.app).await, Daemon::start(&app.app).await];
    let mut next_row = 0;
    let mut kills_mid_run = 0;
    for round in 0..rounds {
        let leader = leader_among(&daemons).await;
        // The CMS writes while the leader sends: new rows, a changed note, a removed row.
        for _ in 0..30 {
            app.insert(
                &asset(next_row),
                &page(next_row % 9),
                &format!("round {round}"),
            )
            .await;
            next_row += 1;
        }
        if round > 0 {
            app.exec(&format!(
                "UPDATE cms_asset_references SET additional = 'changed in {round}' WHERE asset_id = '{}'",
                asset(rng.random_range(0..next_row - 30))
            ))
            .await;
            app.exec(&format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                asset(rng.random_range(0..next_row - 30))
            ))
            .await;
        }
        // Killed after a random number of its requests (or once it has nothing left to send).
        let before = app.app.portal.counters().total;
        let kill_after = rng.random_range(0..kill_within);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while app.app.portal.counters().total < before + kill_after
            && app.app.ours() != app.desired().await
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kills_mid_run += usize::from(app.app.ours() != app.desired().await);
        let mut killed = daemons.remove(leader);
        killed.child.start_kill().unwrap();
        killed.child.wait().await.unwrap();
        // More rows arrive while nobody leads.
        for _ in 0..10 {
            app.insert(&asset(next_row), &page(next_row % 9), "after the kill")
                .await;
            next_row += 1;
        }
        let survivor = &daemons[0];
        eventually(
            survivor,
            "the survivor takes over and converges",
            Duration::from_secs(60),
            || async { app.app.ours() == app.desired().await },
        )
        .await;
        assert_eq!(
            app.app.others().len(),
            1,
            "another integration's usage is never touched"
        );
        // A new replica joins, as a supervisor would restart the killed one.
        daemons.push(Daemon::start(&app.app).await);
    }
    println!("figures: fail-over rounds={rounds} kills_mid_run={kills_mid_run} duplicates_found=0 losses_found=0");
    assert!(
        kills_mid_run > 0,
        "no leader was killed while it had work left"
    );
    assert_eq!(
        leader_among(&daemons).await,
        0,
        "the survivor keeps leading"
    );
    for daemon in daemons {
        let (status, _, _) = daemon.terminate(Duration::from_secs(10)).await;
        assert!(status.success());
    }
}

#[tokio::test]
async fn on_postgres_a_cms_write_reaches_bynder_through_change_capture_not_the_schedule() {
    let pg = Postgres::start();
    // The default schedule (every 5 minutes) never comes within this test.
    let app = spawn_pg_app(
        &pg,
        Setup {
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    app.insert(&asset(1), &page(1), "hero").await;
    let daemon = Daemon::start(&app.app).await;
    let converged = || async { app.app.ours() == app.desired().await };
    eventually(
        &daemon,
        "the reconcile at start-up",
        Duration::from_secs(20),
        converged,
    )
    .await;
    for (what, sql) in [
        (
            "an insert",
            format!(
                "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ('{}', '{}', 'teaser')",
                asset(2),
                page(2)
            ),
        ),
        (
            "a changed note",
            format!(
                "UPDATE cms_asset_references SET additional = 'hero, resized' WHERE asset_id = '{}'",
                asset(1)
            ),
        ),
        (
            "a move",
            format!(
                "UPDATE cms_asset_references SET uri = '{}' WHERE asset_id = '{}'",
                page(3),
                asset(2)
            ),
        ),
        (
            "a delete",
            format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                asset(1)
            ),
        ),
    ] {
        app.exec(&sql).await;
        eventually(&daemon, what, Duration::from_secs(10), converged).await;
    }
    let changes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE command = 'changes' AND outcome = 'converged'",
    )
    .fetch_one(&app.cms)
    .await
    .unwrap();
    assert!(changes >= 1, "change runs sent them, not the schedule");
    eventually(
        &daemon,
        "the change log settled",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM cms_changes")
                .fetch_one(&app.cms)
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    let (status, _, _) = daemon.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

/// The daemon's sessions that LISTEN for the capture trigger's notifications.
async fn listening_sessions(cms: &sqlx::PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'state' \
         AND query LIKE 'LISTEN \"bynder_usage_sync_changes\"%'",
    )
    .fetch_all(cms)
    .await
    .unwrap()
}

/// On PostgreSQL the daemon is told of every committed CMS write (LISTEN on the channel the
/// capture trigger notifies) instead of polling the log ten times a second; when that session
/// is cut it listens again, and no write waits for the schedule meanwhile.
#[tokio::test]
async fn on_postgres_the_daemon_listens_for_cms_writes_and_listens_again_when_cut_off() {
    let pg = Postgres::start();
    // The default schedule (every 5 minutes) never comes within this test.
    let app = spawn_pg_app(
        &pg,
        Setup {
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    let daemon = Daemon::start(&app.app).await;
    let converged = || async { app.app.ours() == app.desired().await };
    let listening = || async { listening_sessions(&app.cms).await.len() == 1 };
    eventually(
        &daemon,
        "one session listens",
        Duration::from_secs(20),
        listening,
    )
    .await;
    app.insert(&asset(1), &page(1), "told").await;
    eventually(
        &daemon,
        "a write arrives",
        Duration::from_secs(10),
        converged,
    )
    .await;

    let cut: Vec<i32> = listening_sessions(&app.cms).await;
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(cut[0])
        .fetch_one(&app.cms)
        .await
        .unwrap();
    assert!(ended);
    app.insert(&asset(2), &page(2), "written while nobody listens")
        .await;
    eventually(
        &daemon,
        "a write arrives while the listener is cut off",
        Duration::from_secs(10),
        converged,
    )
    .await;
    eventually(
        &daemon,
        "it listens again, on a new session",
        Duration::from_secs(20),
        || async {
            let now = listening_sessions(&app.cms).await;
            now.len() == 1 && now != cut
        },
    )
    .await;
    app.insert(&asset(3), &page(3), "told again").await;
    eventually(
        &daemon,
        "a write arrives once it listens again",
        Duration::from_secs(10),
        converged,
    )
    .await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE command = 'reconcile'")
        .fetch_one(&app.cms)
        .await
        .unwrap();
    assert_eq!(
        runs, 1,
        "only the reconcile at start-up: change runs sent the writes"
    );
    let (status, _, _) = daemon.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

#[tokio::test]
async fn a_leader_whose_lock_session_is_cut_off_stops_and_the_standby_takes_over() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, daemon_setup()).await;
    app.insert(&asset(1), &page(1), "note").await;
    let mut daemons = vec![Daemon::start(&app.app).await, Daemon::start(&app.app).await];
    let leader = leader_among(&daemons).await;
    // The standby's status page says it stands by and who leads; `status` names the leader.
    let (code, status_page) = daemons[1 - leader].get("/").await;
    assert_eq!(code, 200);
    assert!(
        status_page.contains("standby") && status_page.contains("bynder-usage-sync pid"),
        "{status_page}"
    );
    let out = app.app.run(&["status"]).await;
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("Leader:") && l.contains("bynder-usage-sync pid")),
        "{}",
        stdout(&out)
    );
    // The server ends the leader's lock session, as a network cut or a restart would.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(a.pid) FROM pg_locks AS l \
         JOIN pg_stat_activity AS a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1112866818) AS t",
    )
    .fetch_one(&app.cms)
    .await
    .unwrap();
    assert_eq!(ended, 1, "one session holds the leader lock");
    let cut_off = daemons.remove(leader);
    let (status, log) = cut_off.exited(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("lost its leader lock"), "{log}");
    // The other one leads now and keeps the portal in step.
    assert_eq!(leader_among(&daemons).await, 0);
    app.insert(&asset(2), &page(2), "after the cut").await;
    eventually(
        &daemons[0],
        "the new leader converges",
        Duration::from_secs(30),
        || async { app.app.ours() == app.desired().await },
    )
    .await;
    let (status, _, _) = daemons.remove(0).terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

/// A TCP relay to a PostgreSQL server that can go silent, as a network that drops every packet
/// would: once cut, it forwards nothing either way and closes nothing, so neither end hears of
/// it. Dropping it closes every connection, as the server's keep-alive ends them in the end.
struct Relay {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, silent) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
                    .await
                    .unwrap();
                let mut silent = silent.clone();
                connections.spawn(async move {
                    let (mut client_in, mut client_out) = client.into_split();
                    let (mut server_in, mut server_out) = server.into_split();
                    let forward = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut client_in, &mut server_out) => {}
                            _ = tokio::io::copy(&mut server_in, &mut client_out) => {}
                        }
                    };
                    let went_silent = tokio::select! {
                        () = forward => false,
                        _ = silent.wait_for(|cut| *cut) => true,
                    };
                    if went_silent {
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Relay { port, cut, task }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// REGRESSION: a leader that lost its lock gave its requests in flight the whole
/// `daemon.shutdown_timeout` (30 s by default), so it could still be sending when the server
/// freed the lock (about 20 s) and another daemon led.
///
/// A lost machine, as the leader sees it: its connections to the state database go silent, with
/// no reset and no close, while it has usages to send. It notices on its own (its lock's session
/// stops answering), stops sending at once rather than after `daemon.shutdown_timeout` (another
/// daemon may lead by now), and exits 1; until the server ends its sessions the standby still
/// stands by; then the standby leads and converges with no duplicate.
#[tokio::test]
async fn a_leader_whose_network_goes_silent_stops_on_its_own_before_the_standby_can_lead() {
    let pg = Postgres::start();
    let app = spawn_pg_app(
        &pg,
        // Slowly, so the leader has plenty in flight when it is cut off, and a grace far longer
        // than a leader may go on sending once it cannot know who leads.
        per_usage_daemons(Duration::from_millis(100), 5, "120s"),
    )
    .await;
    let relay = Relay::start(pg.port).await;
    let through_relay = format!("postgres://postgres@127.0.0.1:{}/state", relay.port);
    let leader = Daemon::start_env(
        &app.app,
        &[("BYNDER_USAGE_SYNC_DATABASE__URL", &through_relay)],
    )
    .await;
    assert_eq!(leader_among(std::slice::from_ref(&leader)).await, 0);
    let standby = Daemon::start(&app.app).await;
    let daemons = [leader, standby];
    assert_eq!(leader_among(&daemons).await, 0);
    let [leader, standby] = daemons;
    for n in 0..60 {
        app.insert(&asset(n), &page(n % 7), "sent while the network fails")
            .await;
    }
    eventually(
        &leader,
        "the leader sends",
        Duration::from_secs(30),
        || async { app.app.portal.counters().total >= 3 },
    )
    .await;
    relay.cut();
    let (status, log) = leader.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("lost its leader lock"), "{log}");
    assert!(
        !log.contains("after daemon.shutdown_timeout"),
        "a leader that lost its lock gave its requests the shutdown grace:\n{log}"
    );
    // The server still counts the silent sessions as alive: nobody else may lead yet.
    let (code, body) = standby.get("/readyz").await;
    assert!(
        code == 200 && body.contains("\"role\":\"standby\""),
        "{body}"
    );
    assert_ne!(
        app.app.ours(),
        app.desired().await,
        "the leader was cut off mid-way"
    );

    // The server ends the silent sessions (its keep-alive would, about 20 s on): the standby leads.
    drop(relay);
    let daemons = [standby];
    assert_eq!(leader_among(&daemons).await, 0);
    let [standby] = daemons;
    eventually(
        &standby,
        "the new leader converges with no duplicate",
        Duration::from_secs(60),
        || async { app.app.ours() == app.desired().await },
    )
    .await;
    let (status, _, _) = standby.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

/// Sessions ever opened on the database `state`: a standby opens one for each try at the
/// leader lock.
async fn sessions_opened(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = 'state'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Only the leader sends (Bynder's limit is per IP, and replicas share one): a daemon that finds
/// the leader lock held by another session stands by, ready, naming the holder, and sends
/// nothing while CMS rows wait and its schedule comes round, however many times it tries the
/// lock; the moment the lock is free it leads and converges.
#[tokio::test]
async fn a_daemon_that_finds_the_leader_lock_taken_sends_nothing_until_the_lock_is_free() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, daemon_setup()).await;
    for n in 0..5 {
        app.insert(&asset(n), &page(n), "waiting").await;
    }
    // Another replica leads: a session of its own holds the leader lock of this schema.
    let mut other = sqlx::PgConnection::connect(&pg.admin_url("state"))
        .await
        .unwrap();
    sqlx::query(
        "SELECT set_config('application_name', 'bynder-usage-sync pid 4242 on host-b', false)",
    )
    .execute(&mut other)
    .await
    .unwrap();
    let taken: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock(1112866818, hashtext(current_schema()))")
            .fetch_one(&mut other)
            .await
            .unwrap();
    assert!(taken);

    let daemon = Daemon::start(&app.app).await;
    eventually(
        &daemon,
        "the daemon stands by, ready, naming the leader",
        Duration::from_secs(30),
        || async {
            let (code, body) = daemon.get("/readyz").await;
            code == 200 && body.contains("\"role\":\"standby\"") && body.contains("pid 4242")
        },
    )
    .await;
    // Three more tries at the lock (a session each), with the schedule due every second and a
    // change waiting: still not one request.
    let tried_from = sessions_opened(&app.cms).await;
    app.insert(&asset(9), &page(9), "written while it stands by")
        .await;
    eventually(
        &daemon,
        "the standby tries the lock three more times",
        Duration::from_secs(60),
        || async {
            assert_eq!(
                app.app.portal.counters().total,
                0,
                "a standby sent a request:\n{}",
                daemon.log()
            );
            sessions_opened(&app.cms).await >= tried_from + 3
        },
    )
    .await;
    let (code, body) = daemon.get("/readyz").await;
    assert!(
        code == 200 && body.contains("\"role\":\"standby\""),
        "{body}"
    );
    assert_eq!(app.app.portal.counters().total, 0);

    // The other replica is gone: its session ends, the lock is free.
    other.close().await.unwrap();
    assert_eq!(leader_among(std::slice::from_ref(&daemon)).await, 0);
    eventually(
        &daemon,
        "the new leader converges",
        Duration::from_secs(30),
        || async { app.app.ours() == app.desired().await },
    )
    .await;
    let (status, _, _) = daemon.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

/// REGRESSION: in PostgreSQL a CMS transaction that took its log entry's number first can
/// commit after a later one was planned; the watcher took an entry below the last one it had
/// seen for "nothing new", and the row waited for the schedule.
#[tokio::test]
async fn on_postgres_a_cms_transaction_that_commits_out_of_order_still_reaches_bynder_at_once() {
    let pg = Postgres::start();
    let app = spawn_pg_app(
        &pg,
        Setup {
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    app.insert(&asset(0), &page(0), "before").await;
    let daemon = Daemon::start(&app.app).await;
    let converged = || async { app.app.ours() == app.desired().await };
    eventually(
        &daemon,
        "the reconcile at start-up",
        Duration::from_secs(20),
        converged,
    )
    .await;
    let change_runs = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM runs WHERE command = 'changes' AND finished_at IS NOT NULL",
        )
        .fetch_one(&app.cms)
        .await
        .unwrap()
    };
    // The slow transaction writes first (the lower entry number) and commits last.
    let mut slow = app.cms.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ($1, $2, 'slow')",
    )
    .bind(asset(1))
    .bind(page(1))
    .execute(&mut *slow)
    .await
    .unwrap();
    app.insert(&asset(2), &page(2), "fast").await;
    eventually(
        &daemon,
        "the fast row in Bynder, by a change run",
        Duration::from_secs(10),
        || async { app.app.ours().iter().any(|u| u.0 == asset(2)) && change_runs().await == 1 },
    )
    .await;
    slow.commit().await.unwrap();
    eventually(
        &daemon,
        "the slow row in Bynder",
        Duration::from_secs(10),
        converged,
    )
    .await;
    let (status, _, _) = daemon.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

#[tokio::test]
async fn a_state_server_that_refuses_exits_1_and_a_wrong_database_exits_78_naming_database_url() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    let config = std::fs::read_to_string(&app.app.config_path).unwrap();
    // Nothing listens on the port any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    for (url, code) in [
        (format!("postgres://postgres@127.0.0.1:{closed}/state"), 1),
        (
            format!("postgres://postgres@127.0.0.1:{}/no_such_db", pg.port),
            78,
        ),
    ] {
        std::fs::write(&app.app.config_path, config.replace(&app.url, &url)).unwrap();
        let out = app.app.run(&["resync"]).await;
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains("database.url"), "{}", stderr(&out));
        let error = stderr(&out)
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            error.matches("Fix:").count(),
            1,
            "one error, one fix: {error}"
        );
    }
}

/// Other commands in between (each opens the store, which makes sure capture is in place) leave
/// the fingerprint alone; a write or a dropped trigger does not.
#[tokio::test]
async fn on_postgres_if_changed_skips_the_merge_only_while_nothing_can_have_changed() {
    let pg = Postgres::start();
    let app = spawn_pg_app(&pg, Setup::default()).await;
    for n in 1..=5 {
        app.insert(&asset(n), &page(n), "note").await;
    }
    app.app.resync_expecting(0).await;
    let if_changed = || async {
        let out = app.app.run(&["resync", "--if-changed", "--json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["plan"].clone()
    };
    // Other commands in between open the store too.
    app.app.run(&["status"]).await;
    let plan = if_changed().await;
    assert!(plan["unchanged_since"].is_string(), "{plan}");
    assert_eq!(plan["rows_read"], 0);
    let plan = if_changed().await;
    assert!(plan["unchanged_since"].is_string(), "{plan}");

    // A write through the triggers: the merge runs.
    app.insert(&asset(6), &page(6), "new").await;
    let plan = if_changed().await;
    assert!(plan["unchanged_since"].is_null(), "{plan}");
    assert_eq!(plan["creates"], 1);
    // A trigger dropped behind the daemon's back: the merge runs, and the trigger is back.
    app.exec("DROP TRIGGER cms_changes_after_update ON cms_asset_references")
        .await;
    let plan = if_changed().await;
    assert!(plan["unchanged_since"].is_null(), "{plan}");
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'cms_asset_references'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&app.cms)
    .await
    .unwrap();
    assert_eq!(triggers, 4, "the three that log, and the one that notifies");
}

/// What the README advises when a site moves to a PostgreSQL state database: the new state knows
/// none of the usages Bynder already holds, so the first sync duplicates them; one verify then
/// leaves exactly the CMS rows.
#[tokio::test]
async fn a_new_postgres_state_beside_usages_bynder_already_holds_is_set_right_by_one_verify() {
    let pg = Postgres::start();
    let app = spawn_pg_app(
        &pg,
        Setup {
            sync: "strategy = \"per_usage\"".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    for n in 0..6 {
        // What the old SQLite-backed daemon had created.
        app.app
            .portal
            .seed_usage(INTEGRATION, &asset(n), &page(n), "note");
        app.insert(&asset(n), &page(n), "note").await;
    }
    app.app.resync_expecting(0).await;
    assert_eq!(app.app.ours().len(), 12, "each usage created a second time");
    let out = app.app.run(&["resync", "--verify"]).await;
    assert!(
        matches!(out.status.code(), Some(0) | Some(2)),
        "{}",
        stderr(&out)
    );
    app.assert_converged().await;
}

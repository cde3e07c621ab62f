//! The main scenarios on both state backends: the state (and the CMS table) in a SQLite file
//! (`database.path`) and in a PostgreSQL database (`database.url`). Each scenario is one async
//! fn taking the [`Backend`]; [`on_both!`] makes a module of it with the tests `on_sqlite` and
//! `on_postgres`, so `cargo test --test e2e backends::` runs them all and `on_postgres` picks
//! one half.
//!
//! The PostgreSQL tests share one throwaway cluster (see `databases`), started by the first of
//! them and stopped when the last one still holding it ends; each test gets a database of its
//! own on it, owned by a role that is not a superuser. The SQL the tests run on the CMS table is
//! valid in both dialects.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::{PgPool, SqlitePool};

use crate::common::*;
use crate::daemon::{daemon_sections, eventually, Daemon};
use crate::databases::{Postgres, DB_PASSWORD};
use bynder_usage_sync::simulator::{Faults, Options, Simulator, Usage};

// ---- the harness ---------------------------------------------------------------------------

/// Where the daemon keeps its state and the CMS its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The role owning each test's PostgreSQL database: it can log in, and nothing more.
const OWNER: &str = "sync_owner";
/// The role that must give a password (`pg_hba.conf` of [`Postgres`]): [`DB_PASSWORD`].
const PASSWORD_ROLE: &str = "cms_pw";

/// The cluster the PostgreSQL tests share while at least one of them holds it.
static CLUSTER: OnceLock<tokio::sync::Mutex<Weak<Postgres>>> = OnceLock::new();
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

/// The shared cluster, started (with the roles the tests use) when no test holds one.
async fn cluster() -> Arc<Postgres> {
    let mut shared = CLUSTER
        .get_or_init(|| tokio::sync::Mutex::new(Weak::new()))
        .lock()
        .await;
    if let Some(pg) = shared.upgrade() {
        return pg;
    }
    let pg = Arc::new(Postgres::start());
    let admin = PgPool::connect(&pg.admin_url("postgres")).await.unwrap();
    for sql in [
        format!("CREATE ROLE {OWNER} LOGIN"),
        format!("CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{DB_PASSWORD}'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    *shared = Arc::downgrade(&pg);
    pg
}

/// A new, empty database on `pg` owned by `owner`; its name.
async fn fresh_database(pg: &Postgres, owner: &str) -> String {
    let name = format!("state_{}", NEXT_DATABASE.fetch_add(1, Ordering::Relaxed));
    let admin = PgPool::connect(&pg.admin_url("postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} OWNER {owner}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    name
}

/// The config file of the suite (as `common::spawn_app_with` writes it), with `database` as the
/// `[database]` section's body.
fn config_text(setup: &Setup, base_url: &str, database: &str) -> String {
    format!(
        "[bynder]\nbase_url = \"{base_url}\"\nintegration_id = \"{INTEGRATION}\"\nallow_insecure_http = true\ntimeout = \"{}\"\n\
         [auth]\n{}\n[database]\n{database}\n[sync]\n{}\n[retry]\n{}\n[limits]\n{}\n{}\n",
        setup.timeout, setup.auth, setup.sync, setup.retry, setup.limits, setup.extra
    )
}

/// The connection the tests write the CMS table through.
enum Cms {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An app on one backend: the portal, the config, and the CMS table in the database the config
/// names. Its `app` is the suite's [`App`] (for the daemon helpers); on PostgreSQL its SQLite
/// pool is an unused in-memory one, so read the CMS through these methods only.
pub struct On {
    pub backend: Backend,
    pub app: App,
    cms: Cms,
    /// The PostgreSQL database's url (on SQLite, `None`).
    pub url: Option<String>,
    /// Dropped last: the cluster outlives the connections to it.
    _cluster: Option<Arc<Postgres>>,
}

/// Starts a portal and an app whose state is on `backend`, migrated by the binary.
pub async fn spawn_on(backend: Backend, setup: Setup) -> On {
    match backend {
        Backend::Sqlite => {
            let app = spawn_app_with(setup).await;
            let cms = Cms::Sqlite(app.pool.clone());
            On {
                backend,
                app,
                cms,
                url: None,
                _cluster: None,
            }
        }
        Backend::Postgres => spawn_postgres(setup, OWNER, None, &[]).await,
    }
}

/// An app on a fresh PostgreSQL database owned by `role`; `password_file` goes into
/// `[database]` when given. With `env` holding `BYNDER_USAGE_SYNC_DATABASE__URL`, the url is
/// left out of the file (every later run must then pass `env` too).
async fn spawn_postgres(
    setup: Setup,
    role: &str,
    password_file: Option<&Path>,
    env: &[(&str, &str)],
) -> On {
    let pg = cluster().await;
    let name = fresh_database(&pg, role).await;
    let url = format!("postgres://{role}@127.0.0.1:{}/{name}", pg.port);
    let url_from_env = env
        .iter()
        .any(|(k, _)| *k == "BYNDER_USAGE_SYNC_DATABASE__URL");
    let mut database = String::new();
    if !url_from_env {
        database.push_str(&format!("url = \"{url}\"\n"));
    }
    if let Some(file) = password_file {
        database.push_str(&format!("password_file = \"{}\"\n", file.display()));
    }
    let portal = Simulator::start(setup.portal.clone())
        .await
        .expect("start the simulated portal");
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        config_text(&setup, &portal.base_url(), &database),
    )
    .unwrap();
    let app = App {
        pool: SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
        db_path: dir.path().join("state.db"),
        dir,
        portal,
        config_path,
    };
    let out = app.run_env(&["migrate"], env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "migrate on PostgreSQL failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    let cms = PgPool::connect(&pg.admin_url(&name)).await.unwrap();
    On {
        backend: Backend::Postgres,
        app,
        cms: Cms::Postgres(cms),
        url: Some(url),
        _cluster: Some(pg),
    }
}

/// `'a', 'b'` for an `IN (…)` list.
fn quoted(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn assets_where(n: impl IntoIterator<Item = u32>, keep: impl Fn(u32) -> bool) -> Vec<String> {
    n.into_iter().filter(|&n| keep(n)).map(asset).collect()
}

impl On {
    pub fn portal(&self) -> &Simulator {
        &self.app.portal
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.app.run(args).await
    }

    pub async fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.app.run_env(args, env).await
    }

    /// Runs `args` and asserts its exit code.
    pub async fn run_expecting(&self, args: &[&str], code: i32) -> Output {
        let out = self.run(args).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "{:?} {} `{}`\nstdout:\n{}\nstderr:\n{}",
            self.backend,
            self.url.as_deref().unwrap_or(""),
            args.join(" "),
            stdout(&out),
            stderr(&out)
        );
        out
    }

    pub async fn resync_expecting(&self, code: i32) -> Output {
        self.run_expecting(&["resync"], code).await
    }

    /// Runs a statement on the CMS database; the rows it touched.
    pub async fn exec(&self, sql: &str) -> u64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        let done = match &self.cms {
            Cms::Sqlite(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Cms::Postgres(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        };
        done.unwrap_or_else(|e| panic!("{:?}: {e}", self.backend))
    }

    pub async fn insert(&self, asset_id: &str, uri: &str, additional: Option<&str>) {
        self.insert_many(&[(
            asset_id.to_owned(),
            uri.to_owned(),
            additional.map(str::to_owned),
        )])
        .await;
    }

    /// Inserts the rows in one statement, as a CMS's bulk import would.
    pub async fn insert_many(&self, rows: &[(String, String, Option<String>)]) {
        let placeholders = (0..rows.len())
            .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES {placeholders}"
        );
        match &self.cms {
            Cms::Sqlite(pool) => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (a, u, d) in rows {
                    q = q.bind(a.clone()).bind(u.clone()).bind(d.clone());
                }
                q.execute(pool).await.unwrap();
            }
            Cms::Postgres(pool) => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (a, u, d) in rows {
                    q = q.bind(a.clone()).bind(u.clone()).bind(d.clone());
                }
                q.execute(pool).await.unwrap();
            }
        }
    }

    /// Inserts the row, or sets its note when the (asset, uri) row exists.
    pub async fn upsert(&self, asset_id: &str, uri: &str, additional: &str) {
        let sql =
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ($1, $2, $3) \
                   ON CONFLICT (asset_id, uri) DO UPDATE SET additional = excluded.additional";
        match &self.cms {
            Cms::Sqlite(pool) => {
                sqlx::query(sql)
                    .bind(asset_id)
                    .bind(uri)
                    .bind(additional)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            Cms::Postgres(pool) => {
                sqlx::query(sql)
                    .bind(asset_id)
                    .bind(uri)
                    .bind(additional)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    }

    /// The CMS table as (asset, uri, additional) sorted (in Rust: the databases' orders differ).
    pub async fn desired(&self) -> Vec<(String, String, String)> {
        let sql = "SELECT asset_id, uri, coalesce(additional, '') FROM cms_asset_references";
        let mut rows: Vec<(String, String, String)> = match &self.cms {
            Cms::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
            Cms::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        };
        rows.sort();
        rows
    }

    pub fn ours(&self) -> Vec<(String, String, String)> {
        self.app.ours()
    }

    pub fn others(&self) -> Vec<Usage> {
        self.app.others()
    }

    pub async fn converged(&self) -> bool {
        self.ours() == self.desired().await
    }

    /// Asserts the portal holds exactly the CMS table for our integration, with no duplicate.
    pub async fn assert_converged(&self) {
        assert_eq!(
            self.ours(),
            self.desired().await,
            "{:?}: the portal must hold exactly the CMS rows",
            self.backend
        );
    }

    /// Resyncs until one run exits 0 (faults may leave operations queued for the next run).
    async fn resync_until_converged(&self, max_runs: usize) {
        for _ in 0..max_runs {
            let out = self.run(&["resync"]).await;
            match out.status.code() {
                Some(0) => return,
                Some(1) | Some(3) => continue,
                other => panic!(
                    "{:?}: unexpected exit {other:?}:\n{}{}",
                    self.backend,
                    stdout(&out),
                    stderr(&out)
                ),
            }
        }
        panic!(
            "{:?}: no converging run within {max_runs} runs",
            self.backend
        );
    }

    /// The SQLite files in the app's folder.
    fn sqlite_files(&self) -> Vec<String> {
        std::fs::read_dir(self.app.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".db") || n.contains(".db-"))
            .collect()
    }
}

fn strategy_setup(strategy: &str) -> Setup {
    Setup {
        sync: format!("strategy = \"{strategy}\""),
        ..Setup::default()
    }
}

fn portal_with(options: Options) -> Options {
    Options {
        permanent_tokens: vec![TOKEN.to_owned()],
        ..options
    }
}

/// A module `$name` with the tests `on_sqlite` and `on_postgres`, each calling
/// `$scenario(backend, $args…)`. Also used by `portals` (`#[macro_use]` in `main.rs`).
macro_rules! on_both {
    ($name:ident, $scenario:ident $(, $arg:expr)*) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn on_sqlite() {
                $scenario(Backend::Sqlite $(, $arg)*).await
            }

            #[tokio::test]
            async fn on_postgres() {
                $scenario(Backend::Postgres $(, $arg)*).await
            }
        }
    };
}

// ---- first sync ----------------------------------------------------------------------------

on_both!(first_sync_per_usage, first_sync, "per_usage");
on_both!(
    first_sync_with_the_sync_endpoint,
    first_sync,
    "sync_endpoint"
);

/// 200 rows over 40 uris: one resync puts exactly them in the portal, and a second one, with
/// nothing changed, sends nothing. On PostgreSQL no SQLite file appears and the daemon's own
/// tables are in the database beside the CMS table.
async fn first_sync(backend: Backend, strategy: &str) {
    let on = spawn_on(backend, strategy_setup(strategy)).await;
    let rows: Vec<_> = (0..200)
        .map(|n| {
            (
                asset(n),
                page(n % 40),
                (n % 3 != 0).then(|| format!("note {n}")),
            )
        })
        .collect();
    on.insert_many(&rows).await;
    on.resync_expecting(0).await;
    on.assert_converged().await;
    assert_eq!(on.ours().len(), 200);

    on.portal().reset_counters();
    let out = on.resync_expecting(0).await;
    assert_eq!(
        on.portal().counters().total,
        0,
        "{backend:?} {strategy}: a resync with nothing changed sends nothing"
    );
    assert!(stdout(&out).contains("nothing to do"), "{}", stdout(&out));

    if let Cms::Postgres(pool) = &on.cms {
        assert_eq!(
            on.sqlite_files(),
            Vec::<String>::new(),
            "the state is in PostgreSQL, not in a SQLite file"
        );
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name <> 'cms_asset_references'",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(
            !tables.is_empty(),
            "the daemon's own tables are in the PostgreSQL database"
        );
    }
}

// ---- incremental changes -------------------------------------------------------------------

on_both!(incremental_per_usage, incremental, "per_usage");
on_both!(
    incremental_with_the_sync_endpoint,
    incremental,
    "sync_endpoint"
);

/// Rows added, notes changed (one to none), rows moved to another uri (a delete and an insert):
/// a resync sends exactly those changes, and another integration's usage on the same asset and
/// uri is never touched.
async fn incremental(backend: Backend, strategy: &str) {
    let on = spawn_on(backend, strategy_setup(strategy)).await;
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    let theirs = on.others();
    let rows: Vec<_> = (0..20)
        .map(|n| (asset(n), page(n % 5), Some(format!("v1 {n}"))))
        .collect();
    on.insert_many(&rows).await;
    on.resync_expecting(0).await;
    on.assert_converged().await;

    // Three added.
    for n in 100..103 {
        on.insert(&asset(n), &page(n), Some("added")).await;
    }
    // Two notes changed, one cleared.
    on.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'v2' WHERE asset_id IN ({})",
        quoted(&[asset(1), asset(2)])
    ))
    .await;
    on.exec(&format!(
        "UPDATE cms_asset_references SET additional = NULL WHERE asset_id = '{}'",
        asset(3)
    ))
    .await;
    // Two moved to another page.
    for n in [4, 5] {
        let moved = on
            .exec(&format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}' AND uri = '{}'",
                asset(n),
                page(n % 5)
            ))
            .await;
        assert_eq!(moved, 1);
        on.insert(&asset(n), &page(50 + n), Some("moved")).await;
    }
    // A dry run shows the plan and sends nothing.
    on.portal().reset_counters();
    let out = on.run_expecting(&["resync", "--dry-run"], 0).await;
    let text = stdout(&out);
    assert!(
        text.contains("5 create(s), 3 update(s), 2 delete(s)"),
        "{backend:?} {strategy}: {text}"
    );
    assert_eq!(on.portal().counters().total, 0);
    let out = on.resync_expecting(0).await;
    on.assert_converged().await;
    let text = stdout(&out);
    assert!(
        text.contains("5 create(s), 3 update(s), 2 delete(s)"),
        "{backend:?} {strategy}: {text}"
    );
    assert_eq!(on.ours().len(), 23);
    assert_eq!(
        on.others(),
        theirs,
        "another integration's usage is untouched"
    );
}

// ---- deletes and the mass-delete guard -----------------------------------------------------

on_both!(deletes_per_usage, deletes, "per_usage");
on_both!(deletes_with_the_sync_endpoint, deletes, "sync_endpoint");

/// Rows deleted from the CMS: a resync removes exactly their usages. A table emptied: the guard
/// refuses (exit 3, nothing sent) until `--allow-mass-delete`.
async fn deletes(backend: Backend, strategy: &str) {
    let on = spawn_on(
        backend,
        Setup {
            sync: format!("strategy = \"{strategy}\"\nmax_deletes = 4"),
            ..Setup::default()
        },
    )
    .await;
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(2), &page(2), "theirs");
    let rows: Vec<_> = (0..12).map(|n| (asset(n), page(n % 4), None)).collect();
    on.insert_many(&rows).await;
    on.resync_expecting(0).await;
    on.assert_converged().await;

    let gone = assets_where(0..12, |n| n % 4 == 2);
    let before = on.ours();
    assert_eq!(
        on.exec(&format!(
            "DELETE FROM cms_asset_references WHERE asset_id IN ({})",
            quoted(&gone)
        ))
        .await,
        3
    );
    let out = on.resync_expecting(0).await;
    assert!(stdout(&out).contains("3 delete(s)"), "{}", stdout(&out));
    let expected: Vec<_> = before
        .into_iter()
        .filter(|(a, _, _)| !gone.contains(a))
        .collect();
    assert_eq!(on.ours(), expected, "{backend:?}: exactly those went");
    on.assert_converged().await;

    // Everything deleted: refused, nothing sent.
    on.exec("DELETE FROM cms_asset_references").await;
    on.portal().reset_counters();
    let out = on.resync_expecting(3).await;
    assert!(
        stdout(&out).contains("--allow-mass-delete"),
        "{}",
        stdout(&out)
    );
    assert_eq!(on.portal().counters().total, 0, "no delete is sent");
    assert_eq!(on.ours().len(), 9);

    on.run_expecting(&["resync", "--allow-mass-delete"], 0)
        .await;
    assert!(on.ours().is_empty());
    assert_eq!(on.others().len(), 1, "theirs stays");
}

// ---- crashes -------------------------------------------------------------------------------

on_both!(killed_resyncs_per_usage, survives_kills, "per_usage", 6, 60);
on_both!(
    killed_resyncs_with_the_sync_endpoint,
    survives_kills,
    "sync_endpoint",
    6,
    10
);

/// SIGKILLs `rounds` resyncs, each after a random number (below `max_requests`) of requests
/// reached the portal, changing the CMS table between restarts; then a resync converges with no
/// duplicate and no lost row, and a last one has nothing to send. (`reliability.rs` runs the
/// long variant on SQLite.)
async fn survives_kills(backend: Backend, strategy: &str, rounds: usize, max_requests: u64) {
    let on = spawn_on(
        backend,
        Setup {
            sync: format!("strategy = \"{strategy}\"\nbatch_size = 4"),
            portal: portal_with(Options {
                latency: Duration::from_millis(2),
                ..Options::default()
            }),
            limits: "requests_per_second = 1000\nconcurrency = 4".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(3), &page(3), "theirs");
    let rows: Vec<_> = (0..40)
        .map(|n| (asset(n), page(n % 10), Some("v0".to_owned())))
        .collect();
    on.insert_many(&rows).await;
    let seed: u64 = rand::random();
    println!("kill test seed {seed} ({backend:?}, {strategy})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    for round in 0..rounds {
        let before = on.portal().counters().total;
        // Every round rewrites every note, so each run has many requests to make.
        on.exec(&format!(
            "UPDATE cms_asset_references SET additional = 'round {round}'"
        ))
        .await;
        let kill_after = rng.random_range(0..max_requests);
        let mut child = binary()
            .arg("--config")
            .arg(&on.app.config_path)
            .arg("resync")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The portal's request count is the signal; it has no notification to wait on.
        let killed = loop {
            if on.portal().counters().total >= before + kill_after {
                child.start_kill().unwrap();
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        child.wait().await.unwrap();
        kills += usize::from(killed);
        // The CMS keeps changing between restarts.
        let n = rng.random_range(0..50u32);
        match round % 3 {
            0 => {
                on.exec(&format!(
                    "UPDATE cms_asset_references SET additional = 'v{round}' WHERE asset_id IN ({})",
                    quoted(&assets_where(0..50, |m| m % 4 == n % 4))
                ))
                .await;
            }
            1 => {
                on.exec(&format!(
                    "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                    asset(n)
                ))
                .await;
            }
            _ => {
                on.upsert(&asset(n), &page(n % 10), &format!("r{round}"))
                    .await
            }
        }
    }
    // Half at least: with these few rounds a stricter share would fail now and then by chance
    // (`reliability.rs` holds the long variant to 80 %).
    assert!(
        kills * 2 >= rounds,
        "only {kills} of {rounds} runs were killed mid-way"
    );
    on.resync_expecting(0).await;
    on.assert_converged().await;
    assert_eq!(
        on.others().len(),
        1,
        "the other integration's usage survives"
    );
    on.portal().reset_counters();
    on.resync_expecting(0).await;
    assert_eq!(
        on.portal().counters().total,
        0,
        "{backend:?}: a last run has nothing left to do"
    );
}

// ---- faults --------------------------------------------------------------------------------

on_both!(faults_per_usage, converges_through_faults, "per_usage");
on_both!(
    faults_with_the_sync_endpoint,
    converges_through_faults,
    "sync_endpoint"
);

/// Server errors, dropped connections (before and after the change is applied) and answers
/// slower than the timeout: resyncs converge, first on a new table, then after changes.
async fn converges_through_faults(backend: Backend, strategy: &str) {
    let on = spawn_on(
        backend,
        Setup {
            sync: format!("strategy = \"{strategy}\"\nbatch_size = 3"),
            timeout: "300ms".to_owned(),
            retry: "initial_backoff = \"5ms\"\nmax_backoff = \"50ms\"\nmax_attempts = 8".to_owned(),
            limits: "requests_per_second = 1000\nconcurrency = 8".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(1), &page(1), "theirs");
    let rows: Vec<_> = (0..60)
        .map(|n| (asset(n), page(n % 15), Some("first".to_owned())))
        .collect();
    on.insert_many(&rows).await;
    on.portal().set_faults(Faults {
        server_error_rate: 0.2,
        drop_rate: 0.05,
        slow_rate: 0.03,
        slow_delay: Duration::from_millis(600),
        token_endpoint_down: false,
    });
    on.resync_until_converged(6).await;
    on.assert_converged().await;

    on.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'second' WHERE asset_id IN ({})",
        quoted(&assets_where(0..60, |n| n % 3 == 0))
    ))
    .await;
    on.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id IN ({})",
        quoted(&assets_where(0..60, |n| n % 5 == 1))
    ))
    .await;
    for n in 200..210 {
        on.insert(&asset(n), &page(n), None).await;
    }
    on.resync_until_converged(6).await;
    on.assert_converged().await;
    // About 30 requests at a fault rate of 28 %: none at all has a chance of about 1 in 20,000,
    // while "more than 3" failed about one run in 40.
    assert!(
        on.portal().counters().faults_injected > 0,
        "faults were really injected"
    );
    assert_eq!(on.others().len(), 1);
}

// ---- drift ---------------------------------------------------------------------------------

on_both!(drift_per_usage, drift_is_repaired_by_verify, "per_usage");
on_both!(
    drift_with_the_sync_endpoint,
    drift_is_repaired_by_verify,
    "sync_endpoint"
);

/// Usages removed, edited, added and duplicated by hand in the portal: a plain resync trusts its
/// records and sends nothing, `resync --verify` repairs them, and a second verify finds no
/// drift.
async fn drift_is_repaired_by_verify(backend: Backend, strategy: &str) {
    let on = spawn_on(
        backend,
        Setup {
            sync: format!("strategy = \"{strategy}\"\nuri_prefixes = [\"https://cms.example/\"]"),
            ..Setup::default()
        },
    )
    .await;
    for n in 0..6 {
        on.insert(&asset(n), &page(n), Some("note")).await;
    }
    on.resync_expecting(0).await;
    let ours = on.portal().usages_for(INTEGRATION);
    assert_eq!(ours.len(), 6);
    // By hand in Bynder: one usage removed, one note edited (removed and re-added), one extra
    // usage of ours, one duplicate; plus usages that are not ours to touch.
    let edited = ours.iter().find(|u| u.asset_id == asset(1)).unwrap();
    let removed = ours.iter().find(|u| u.asset_id == asset(0)).unwrap();
    assert!(on.portal().remove_usage(&removed.id));
    assert!(on.portal().remove_usage(&edited.id));
    on.portal()
        .seed_usage(INTEGRATION, &asset(1), &page(1), "edited by hand");
    on.portal().seed_usage(
        INTEGRATION,
        &asset(2),
        "https://cms.example/extra",
        "added by hand",
    );
    on.portal()
        .seed_usage(INTEGRATION, &asset(3), &page(3), "note");
    on.portal().seed_usage(
        INTEGRATION,
        &asset(4),
        "https://elsewhere.example/p",
        "outside our prefixes",
    );
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(5), &page(5), "theirs");

    on.portal().reset_counters();
    on.resync_expecting(0).await;
    assert_eq!(
        on.portal().counters().total,
        0,
        "a plain resync trusts its records"
    );

    let out = on
        .run_expecting(&["resync", "--verify", "--dry-run"], 0)
        .await;
    assert!(
        stdout(&out).contains("1 missing, 1 extra, 1 duplicated, 1 with a wrong note"),
        "{backend:?} {strategy}: {}",
        stdout(&out)
    );
    on.run_expecting(&["resync", "--verify"], 0).await;
    let mut expected = on.desired().await;
    expected.push((
        asset(4),
        "https://elsewhere.example/p".to_owned(),
        "outside our prefixes".to_owned(),
    ));
    expected.sort();
    assert_eq!(on.ours(), expected, "{backend:?} {strategy}");
    assert_eq!(on.others().len(), 1);
    on.run_expecting(&["resync", "--verify", "--detailed-exitcode"], 0)
        .await;
}

// ---- the daemon ----------------------------------------------------------------------------

on_both!(the_daemon, daemon_follows_the_cms_and_exits_0_on_sigterm);

/// `run` on a one-second schedule: it syncs the rows there at its start, then an insert, a
/// changed note and a delete made while it runs; SIGTERM stops it with exit 0.
async fn daemon_follows_the_cms_and_exits_0_on_sigterm(backend: Backend) {
    let on = spawn_on(
        backend,
        Setup {
            sync: "schedule = \"*/1 * * * * *\"".to_owned(),
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    on.insert(&asset(1), &page(1), Some("hero")).await;
    on.insert(&asset(2), &page(2), None).await;
    let daemon = Daemon::start(&on.app).await;
    eventually(
        &daemon,
        "the rows there at the start in the portal",
        Duration::from_secs(20),
        || on.converged(),
    )
    .await;
    assert_eq!(on.ours().len(), 2);

    on.insert(&asset(3), &page(3), Some("added while running"))
        .await;
    eventually(
        &daemon,
        "the row inserted while the daemon runs",
        Duration::from_secs(20),
        || on.converged(),
    )
    .await;
    assert!(on
        .ours()
        .contains(&(asset(3), page(3), "added while running".to_owned())));

    on.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'hero, moved' WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    on.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(2)
    ))
    .await;
    eventually(
        &daemon,
        "the edited note and the removal",
        Duration::from_secs(20),
        || on.converged(),
    )
    .await;
    assert_eq!(on.ours().len(), 2);

    let (status, _, log) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{backend:?} daemon log:\n{log}");
    assert!(!log.contains("ERROR"), "{backend:?} daemon log:\n{log}");
}

on_both!(killed_daemon, a_daemon_killed_and_restarted_converges);

/// `run` SIGKILLed at random points of its work (a few rounds, the CMS changing between them),
/// then restarted: it converges with no duplicate, leaves nothing queued, and SIGTERM exits 0.
/// (`daemon.rs` runs more rounds on SQLite.)
async fn a_daemon_killed_and_restarted_converges(backend: Backend) {
    let on = spawn_on(
        backend,
        Setup {
            portal: portal_with(Options {
                latency: Duration::from_millis(2),
                ..Options::default()
            }),
            sync: "schedule = \"*/1 * * * * *\"\nstrategy = \"per_usage\"".to_owned(),
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    on.portal()
        .seed_usage(OTHER_INTEGRATION, &asset(2), &page(2), "theirs");
    let rows: Vec<_> = (0..30)
        .map(|n| (asset(n), page(n % 6), Some("v0".to_owned())))
        .collect();
    on.insert_many(&rows).await;
    let seed: u64 = rand::random();
    println!("run kill test seed {seed} ({backend:?})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rounds = 6;
    let mut killed_mid_work = 0;
    for round in 0..rounds {
        // Every note changes, so each start has work to do.
        on.exec(&format!(
            "UPDATE cms_asset_references SET additional = 'round {round}'"
        ))
        .await;
        let before = on.portal().counters().total;
        let kill_after = rng.random_range(1..50u64);
        let mut daemon = Daemon::start(&on.app).await;
        // Polling, with a bound: the portal's request count has no change notification.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if on.portal().counters().total >= before + kill_after {
                killed_mid_work += 1;
                break;
            }
            if on.converged().await || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        daemon.child.start_kill().unwrap();
        daemon.child.wait().await.unwrap();
        let n = rng.random_range(0..40u32);
        if round % 2 == 0 {
            on.exec(&format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                asset(n)
            ))
            .await;
        } else {
            on.upsert(&asset(n), &page(n % 6), &format!("added {round}"))
                .await;
        }
    }
    // Half at least, as in `survives_kills` (`daemon.rs` holds 20 rounds to 75 %).
    assert!(
        killed_mid_work * 2 >= rounds,
        "only {killed_mid_work} of {rounds} runs were killed mid-work"
    );
    let daemon = Daemon::start(&on.app).await;
    eventually(
        &daemon,
        "the restarted daemon converges",
        Duration::from_secs(30),
        || on.converged(),
    )
    .await;
    let (status, _, log) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{backend:?} daemon log:\n{log}");
    on.assert_converged().await;
    let out = on.run_expecting(&["status", "--json"], 0).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queue"]["pending"], 0, "{v}");
    assert_eq!(v["queue"]["in_flight"], 0, "{v}");
    assert_eq!(
        on.others().len(),
        1,
        "the other integration's usage survives"
    );
}

on_both!(
    manual_resync_beside_the_daemon,
    a_manual_resync_beside_the_daemon_takes_turns
);

/// A manual `resync` while `run` is syncing the same new rows: the run lock (whatever holds it
/// on this backend) takes them in turn, and each usage is created exactly once.
async fn a_manual_resync_beside_the_daemon_takes_turns(backend: Backend) {
    let on = spawn_on(
        backend,
        Setup {
            portal: portal_with(Options {
                latency: Duration::from_millis(20),
                ..Options::default()
            }),
            sync: "schedule = \"*/1 * * * * *\"\nstrategy = \"per_usage\"".to_owned(),
            extra: daemon_sections("5s"),
            ..Setup::default()
        },
    )
    .await;
    let daemon = Daemon::start(&on.app).await;
    let rows: Vec<_> = (1..=30).map(|n| (asset(n), page(n), None)).collect();
    on.insert_many(&rows).await;
    on.run_expecting(&["resync"], 0).await;
    eventually(&daemon, "convergence", Duration::from_secs(20), || {
        on.converged()
    })
    .await;
    let creates = on
        .portal()
        .counters()
        .by_route
        .get("POST /api/media/usage/")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        creates, 30,
        "{backend:?}: each usage was created exactly once"
    );
    let (status, _, log) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{backend:?} daemon log:\n{log}");
}

// ---- status and the queue commands ---------------------------------------------------------

on_both!(status_and_queue, status_and_queue_commands);

/// A row the portal rejects becomes a dead letter: `status` (text and JSON) counts the rows, the
/// recorded usages and the queue, and names where the state is; `queue list --dead`, `queue
/// retry` and `queue purge --dead` work on it.
async fn status_and_queue_commands(backend: Backend) {
    let on = spawn_on(
        backend,
        Setup {
            portal: portal_with(Options {
                missing_assets: std::collections::HashSet::from([asset(2)]),
                ..Options::default()
            }),
            sync: "strategy = \"per_usage\"".to_owned(),
            ..Setup::default()
        },
    )
    .await;
    for n in 1..=3 {
        on.insert(&asset(n), &page(n), None).await;
    }
    on.resync_expecting(3).await;
    assert_eq!(on.ours().len(), 2);

    let out = on.run_expecting(&["status"], 0).await;
    let text = stdout(&out);
    assert!(text.contains("1 dead letter(s)"), "{backend:?}: {text}");
    match backend {
        Backend::Sqlite => assert!(text.contains("state.db"), "{text}"),
        Backend::Postgres => assert!(
            text.to_lowercase().contains("postgres") && !text.contains("state.db"),
            "status names the PostgreSQL database, not a SQLite file:\n{text}"
        ),
    }
    let out = on.run_expecting(&["status", "--json"], 0).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{backend:?}: status --json: {e}: {}", stdout(&out)));
    assert_eq!(v["cms_rows"], 3, "{v}");
    assert_eq!(v["recorded_usages"], 2, "{v}");
    assert_eq!(v["queue"]["pending"], 0, "{v}");
    assert_eq!(v["queue"]["dead"], 1, "{v}");
    assert!(
        v["runs"].as_array().is_some_and(|runs| !runs.is_empty()),
        "{v}"
    );

    let out = on.run_expecting(&["queue", "list", "--dead"], 0).await;
    assert!(stdout(&out).contains(&asset(2)), "{}", stdout(&out));
    let out = on.run_expecting(&["queue", "retry", "--all"], 0).await;
    assert!(
        stdout(&out).contains("1 dead letter(s) re-queued"),
        "{}",
        stdout(&out)
    );
    on.portal().reset_counters();
    on.resync_expecting(3).await;
    assert_eq!(
        on.portal().counters().total,
        1,
        "the retried letter was sent once more"
    );
    let out = on.run_expecting(&["queue", "purge", "--dead"], 0).await;
    assert!(
        stdout(&out).contains("1 dead letter(s) purged"),
        "{}",
        stdout(&out)
    );
    let out = on.run_expecting(&["status", "--json"], 0).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queue"]["dead"], 0, "{v}");
}

// ---- PostgreSQL only: the configuration ----------------------------------------------------

/// `migrate` creates the CMS table as the contract gives it: text keys, an optional note, a
/// timestamp the database fills in, and (asset_id, uri) as the primary key.
#[tokio::test]
async fn postgres_migrate_creates_the_cms_table_with_its_key_and_default() {
    let on = spawn_on(Backend::Postgres, Setup::default()).await;
    let Cms::Postgres(pool) = &on.cms else {
        unreachable!()
    };
    let columns: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text, column_default IS NOT NULL \
         FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'cms_asset_references' \
         ORDER BY ordinal_position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let found: Vec<_> = columns
        .iter()
        .map(|(c, t, n, d)| (c.as_str(), t.as_str(), n.as_str(), *d))
        .collect();
    for column in [
        ("asset_id", "text", "NO", false),
        ("uri", "text", "NO", false),
        ("additional", "text", "YES", false),
        ("updated_at", "timestamp with time zone", "NO", true),
    ] {
        assert!(found.contains(&column), "{column:?} in {found:?}");
    }
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = 'cms_asset_references'::regclass AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(key, ["asset_id", "uri"]);
    // The CMS may leave updated_at out.
    on.insert(&asset(1), &page(1), None).await;
    let filled: bool = sqlx::query_scalar(
        "SELECT updated_at > now() - interval '1 hour' FROM cms_asset_references",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(filled);
    // A second migrate changes nothing and succeeds.
    on.run_expecting(&["migrate"], 0).await;
    assert_eq!(on.desired().await.len(), 1);
}

/// Both keys in `[database]`: every command refuses the config before touching any database.
#[tokio::test]
async fn database_path_and_url_together_are_a_configuration_error() {
    let app = spawn_app().await;
    let config = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "path = \"state.db\"\n",
        "path = \"state.db\"\nurl = \"postgres://sync_owner@127.0.0.1:1/state\"\n",
    );
    assert!(config.contains("url = "), "{config}");
    std::fs::write(&app.config_path, config).unwrap();
    for args in [
        &["migrate"][..],
        &["resync"][..],
        &["status"][..],
        &["run"][..],
    ] {
        // A bound only so that a `run` which accepted the config fails instead of hanging.
        let out = tokio::time::timeout(Duration::from_secs(60), app.run(args))
            .await
            .unwrap_or_else(|_| panic!("{args:?} accepted the config and kept running"));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        assert!(
            err.contains("database.path") && err.contains("database.url"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(app.portal.counters().total, 0);
}

/// `BYNDER_USAGE_SYNC_DATABASE__URL` alone (no `[database]` key in the file) puts the state in
/// PostgreSQL.
#[tokio::test]
async fn postgres_database_url_from_the_environment() {
    // The url is only known once the database exists: make it first, then pass it.
    let pg = cluster().await;
    let name = fresh_database(&pg, OWNER).await;
    let url = format!("postgres://{OWNER}@127.0.0.1:{}/{name}", pg.port);
    let env = [("BYNDER_USAGE_SYNC_DATABASE__URL", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::default();
    let portal = Simulator::start(setup.portal.clone()).await.unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config_text(&setup, &portal.base_url(), "")).unwrap();
    let app = App {
        pool: SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
        db_path: dir.path().join("state.db"),
        dir,
        portal,
        config_path,
    };
    let on = On {
        backend: Backend::Postgres,
        cms: Cms::Postgres(PgPool::connect(&pg.admin_url(&name)).await.unwrap()),
        app,
        url: Some(url.clone()),
        _cluster: Some(pg),
    };
    let out = on.run_env(&["migrate"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    on.insert(&asset(1), &page(1), Some("from env")).await;
    let out = on.run_env(&["resync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    on.assert_converged().await;
    let out = on.run_env(&["status", "--json"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["recorded_usages"], 1, "{v}");
    assert_eq!(on.sqlite_files(), Vec::<String>::new());
}

/// A role that must give a password reads it from `database.password_file`; the password never
/// shows in any output, and a wrong one fails without showing it either.
#[tokio::test]
async fn postgres_password_from_password_file_works_and_is_never_shown() {
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("pg-password");
    std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
    let on = spawn_postgres(Setup::default(), PASSWORD_ROLE, Some(&password_file), &[]).await;
    on.insert(&asset(1), &page(1), None).await;
    let mut seen = String::new();
    for args in [
        &["resync", "-v"][..],
        &["status"][..],
        &["status", "--json"][..],
        &["config", "show"][..],
        &["config", "show", "--json"][..],
    ] {
        let out = on.run_expecting(args, 0).await;
        seen.push_str(&stdout(&out));
        seen.push_str(&stderr(&out));
    }
    on.assert_converged().await;

    std::fs::write(&password_file, "wrong-password-Xk2\n").unwrap();
    let out = on.run(&["resync"]).await;
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("wrong-password-Xk2"), "{err}");
    seen.push_str(&stdout(&out));
    seen.push_str(&err);
    assert!(!seen.contains(DB_PASSWORD), "the password leaked:\n{seen}");
}

/// The CMS made its table (as the contract gives it) and wrote rows before the daemon was
/// installed: `migrate` keeps the table and its rows, and a resync sends them.
#[tokio::test]
async fn postgres_migrate_keeps_a_cms_table_that_already_holds_rows() {
    let pg = cluster().await;
    let name = fresh_database(&pg, OWNER).await;
    let url = format!("postgres://{OWNER}@127.0.0.1:{}/{name}", pg.port);
    let cms = PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE cms_asset_references (asset_id text NOT NULL, uri text NOT NULL, \
         additional text, updated_at timestamptz NOT NULL DEFAULT now(), \
         PRIMARY KEY (asset_id, uri))",
    )
    .execute(&cms)
    .await
    .unwrap();
    let setup = Setup::default();
    let portal = Simulator::start(setup.portal.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        config_text(&setup, &portal.base_url(), &format!("url = \"{url}\"")),
    )
    .unwrap();
    let on = On {
        backend: Backend::Postgres,
        app: App {
            pool: SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
            db_path: dir.path().join("state.db"),
            dir,
            portal,
            config_path,
        },
        cms: Cms::Postgres(cms),
        url: Some(url),
        _cluster: Some(pg),
    };
    on.insert(&asset(1), &page(1), Some("before the daemon"))
        .await;
    on.insert(&asset(2), &page(2), None).await;
    on.run_expecting(&["migrate"], 0).await;
    assert_eq!(on.desired().await.len(), 2, "migrate kept the CMS's rows");
    on.resync_expecting(0).await;
    on.assert_converged().await;
    assert_eq!(on.ours().len(), 2);
}

/// A `database.url` nothing listens on: the commands fail (no panic, no SQLite file made
/// instead) and nothing is sent.
#[tokio::test]
async fn postgres_an_unreachable_database_fails_without_sending_anything() {
    // A port nothing listens on (taken and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let setup = Setup::default();
    let portal = Simulator::start(setup.portal.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        config_text(
            &setup,
            &portal.base_url(),
            &format!("url = \"postgres://{OWNER}@127.0.0.1:{port}/state\""),
        ),
    )
    .unwrap();
    let app = App {
        pool: SqlitePool::connect_lazy("sqlite::memory:").unwrap(),
        db_path: dir.path().join("state.db"),
        dir,
        portal,
        config_path,
    };
    for args in [&["migrate"][..], &["resync"][..], &["status"][..]] {
        let out = app.run(args).await;
        let err = stderr(&out);
        assert!(
            !matches!(out.status.code(), Some(0) | Some(101) | None),
            "{args:?} must fail cleanly: {:?}\n{err}",
            out.status
        );
        assert!(
            !err.contains("panicked") && !err.contains("unknown key"),
            "{args:?}: the config is valid, only the server is away: {err}"
        );
        assert!(
            err.contains(&format!("127.0.0.1:{port}")) || err.contains("database.url"),
            "{args:?}: the error names the database it could not reach: {err}"
        );
    }
    assert_eq!(app.portal.counters().total, 0);
    let files: Vec<_> = std::fs::read_dir(app.dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".db"))
        .collect();
    assert_eq!(files, Vec::<String>::new(), "no SQLite state instead");
}

//! Throwaway database servers for the `source.url` tests: a PostgreSQL cluster or a MariaDB
//! server of its own per test, in a temporary folder, listening on loopback only, stopped and
//! removed when dropped (a panicking test drops it too). They run as the `postgres` and `mysql`
//! OS users (the tests run as root), from Debian's `postgresql` and `mariadb-server` packages,
//! which `scripts/test` installs.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A free loopback port (the listener is closed before the server binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary folder owned by `user`, who runs the server in it.
fn folder_for(user: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("source-db-")
        .tempdir()
        .unwrap();
    run(
        "chown",
        Command::new("chown")
            .arg(format!("{user}:"))
            .arg(dir.path()),
    );
    dir
}

/// A PostgreSQL cluster with trust authentication on loopback for every role but `cms_pw`,
/// which must give its password (`PG_PASSWORD`).
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The password of the PostgreSQL and MariaDB role `cms_pw`.
pub const DB_PASSWORD: &str = "pw-Zq8#not-in-logs";

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                let mut bins: Vec<PathBuf> = versions
                    .filter_map(|v| Some(v.ok()?.path().join("bin")))
                    .filter(|b| b.join("initdb").is_file())
                    .collect();
                bins.sort();
                bins.pop()
            })
            .expect("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin; Debian's postgresql package, scripts/test installs it)");
        let dir = folder_for("postgres");
        let data = dir.path().join("data");
        run(
            "initdb",
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ])
                .args(["--auth-local=trust", "--auth-host=trust"]),
        );
        // Loopback only; the password role first, everyone else trusted.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all cms_pw 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let port = free_port();
        run(
            "pg_ctl start",
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
                    dir.path().display()
                ))
                .args(["-w", "start"]),
        );
        Postgres { dir, bin, port }
    }

    /// The admin's url of `database`.
    pub fn admin_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `cms` with `cms_asset_references` and the roles `cms` (no password) and `cms_pw`
    /// (password [`DB_PASSWORD`]), both allowed to read and write it (the sync must not write).
    pub async fn create_cms(&self) -> sqlx::PgPool {
        let admin = sqlx::PgPool::connect(&self.admin_url("postgres"))
            .await
            .unwrap();
        for sql in [
            "CREATE DATABASE cms".to_owned(),
            "CREATE ROLE cms LOGIN".to_owned(),
            format!("CREATE ROLE cms_pw LOGIN PASSWORD '{DB_PASSWORD}'"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap();
        }
        admin.close().await;
        let cms = sqlx::PgPool::connect(&self.admin_url("cms")).await.unwrap();
        for sql in [
            "CREATE TABLE cms_asset_references (asset_id text NOT NULL, uri text NOT NULL, additional text)",
            "GRANT ALL ON SCHEMA public TO cms, cms_pw",
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO cms, cms_pw",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO cms, cms_pw",
        ] {
            sqlx::query(sql).execute(&cms).await.unwrap();
        }
        cms
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A MariaDB server with the users `admin` (everything, no password), `cms` (no password) and
/// `cms_pw` ([`DB_PASSWORD`]), from any host (it listens on loopback only).
pub struct MariaDb {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        let (install, server) = (
            Path::new("/usr/bin/mariadb-install-db"),
            Path::new("/usr/sbin/mariadbd"),
        );
        assert!(
            install.is_file() && server.is_file(),
            "MariaDB's server (mariadb-install-db, mariadbd; Debian's mariadb-server package, scripts/test installs it)"
        );
        let dir = folder_for("mysql");
        let data = dir.path().join("data");
        // A temporary folder of its own: servers sharing /tmp collide on their temporary
        // tables' names (a parallel install then fails on `mysql.tmp_user_sys`).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        run("chown", Command::new("chown").arg("mysql:").arg(&tmp));
        run(
            "mariadb-install-db",
            Command::new(install)
                .arg("--no-defaults")
                .arg("--user=mysql")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .args(["--skip-test-db", "--auth-root-authentication-method=socket"]),
        );
        let init = dir.path().join("init.sql");
        std::fs::write(
            &init,
            format!(
                "CREATE USER 'admin'@'%';\n\
                 GRANT ALL ON *.* TO 'admin'@'%' WITH GRANT OPTION;\n\
                 CREATE DATABASE cms;\n\
                 CREATE USER 'cms'@'%';\n\
                 CREATE USER 'cms_pw'@'%' IDENTIFIED BY '{DB_PASSWORD}';\n\
                 GRANT ALL ON cms.* TO 'cms'@'%';\n\
                 GRANT ALL ON cms.* TO 'cms_pw'@'%';\n\
                 CREATE TABLE cms.cms_asset_references (asset_id varchar(200) NOT NULL, \
                     uri varchar(2000) NOT NULL, additional text) \
                     CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut child = Command::new(server)
            .arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--init-file={}", init.display()))
            .arg("--skip-name-resolve")
            .args(["--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mariadbd");
        // The server says when it accepts connections (after the init file ran).
        let mut log = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = log.read_line(&mut line).unwrap_or(0);
            assert!(n > 0, "mariadbd stopped before it was ready:\n{seen}");
            seen.push_str(&line);
            if line.contains("ready for connections") {
                break;
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while log.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        MariaDb {
            child,
            _dir: dir,
            port,
        }
    }

    /// The admin's connection to `cms`.
    pub async fn cms(&self) -> sqlx::MySqlPool {
        sqlx::MySqlPool::connect(&format!("mysql://admin@127.0.0.1:{}/cms", self.port))
            .await
            .unwrap()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

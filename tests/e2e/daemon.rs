//! Issue: daemon mode and operations, against the simulated portal. `run` as a real process
//! where the test is about the process or needs it to itself: SIGTERM, SIGHUP, SIGKILL and
//! restarts, exit codes, systemd notifications, the log, and the metrics (the Prometheus recorder
//! is process-wide, so only a process of its own has metrics nobody else wrote). The schedules,
//! the status page in headless Chromium and the search run the daemon in process
//! ([`crate::in_process`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::common::*;
use crate::in_process::{spawn_daemon, SpawnedDaemon};
use bynder_usage_sync::simulator::{Faults, Options};

/// The `[server]` and `[daemon]` sections of a daemon under test: a port picked by the OS, a
/// short grace period.
pub(crate) fn daemon_sections(shutdown_timeout: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[daemon]\nshutdown_timeout = \"{shutdown_timeout}\"\n"
    )
}

/// A daemon that reconciles every second.
pub(crate) fn daemon_setup() -> Setup {
    Setup {
        sync: "schedule = \"*/1 * * * * *\"".to_owned(),
        extra: daemon_sections("5s"),
        ..Setup::default()
    }
}

/// A daemon that sends one request per usage: a create is not idempotent there, so counting
/// POSTs shows whether anything was sent twice, and a stop can fall between two operations.
pub(crate) fn per_usage_daemon_setup() -> Setup {
    Setup {
        sync: "schedule = \"*/1 * * * * *\"\nstrategy = \"per_usage\"".to_owned(),
        ..daemon_setup()
    }
}

/// A running `bynder-usage-sync run`.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) address: SocketAddr,
    /// Its stderr so far, updated line by line.
    log: watch::Receiver<String>,
    /// Reads stderr into `log`; it ends when the process closes stderr.
    reader: JoinHandle<()>,
    http: reqwest::Client,
}

impl Daemon {
    /// Starts `run` with the app's config and waits for the line naming the bound address.
    pub(crate) async fn start(app: &App) -> Daemon {
        Daemon::start_env(app, &[]).await
    }

    pub(crate) async fn start_env(app: &App, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = binary();
        cmd.arg("--config")
            .arg(&app.config_path)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the daemon");
        let (log_tx, log) = watch::channel(String::new());
        let (address_tx, mut address_rx) = watch::channel(None::<SocketAddr>);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let token = rest.split_whitespace().next().unwrap_or("");
                    if let Ok(address) = token.trim_end_matches(':').parse() {
                        address_tx.send_replace(Some(address));
                    }
                }
                log_tx.send_modify(|log| {
                    log.push_str(&line);
                    log.push('\n');
                });
            }
        });
        // The port is chosen by the OS inside the process (`listen = "127.0.0.1:0"`); the line
        // naming it is the signal. Picking a free port here and passing it in would race.
        let found = tokio::time::timeout(
            Duration::from_secs(20),
            address_rx.wait_for(|a| a.is_some()),
        )
        .await;
        let address = match found {
            Ok(Ok(a)) => a.expect("checked"),
            _ => panic!(
                "the daemon never said where it listens; its log:\n{}",
                *log.borrow()
            ),
        };
        Daemon {
            child,
            address,
            log,
            reader,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    pub(crate) fn log(&self) -> String {
        self.log.borrow().clone()
    }

    /// Waits for `what` to appear in the log, failing after `within`.
    pub(crate) async fn wait_for_log(&self, what: &str, within: Duration) {
        let mut log = self.log.clone();
        let appeared = tokio::time::timeout(within, log.wait_for(|log| log.contains(what))).await;
        // `Err` inside: stderr closed without the line.
        if !matches!(appeared, Ok(Ok(_))) {
            panic!(
                "timed out after {within:?} waiting for {what:?} in the daemon's log:\n{}",
                self.log()
            );
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `within`.
    pub(crate) async fn terminate(mut self, within: Duration) -> (ExitStatus, Duration, String) {
        let pid = self.child.id().expect("still running").to_string();
        let started = std::time::Instant::now();
        let kill = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(kill.success());
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the daemon did not exit within {within:?} of SIGTERM; its log:\n{}",
                    self.log()
                )
            })
            .unwrap();
        let took = started.elapsed();
        // The process has exited, so stderr is closed: the reader ends once it has every line.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.reader)
            .await
            .is_err()
        {
            panic!(
                "stderr stayed open after the daemon exited; its log:\n{}",
                self.log()
            );
        }
        (status, took, self.log())
    }
}

impl Daemon {
    /// Waits at most `within` for the daemon to exit on its own: its status and whole log.
    pub(crate) async fn exited(mut self, within: Duration) -> (ExitStatus, String) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the daemon did not exit within {within:?}; its log:\n{}",
                    self.log()
                )
            })
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        (status, self.log())
    }
}

/// What a failed wait shows about the daemon it waited on.
pub(crate) trait Watched {
    fn log(&self) -> String;
}

impl Watched for Daemon {
    fn log(&self) -> String {
        Daemon::log(self)
    }
}

impl Watched for SpawnedDaemon {
    fn log(&self) -> String {
        "(in process: its log is not captured)".to_owned()
    }
}

/// Polls `check` until it holds, failing with `what` and the daemon's log after `within`.
///
/// Polling, with a bound, because what the tests wait for here (usages in the simulated portal,
/// rows in the state database, an endpoint's answer) has no change notification to wait on;
/// waits for a log line or a systemd notification use their watch channels instead.
pub(crate) async fn eventually<F, Fut>(
    daemon: &impl Watched,
    what: &str,
    within: Duration,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out after {within:?} waiting for: {what}\ndaemon log:\n{}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn converged(app: &App) -> bool {
    app.ours() == app.desired().await
}

async fn queue_counts(app: &App) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(state = 'pending'), 0), coalesce(sum(state = 'in_flight'), 0) FROM operations",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

fn creates(app: &App) -> u64 {
    app.portal
        .counters()
        .by_route
        .get("POST /api/media/usage/")
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn run_sends_each_change_of_the_cms_table_and_exits_0_on_sigterm() {
    let app = spawn_app_with(daemon_setup()).await;
    // systemd's side of Type=notify: a datagram socket the daemon reports to.
    let socket_path = app.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let (sink, notes) = watch::channel(Vec::<String>::new());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf).await {
            let note = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.send_modify(|notes| notes.push(note));
        }
    });
    let daemon = Daemon::start_env(
        &app,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    // Each datagram is an event on the watch: whether a note arrives within a bound needs no
    // polling.
    let noted = |what: &'static str, within: Duration| {
        let mut notes = notes.clone();
        async move {
            let found = notes.wait_for(|notes| notes.iter().any(|n| n.contains(what)));
            matches!(tokio::time::timeout(within, found).await, Ok(Ok(_)))
        }
    };
    assert!(
        noted("READY=1", Duration::from_secs(5)).await,
        "no READY=1 within 5s\ndaemon log:\n{}",
        daemon.log()
    );

    // First change: new rows.
    app.insert(&asset(1), &page(1), Some("hero")).await;
    app.insert(&asset(2), &page(2), None).await;
    eventually(
        &daemon,
        "the new rows in the portal",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    assert_eq!(app.ours().len(), 2);

    // Second change: a note edited.
    app.exec(&format!(
        "UPDATE cms_asset_references SET additional = 'hero, moved' WHERE asset_id = '{}'",
        asset(1)
    ))
    .await;
    eventually(
        &daemon,
        "the edited note in the portal",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    assert!(app
        .ours()
        .contains(&(asset(1), page(1), "hero, moved".to_owned())));

    // Third change: a row removed, another added.
    app.exec(&format!(
        "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
        asset(2)
    ))
    .await;
    app.insert(&asset(3), &page(3), Some("footer")).await;
    eventually(
        &daemon,
        "the removal and the addition",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    assert_eq!(app.ours().len(), 2);

    assert!(
        noted("WATCHDOG=1", Duration::from_secs(5)).await,
        "no WATCHDOG=1 within 5s\ndaemon log:\n{}",
        daemon.log()
    );
    assert!(
        notes
            .borrow()
            .iter()
            .any(|n| n.contains("STATUS=last reconcile: ")),
        "{:?}",
        notes.borrow()
    );

    let (status, took, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "daemon log:\n{log}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    // Sent before the exit; the datagram may still wait in the socket for its reader.
    assert!(
        noted("STOPPING=1", Duration::from_secs(5)).await,
        "{:?}",
        notes.borrow()
    );
    assert!(!log.contains("ERROR"), "{log}");
    // The scheduler's per-tick chatter is filtered out.
    assert!(!log.contains("tokio_cron_scheduler"), "{log}");
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_and_a_restart_resumes_the_queue() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            latency: Duration::from_millis(150),
            ..Options::default()
        },
        limits: "requests_per_second = 1000\nblock_pause = \"1s\"\nconcurrency = 1".to_owned(),
        ..per_usage_daemon_setup()
    })
    .await;
    for n in 1..=20 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "some usages sent",
        Duration::from_secs(10),
        || async { app.ours().len() >= 3 },
    )
    .await;
    let (status, took, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        took < Duration::from_secs(3),
        "a graceful stop waits for one request, not for the queue: {took:?}"
    );
    let sent = app.ours().len();
    let (pending, in_flight) = queue_counts(&app).await;
    assert!(sent < 20, "stopped before the end of the queue");
    assert_eq!(in_flight, 0, "the request in flight finished: {log}");
    assert_eq!(pending as usize, 20 - sent, "the rest waits in the queue");

    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "the rest of the queue sent",
        Duration::from_secs(20),
        || converged(&app),
    )
    .await;
    assert_eq!(creates(&app), 20, "nothing was sent twice");
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test]
async fn a_request_still_in_flight_at_the_shutdown_timeout_is_abandoned_and_read_back_later() {
    let app = spawn_app_with(Setup {
        extra: daemon_sections("500ms"),
        timeout: "30s".to_owned(),
        ..per_usage_daemon_setup()
    })
    .await;
    let daemon = Daemon::start(&app).await;
    eventually(&daemon, "ready", Duration::from_secs(10), || async {
        daemon.get("/readyz").await.0 == 200
    })
    .await;
    // Bynder applies the create, then takes 20 s to answer.
    app.portal.set_faults(Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_secs(20),
        ..Faults::default()
    });
    app.insert(&asset(1), &page(1), Some("slow")).await;
    eventually(
        &daemon,
        "the create to reach the portal",
        Duration::from_secs(10),
        || async { !app.ours().is_empty() },
    )
    .await;
    let (status, took, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(took < Duration::from_secs(3), "took {took:?}\n{log}");
    assert!(log.contains("abandoned"), "{log}");
    assert_eq!(
        queue_counts(&app).await.1,
        1,
        "left in flight, as after a crash"
    );

    app.portal.set_faults(Faults::default());
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "the usage recorded",
        Duration::from_secs(10),
        || async { queue_counts(&app).await == (0, 0) },
    )
    .await;
    assert_eq!(app.ours(), vec![(asset(1), page(1), "slow".to_owned())]);
    assert_eq!(creates(&app), 1, "read back, not created twice");
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test]
async fn a_cms_writing_the_table_while_the_daemon_runs_sees_no_lock_error_and_neither_does_the_daemon(
) {
    let app = spawn_app_with(daemon_setup()).await;
    let daemon = Daemon::start(&app).await;
    // The CMS: its own connection, configured as the README asks (WAL, a busy timeout), writing
    // in short transactions for a few seconds while the daemon reconciles every second.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&app.db_path)
        .busy_timeout(Duration::from_secs(30));
    let cms = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut errors = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut n = 0u32;
    while tokio::time::Instant::now() < until {
        n += 1;
        let mut statements = vec![format!(
            "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ('{}', '{}', 'v1')",
            asset(n),
            page(n)
        )];
        if n > 1 {
            statements.push(format!(
                "UPDATE cms_asset_references SET additional = 'v{n}' WHERE asset_id = '{}'",
                asset(n - 1)
            ));
        }
        if n > 5 && n.is_multiple_of(3) {
            statements.push(format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                asset(n - 5)
            ));
        }
        let mut tx = cms.begin().await.unwrap();
        for sql in statements {
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
            {
                errors.push(e.to_string());
            }
        }
        if let Err(e) = tx.commit().await {
            errors.push(e.to_string());
        }
        // Pacing, not a wait: a CMS writes now and then, and the daemon gets the gaps.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(errors.is_empty(), "the CMS saw: {errors:?}");
    assert!(n > 20, "the CMS wrote continuously ({n} transactions)");
    eventually(
        &daemon,
        "the final table in the portal",
        Duration::from_secs(20),
        || converged(&app),
    )
    .await;
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    for word in ["locked", "busy", "ERROR", "run failed"] {
        assert!(!log.contains(word), "the daemon logged {word:?}:\n{log}");
    }
}

#[tokio::test]
async fn a_manual_resync_while_the_daemon_runs_waits_its_turn_and_nothing_is_sent_twice() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            latency: Duration::from_millis(20),
            ..Options::default()
        },
        ..per_usage_daemon_setup()
    })
    .await;
    let daemon = spawn_daemon(&app).await;
    for n in 1..=30 {
        app.insert(&asset(n), &page(n), None).await;
    }
    // Both try at once; the run lock beside the database takes them in turn.
    let manual = app.run(&["resync"]).await;
    assert!(
        matches!(manual.status.code(), Some(0)),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&manual),
        stderr(&manual)
    );
    eventually(&daemon, "convergence", Duration::from_secs(10), || {
        converged(&app)
    })
    .await;
    assert_eq!(creates(&app), 30, "each usage was created exactly once");
    daemon
        .stop()
        .await
        .expect("the daemon stops cleanly, which `run` turns into exit 0");
}

/// Samples by metric name: each with its labels and value.
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// A strict reader of the Prometheus text format (0.0.4): returns every sample by name with its
/// labels, and checks comments, names, label syntax, values and histogram consistency.
fn parse_prometheus(text: &str) -> Samples {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn value(text: &str) -> Option<f64> {
        match text {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            t => t.parse().ok(),
        }
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let parts: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match parts.as_slice() {
                ["TYPE", name, kind] => {
                    assert!(valid_name(name), "{}", at("bad metric name"));
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(kind),
                        "{}",
                        at("unknown type")
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "{}",
                        at("TYPE given twice")
                    );
                }
                ["HELP", name, ..] => assert!(valid_name(name), "{}", at("bad metric name")),
                _ => {}
            }
            continue;
        }
        let (name_end, rest) = match line.find(['{', ' ']) {
            Some(i) => (i, &line[i..]),
            None => panic!("{}", at("a sample without a value")),
        };
        let name = &line[..name_end];
        assert!(valid_name(name), "{}", at("bad metric name"));
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                let (start, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("{}", at("unclosed {")));
                if c == '}' {
                    end = start;
                    break;
                }
                if c == ',' {
                    continue;
                }
                let mut label = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    label.push(c);
                }
                assert!(valid_name(&label), "{}", at("bad label name"));
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "{}",
                    at("label value not quoted")
                );
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            _ => panic!("{}", at("bad escape in a label value")),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => panic!("{}", at("unterminated label value")),
                    }
                }
                labels.insert(label, value);
            }
            &body[end + 1..]
        } else {
            rest
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        assert!(
            (1..=2).contains(&fields.len()),
            "{}",
            at("expected a value and an optional timestamp")
        );
        let v = value(fields[0]).unwrap_or_else(|| panic!("{}", at("bad value")));
        if let Some(ts) = fields.get(1) {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("{}", at("bad timestamp")));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "{}",
            at("a sample before its # TYPE")
        );
        samples
            .entry(name.to_owned())
            .or_default()
            .push((labels, v));
    }
    // Histograms: cumulative buckets ending in +Inf, equal to _count.
    for (family, _) in types.iter().filter(|(_, k)| k.as_str() == "histogram") {
        let buckets = &samples[&format!("{family}_bucket")];
        let counts = &samples[&format!("{family}_count")];
        for (labels, count) in counts {
            let mut series: Vec<(f64, f64)> = buckets
                .iter()
                .filter(|(l, _)| {
                    l.iter()
                        .filter(|(k, _)| k.as_str() != "le")
                        .eq(labels.iter())
                })
                .map(|(l, v)| (value(&l["le"]).unwrap(), *v))
                .collect();
            series.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                series.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}: buckets not cumulative"
            );
            assert_eq!(
                series.last().map(|s| s.0),
                Some(f64::INFINITY),
                "{family}: no +Inf bucket"
            );
            assert_eq!(
                series.last().map(|s| s.1),
                Some(*count),
                "{family}: +Inf != _count"
            );
        }
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_readyz_turns_not_ready_when_the_credentials_are_rejected(
) {
    let app = spawn_app_with(daemon_setup()).await;
    app.insert(&asset(1), &page(1), None).await;
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "ready and converged",
        Duration::from_secs(10),
        || async { daemon.get("/readyz").await.0 == 200 && converged(&app).await },
    )
    .await;
    assert_eq!(daemon.get("/healthz").await.0, 200);
    // The container HEALTHCHECK: the binary asks the daemon itself.
    let listen = daemon.address.to_string();
    let probe = [("BYNDER_USAGE_SYNC_SERVER__LISTEN", listen.as_str())];
    let out = app.run_env(&["healthcheck", "--ready"], &probe).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let response = daemon
        .http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let metrics = parse_prometheus(&response.text().await.unwrap());
    for name in [
        "bynder_usage_sync_runs_total",
        "bynder_usage_sync_operations_total",
        "bynder_usage_sync_queue_pending",
        "bynder_usage_sync_queue_in_flight",
        "bynder_usage_sync_dead_letters",
        "bynder_usage_sync_request_duration_seconds_bucket",
        "bynder_usage_sync_requests_total",
        "bynder_usage_sync_rate_limited_total",
        "bynder_usage_sync_token_renewals_total",
        "bynder_usage_sync_last_success_timestamp_seconds",
        "bynder_usage_sync_ready",
        "bynder_usage_sync_build_info",
        "bynder_usage_sync_next_run_timestamp_seconds",
        "bynder_usage_sync_process_resident_memory_bytes",
        "bynder_usage_sync_process_open_fds",
        "bynder_usage_sync_process_cpu_seconds_total",
    ] {
        assert!(
            metrics.contains_key(name),
            "{name} missing from {:?}",
            metrics.keys()
        );
    }
    // Every metric is the daemon's own, by name.
    for name in metrics.keys() {
        assert!(name.starts_with("bynder_usage_sync_"), "{name}");
    }
    let build = &metrics["bynder_usage_sync_build_info"];
    assert_eq!(build[0].1, 1.0);
    assert_eq!(
        build[0].0.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(build[0].0.contains_key("commit"), "{build:?}");
    let runs = &metrics["bynder_usage_sync_runs_total"];
    assert!(
        runs.iter()
            .any(|(l, v)| l.get("outcome").map(String::as_str) == Some("converged") && *v >= 1.0),
        "{runs:?}"
    );
    let ops = &metrics["bynder_usage_sync_operations_total"];
    assert!(ops.iter().any(
        |(l, _)| l.get("action").map(String::as_str) == Some("upsert")
            && l.get("result").map(String::as_str) == Some("done")
    ));
    assert_eq!(metrics["bynder_usage_sync_ready"][0].1, 1.0);
    let last_success = metrics["bynder_usage_sync_last_success_timestamp_seconds"][0].1;
    assert!((last_success - chrono::Utc::now().timestamp() as f64).abs() < 60.0);

    // The portal revokes the token; the next reconcile with something to send hears 401.
    app.portal.revoke_permanent_token(TOKEN);
    app.insert(&asset(2), &page(2), None).await;
    eventually(
        &daemon,
        "/readyz to answer 503",
        Duration::from_secs(10),
        || async { daemon.get("/readyz").await.0 == 503 },
    )
    .await;
    let (_, body) = daemon.get("/readyz").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    let credentials = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "credentials")
        .unwrap();
    assert_eq!(credentials["ok"], false, "{body}");
    assert!(
        credentials["detail"].as_str().unwrap().contains("401"),
        "{body}"
    );
    assert!(!body.to_string().contains(TOKEN), "no secret in {body}");
    // It keeps running (not-ready, not dead), and says so in the metrics.
    assert_eq!(daemon.get("/healthz").await.0, 200);
    let metrics = parse_prometheus(&daemon.get("/metrics").await.1);
    assert_eq!(metrics["bynder_usage_sync_ready"][0].1, 0.0);
    assert_eq!(
        app.run_env(&["healthcheck"], &probe).await.status.code(),
        Some(0)
    );
    let out = app.run_env(&["healthcheck", "--ready"], &probe).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("503"), "{}", stderr(&out));
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test]
async fn the_verify_schedule_repairs_a_usage_removed_in_bynder_by_hand() {
    let app = spawn_app_with(Setup {
        // Reconcile yearly: only the start-up reconcile and the drift repair every second run.
        sync: "schedule = \"0 0 0 1 1 *\"\nverify_schedule = \"*/1 * * * * *\"".to_owned(),
        ..daemon_setup()
    })
    .await;
    app.insert(&asset(1), &page(1), Some("hero")).await;
    app.insert(&asset(2), &page(2), None).await;
    let daemon = spawn_daemon(&app).await;
    eventually(
        &daemon,
        "the start-up reconcile",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    // Someone deletes a usage in Bynder's UI; the recorded state still says it is there.
    let removed = app
        .portal
        .usages_for(INTEGRATION)
        .into_iter()
        .find(|u| u.asset_id == asset(1))
        .unwrap();
    assert!(app.portal.remove_usage(&removed.id));
    eventually(
        &daemon,
        "the drift repaired",
        Duration::from_secs(10),
        || converged(&app),
    )
    .await;
    let verify_runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE command = 'verify'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(verify_runs >= 1);
    daemon
        .stop()
        .await
        .expect("the daemon stops cleanly, which `run` turns into exit 0");
}

#[tokio::test]
async fn an_invalid_schedule_is_a_configuration_error_naming_the_key() {
    let app = spawn_app().await;
    // The classic five-field crontab line, from the environment.
    let out = app
        .run_env(
            &["run"],
            &[("BYNDER_USAGE_SYNC_SYNC__SCHEDULE", "*/5 * * * *")],
        )
        .await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("`sync.schedule`"), "{}", stderr(&out));
    assert!(stderr(&out).contains("Fix:"), "{}", stderr(&out));
}

/// Debian's Chromium (`apt-get install chromium`), or another Chromium-based browser on PATH.
fn chromium() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the status-page test needs a headless Chromium and found none on PATH (chromium, \
         chromium-browser, google-chrome). Install it: `sudo apt-get install -y --no-install-recommends \
         chromium` on Debian/Ubuntu (bash .ci/run does this), then run `cargo test` again"
    );
}

/// The page as Chromium renders it (`--dump-dom`: the DOM after parsing, as HTML).
async fn render_in_chromium(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--dump-dom")
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("Chromium finished within 60 s")
        .expect("Chromium started");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "Chromium failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[tokio::test]
async fn the_status_page_renders_in_headless_chromium_with_health_queue_and_the_asset_search() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            missing_assets: [asset(9)].into(),
            ..Options::default()
        },
        ..daemon_setup()
    })
    .await;
    app.insert(&asset(1), &page(1), Some("hero banner")).await;
    app.insert(
        &asset(1),
        &page(2),
        Some("<script>document.title='pwned'</script><b>bold</b>"),
    )
    .await;
    app.insert(&asset(2), &page(3), None).await;
    app.insert(&asset(9), &page(9), None).await; // Bynder does not know it: a dead letter
    let daemon = spawn_daemon(&app).await;
    eventually(
        &daemon,
        "three usages and a dead letter",
        Duration::from_secs(10),
        || async { app.ours().len() == 3 && daemon.get("/readyz").await.0 == 200 },
    )
    .await;

    let dom = render_in_chromium(&daemon.url(&format!("/?q={}", asset(1)))).await;
    assert!(dom.contains("bynder-usage-sync"), "{dom}");
    assert!(dom.contains(r#"id="readiness">Ready<"#), "{dom}");
    assert!(dom.contains(INTEGRATION), "{dom}");
    // The search: both uses of asset 1, each with the usage id Bynder gave it.
    assert_eq!(dom.matches(r#"<tr class="result">"#).count(), 2, "{dom}");
    for usage in app.portal.usages_for(INTEGRATION) {
        let shown = dom.contains(&usage.id);
        assert_eq!(
            shown,
            usage.asset_id == asset(1),
            "usage {usage:?} in\n{dom}"
        );
    }
    assert!(dom.contains(&page(1)) && dom.contains(&page(2)), "{dom}");
    assert!(dom.contains("in Bynder, up to date"), "{dom}");
    // CMS text is shown as text: no element was injected, the title is untouched.
    assert!(dom.contains("&lt;script&gt;document.title="), "{dom}");
    assert!(
        !dom.contains("<script") && !dom.contains("<b>bold"),
        "{dom}"
    );
    assert!(
        dom.contains("<title>bynder-usage-sync: ready</title>"),
        "{dom}"
    );
    // Queue, dead letters and runs.
    assert!(dom.contains(r#"id="queue-dead" class="bad">1<"#), "{dom}");
    assert!(
        dom.contains(&asset(9)) && dom.contains("Asset not found"),
        "{dom}"
    );
    assert!(dom.contains("<td>reconcile</td>"), "{dom}");
    // What the run learned about the portal.
    assert!(dom.contains(r#"id="portal-profile""#), "{dom}");
    assert!(dom.contains(r#"<tr id="profile-sync_answer">"#), "{dom}");
    // Read-only, and no secret.
    assert!(
        !dom.contains("method=\"post\"") && !dom.contains(TOKEN),
        "{dom}"
    );

    // A uri search, and one that matches nothing.
    let dom = render_in_chromium(&daemon.url("/?q=https%3A%2F%2Fcms.example%2Fpages%2F3")).await;
    assert_eq!(dom.matches(r#"<tr class="result">"#).count(), 1, "{dom}");
    assert!(dom.contains(&asset(2)), "{dom}");
    let dom = render_in_chromium(&daemon.url("/?q=%3Cnothing%3E")).await;
    assert!(
        dom.contains(r#"id="no-match""#) && dom.contains("&lt;nothing&gt;"),
        "{dom}"
    );

    daemon
        .stop()
        .await
        .expect("the daemon stops cleanly, which `run` turns into exit 0");
}

#[tokio::test]
async fn the_search_reads_a_custom_source_too() {
    let app = spawn_app_with(daemon_setup()).await;
    let cms_path = app.dir.path().join("cms.sqlite");
    let cms = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", cms_path.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE page_media (media_id TEXT, page_url TEXT, field TEXT)")
        .execute(&cms)
        .await
        .unwrap();
    sqlx::query("INSERT INTO page_media VALUES (?, ?, 'teaser')")
        .bind(asset(7))
        .bind(page(7))
        .execute(&cms)
        .await
        .unwrap();
    // The CMS's own file with its own schema, read through a custom query.
    let mut config = std::fs::read_to_string(&app.config_path).unwrap();
    config.push_str(
        "[source]\ndatabase = \"cms.sqlite\"\nquery = \"SELECT media_id AS asset_id, \
         page_url AS uri, field AS additional FROM page_media\"\n",
    );
    std::fs::write(&app.config_path, config).unwrap();
    let daemon = spawn_daemon(&app).await;
    eventually(
        &daemon,
        "the usage in the portal",
        Duration::from_secs(10),
        || async { app.ours() == vec![(asset(7), page(7), "teaser".to_owned())] },
    )
    .await;
    let (status, page_html) = daemon
        .get(&format!("/?q={}", asset(7).to_lowercase()))
        .await;
    assert_eq!(status, 200);
    assert!(page_html.contains("in Bynder, up to date"), "{page_html}");
    assert!(
        page_html.contains("row, note \u{201c}teaser\u{201d}"),
        "{page_html}"
    );
    daemon
        .stop()
        .await
        .expect("the daemon stops cleanly, which `run` turns into exit 0");
}

#[tokio::test]
async fn run_killed_at_random_points_and_restarted_converges_without_duplicates() {
    use rand::{Rng, SeedableRng};
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            latency: Duration::from_millis(2),
            ..Options::default()
        },
        ..per_usage_daemon_setup()
    })
    .await;
    app.portal
        .seed_usage(OTHER_INTEGRATION, &asset(2), &page(2), "theirs");
    for n in 0..30 {
        app.insert(&asset(n), &page(n % 6), Some("v0")).await;
    }
    let seed: u64 = rand::random();
    println!("run kill test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rounds = 20;
    let mut killed_mid_work = 0;
    for round in 0..rounds {
        // Every note changes, so each start has work to do (an update is a delete and a create).
        app.exec(&format!(
            "UPDATE cms_asset_references SET additional = 'round {round}'"
        ))
        .await;
        let before = app.portal.counters().total;
        let kill_after = rng.random_range(1..50u64);
        let mut daemon = Daemon::start(&app).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if app.portal.counters().total >= before + kill_after {
                killed_mid_work += 1;
                break;
            }
            if converged(&app).await || tokio::time::Instant::now() > deadline {
                break;
            }
            // Polling, with a bound: the portal's request count has no change notification,
            // and a short period keeps the kill close to the chosen request.
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        daemon.child.start_kill().unwrap();
        daemon.child.wait().await.unwrap();
        let n = rng.random_range(0..40u32);
        if round % 2 == 0 {
            app.exec(&format!(
                "DELETE FROM cms_asset_references WHERE asset_id = '{}'",
                asset(n)
            ))
            .await;
        } else {
            app.exec(&format!(
                "INSERT OR REPLACE INTO cms_asset_references (asset_id, uri, additional) VALUES ('{}', '{}', 'added {round}')",
                asset(n),
                page(n % 6)
            ))
            .await;
        }
    }
    assert!(
        killed_mid_work * 4 >= rounds * 3,
        "only {killed_mid_work} of {rounds} runs were killed mid-work"
    );
    println!("figures: run_sigkills_mid_work={killed_mid_work} of {rounds}");
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "the restarted daemon converges",
        Duration::from_secs(30),
        || async { converged(&app).await && queue_counts(&app).await == (0, 0) },
    )
    .await;
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(
        app.others().len(),
        1,
        "the other integration's usage survives"
    );
}

/// REGRESSION: with one dead letter every later run was "partial" forever: the status page said
/// "last successful reconcile: never" and the last-success gauge stayed absent, so the documented
/// staleness alert could not fire.
#[tokio::test]
async fn an_old_dead_letter_leaves_later_runs_successful_with_its_own_gauge() {
    let app = spawn_app_with(Setup {
        portal: Options {
            permanent_tokens: vec![TOKEN.to_owned()],
            missing_assets: std::collections::HashSet::from([asset(9)]),
            ..Options::default()
        },
        ..per_usage_daemon_setup()
    })
    .await;
    app.insert(&asset(1), &page(1), None).await;
    app.insert(&asset(9), &page(9), None).await; // Bynder does not know it: a dead letter
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "a later run that ends nothing_to_do despite the dead letter",
        Duration::from_secs(20),
        || async {
            let metrics = parse_prometheus(&daemon.get("/metrics").await.1);
            let quiet_run = metrics
                .get("bynder_usage_sync_runs_total")
                .is_some_and(|runs| {
                    runs.iter().any(|(l, v)| {
                        l.get("outcome").map(String::as_str) == Some("nothing_to_do") && *v >= 1.0
                    })
                });
            quiet_run
                && metrics.contains_key("bynder_usage_sync_last_success_timestamp_seconds")
                && metrics["bynder_usage_sync_dead_letters"][0].1 == 1.0
        },
    )
    .await;
    let (status, html) = daemon.get("/").await;
    assert_eq!(status, 200);
    assert!(!html.contains(r#"id="last-success">never"#), "{html}");
    assert_eq!(app.ours(), vec![(asset(1), page(1), String::new())]);
    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("wait as dead letters"), "{log}");
}

impl Daemon {
    fn hang_up(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let kill = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
    }
}

/// REGRESSION: SIGHUP killed the daemon (exit 129, which systemd treats as a clean exit, so it
/// was not restarted). It now reloads the configuration: run-time settings apply, settings read
/// only at start are named, and an invalid file changes nothing.
#[tokio::test]
async fn sighup_reloads_the_configuration_and_keeps_the_old_one_on_error() {
    let app = spawn_app_with(Setup {
        sync: "schedule = \"0 0 0 1 1 *\"".to_owned(),
        // The daemon's own lines (where it listens) stay; the runs' lines are filtered.
        extra: format!(
            "{}[log]\nlevel = \"warn,bynder_usage_sync::daemon=info\"\n",
            daemon_sections("5s")
        ),
        ..Setup::default()
    })
    .await;
    app.insert(&asset(1), &page(1), None).await;
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "the first reconcile",
        Duration::from_secs(10),
        || async { converged(&app).await && daemon.get("/readyz").await.0 == 200 },
    )
    .await;
    assert!(
        !daemon.log().contains("run finished"),
        "info lines are filtered at warn"
    );

    // A yearly schedule would never send this row; the reloaded one does, at info level.
    app.insert(&asset(2), &page(2), None).await;
    let original = std::fs::read_to_string(&app.config_path).unwrap();
    let every_second = original
        .replace("0 0 0 1 1 *", "*/1 * * * * *")
        .replace("warn,bynder_usage_sync::daemon=info", "info");
    std::fs::write(&app.config_path, &every_second).unwrap();
    daemon.hang_up();
    eventually(
        &daemon,
        "the reloaded schedule",
        Duration::from_secs(15),
        || async { converged(&app).await },
    )
    .await;
    daemon
        .wait_for_log("run finished", Duration::from_secs(5))
        .await;
    let log = daemon.log();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("sync.schedule") && log.contains("log.level"),
        "{log}"
    );

    // A broken file: the running configuration stays, the daemon keeps working.
    std::fs::write(&app.config_path, "[bynder\nbase_url = ").unwrap();
    daemon.hang_up();
    daemon
        .wait_for_log("was not reloaded", Duration::from_secs(5))
        .await;
    app.insert(&asset(3), &page(3), None).await;
    eventually(
        &daemon,
        "runs on the old configuration",
        Duration::from_secs(10),
        || async { converged(&app).await },
    )
    .await;

    // A section read only at start is named, and keeps its running value.
    std::fs::write(
        &app.config_path,
        every_second.replace("timeout = \"2s\"", "timeout = \"3s\""),
    )
    .unwrap();
    daemon.hang_up();
    daemon
        .wait_for_log("apply only after a restart", Duration::from_secs(5))
        .await;
    assert!(daemon.log().contains("[bynder]"), "{}", daemon.log());

    let (status, _, log) = daemon.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

/// Every `bynder_usage_sync_*` name in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("bynder_usage_sync_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn alert_rules_and_the_dashboard_pass_promtool_and_name_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("deploy/prometheus/alerts.yml");
    let check = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let app = spawn_app_with(daemon_setup()).await;
    app.insert(&asset(1), &page(1), None).await;
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "a successful reconcile",
        Duration::from_secs(10),
        || async {
            parse_prometheus(&daemon.get("/metrics").await.1)
                .contains_key("bynder_usage_sync_last_success_timestamp_seconds")
        },
    )
    .await;
    let exported: Vec<String> = parse_prometheus(&daemon.get("/metrics").await.1)
        .into_keys()
        .collect();
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    for (file, text) in [
        ("alerts.yml", std::fs::read_to_string(&rules).unwrap()),
        ("dashboard.json", dashboard),
    ] {
        let named = metric_names(&text);
        assert!(named.len() >= 5, "{file}: {named:?}");
        for name in named {
            assert!(
                exported.contains(&name),
                "{file} names {name}, which /metrics does not export: {exported:?}"
            );
        }
    }
    daemon.terminate(Duration::from_secs(10)).await;
}

/// Telemetry from the daemon: a span per scheduled run with its requests, the log filter
/// applied to the exported records and reloaded on SIGHUP, and what is still buffered flushed
/// when SIGTERM stops it.
#[tokio::test]
async fn the_daemon_exports_each_run_follows_a_reloaded_log_level_and_flushes_on_sigterm() {
    use crate::telemetry::{assert_request_of, log_body, requests, run_span, Receiver};

    let receiver = Receiver::start().await;
    let app = spawn_app_with(Setup {
        sync: "schedule = \"0 0 0 1 1 *\"".to_owned(),
        extra: format!(
            "{}{}[log]\nlevel = \"info\"\n",
            daemon_sections("5s"),
            receiver.section()
        ),
        ..Setup::default()
    })
    .await;
    receiver.clear();
    for n in 0..3 {
        app.insert(&asset(n), &page(n), None).await;
    }
    let daemon = Daemon::start(&app).await;
    eventually(
        &daemon,
        "the first reconcile",
        Duration::from_secs(10),
        || async { converged(&app).await && daemon.get("/readyz").await.0 == 200 },
    )
    .await;
    assert!(
        !receiver
            .log_records()
            .iter()
            .any(|r| r.severity_text == "DEBUG"),
        "log.level = info applies to the exported records"
    );

    // Debug from now on, and a run every second to log something.
    let original = std::fs::read_to_string(&app.config_path).unwrap();
    std::fs::write(
        &app.config_path,
        original
            .replace("0 0 0 1 1 *", "*/1 * * * * *")
            .replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    daemon.hang_up();
    app.insert(&asset(9), &page(9), None).await;
    eventually(
        &daemon,
        "debug records after the reload",
        Duration::from_secs(15),
        || async {
            converged(&app).await
                && receiver
                    .log_records()
                    .iter()
                    .any(|r| r.severity_text == "DEBUG")
        },
    )
    .await;

    let (status, _, log) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    let spans = receiver.spans();
    let runs: Vec<_> = spans.iter().filter(|s| s.name == "run reconcile").collect();
    assert!(runs.len() >= 2, "a span per run");
    let first = runs
        .iter()
        .find(|s| crate::telemetry::text(s, "run.outcome") == Some("converged"))
        .expect("a converged run");
    let first = run_span(&[(*first).clone()], "run reconcile");
    let children: Vec<_> = requests(&spans, "api")
        .into_iter()
        .filter(|r| r.parent_span_id == first.span_id)
        .collect();
    assert!(!children.is_empty(), "the run's requests are its children");
    for request in children {
        assert_request_of(request, &first);
    }
    // The daemon's last line is written after SIGTERM: only the flush at exit sends it.
    assert!(
        receiver
            .log_records()
            .iter()
            .any(|r| log_body(r) == Some("stopped")),
        "the last log line arrived"
    );
    receiver.assert_no_secret(&[TOKEN]);
}

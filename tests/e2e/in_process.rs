//! The in-process daemon: the library's `run` entry point on a task of the test itself, on a
//! listener the test bound to port 0 and with a shutdown future the test resolves. A test about
//! what the daemon does (its endpoints, schedules, status page, search) needs no process, no
//! signal and no log line to learn the port: the port is known before the daemon starts, and
//! connections made before it serves wait in the listener's backlog.
//!
//! It does not give what only a process has: a pid (prlimit, `/proc`), signals, an exit code,
//! systemd notifications, or the log (nothing captures tracing here). And the Prometheus
//! recorder is process-wide, so in-process daemons running side by side in this test binary
//! share their metrics. Tests about any of those use the real binary ([`crate::daemon::Daemon`]).
//!
//! The configuration is read as `run` reads it, environment included (`BYNDER_USAGE_SYNC_*`,
//! and `NOTIFY_SOCKET` for systemd notifications, which the binary tests strip and this cannot);
//! the suite's other in-process tests (`properties`) read it the same way.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bynder_usage_sync::app::build_context;
use bynder_usage_sync::config::{load_config, ConfigSource};
use bynder_usage_sync::daemon::{run_until_stopped, DaemonError, Reloader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common::App;

/// How long [`SpawnedDaemon::stop`] waits for the daemon to wind down: well past the suite's
/// `daemon.shutdown_timeout` (5 s) and the 2 s the databases get to close.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A daemon running on the test's runtime, as `bynder-usage-sync run` would with the app's
/// config, except that it listens on the port the test bound and stops when told.
pub struct SpawnedDaemon {
    /// Where the daemon's HTTP endpoints answer.
    pub address: SocketAddr,
    http: reqwest::Client,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), DaemonError>>,
}

/// Starts the daemon of `app` in process, building its context exactly as `run` does: the
/// SIGHUP handler first, then the configuration, then the context over the state database.
/// Only the listener differs: 127.0.0.1 port 0, bound here instead of `server.listen`.
pub async fn spawn_daemon(app: &App) -> SpawnedDaemon {
    let source = ConfigSource::Explicit(app.config_path.clone());
    let reloader = Reloader::install(source.clone()).expect("install the SIGHUP handler");
    let config = load_config(&source).expect("the app's config loads");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind a port of 127.0.0.1");
    let address = listener
        .local_addr()
        .expect("a bound listener has an address");
    let ctx = build_context(config)
        .await
        .expect("build the daemon's context");
    let (shutdown, stop_requested) = oneshot::channel::<()>();
    // A dropped sender (a test that panicked) also stops the daemon.
    let stopped = async move {
        let _ = stop_requested.await;
    };
    let task = tokio::spawn(run_until_stopped(ctx, listener, stopped, reloader));
    SpawnedDaemon {
        address,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("the test client builds"),
        shutdown,
        task,
    }
}

impl SpawnedDaemon {
    /// `http://ADDRESS{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// GETs `path`: the status code and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Resolves the shutdown future and waits for the daemon to finish: `Ok` is what `run`
    /// turns into exit code 0, an error is a part of the daemon that died on its own. Panics
    /// when the daemon panicked or did not stop within [`STOP_WITHIN`].
    pub async fn stop(self) -> Result<(), DaemonError> {
        let SpawnedDaemon { shutdown, task, .. } = self;
        // An error means the daemon already ended; its task says how.
        let _ = shutdown.send(());
        match tokio::time::timeout(STOP_WITHIN, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(joined)) if joined.is_panic() => std::panic::resume_unwind(joined.into_panic()),
            Ok(Err(joined)) => panic!("the daemon's task was cancelled: {joined}"),
            Err(_) => panic!("the daemon did not stop within {STOP_WITHIN:?} of being told to"),
        }
    }
}

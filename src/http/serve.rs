//! The accept loop behind the daemon's endpoints, built so that no client can starve the others.
//!
//! `axum::serve` keeps every connection for as long as the client likes: a thousand idle or
//! half-sent connections exhaust the process's descriptors and `/healthz` stops answering. Here
//! every connection has a deadline while it is not being answered (`header_timeout` until its
//! first request, `idle_timeout` between requests), at most `max_connections` are open at once,
//! and a new client makes room by closing the oldest connection that is idle. A client that
//! connects and asks at once is therefore always served, whatever a flood of idle ones does.
//!
//! This module owns connections only; what is answered is the router's (`super::router`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

/// How connections are bounded (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time a new connection has to deliver its first request's headers.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection stays open between requests.
    pub idle_timeout: Duration,
}

/// After the shutdown signal, how long requests being answered may take before their
/// connections are dropped.
const DRAIN: Duration = Duration::from_secs(5);

/// One open connection, as the accept loop and its own task see it.
struct Connection {
    /// Requests being answered now; an idle connection has none.
    busy: AtomicUsize,
    /// Whether a request has come in yet (which timeout applies while idle).
    served: AtomicBool,
    /// When the connection opened or its last answer was ready.
    idle_since: Mutex<Instant>,
    /// Raised when the accept loop closes this connection to make room.
    evicted: Notify,
}

impl Connection {
    fn new() -> Self {
        Connection {
            busy: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            evicted: Notify::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// When an idle connection is closed; `None` while a request is being answered.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let since = *self.idle_since.lock().expect("connection lock");
        Some(
            since
                + if self.served.load(Ordering::SeqCst) {
                    limits.idle_timeout
                } else {
                    limits.header_timeout
                },
        )
    }
}

/// Marks a connection busy while one request is answered (dropped with the request's future,
/// whether it completed or the connection went away).
struct Busy(Arc<Connection>);

impl Busy {
    fn start(connection: Arc<Connection>) -> Self {
        connection.served.store(true, Ordering::SeqCst);
        connection.busy.fetch_add(1, Ordering::SeqCst);
        Busy(connection)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("connection lock") = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Arc<Connection>>,
}

impl Registry {
    /// Registers a new connection, first closing the oldest idle one when the cap is reached.
    /// `None` when every open connection is answering a request: the new one is refused.
    fn admit(&mut self, max_connections: usize) -> Option<(u64, Arc<Connection>)> {
        while self.open.len() >= max_connections.max(1) {
            if !self.close_oldest_idle() {
                return None;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let connection = Arc::new(Connection::new());
        self.open.insert(id, connection.clone());
        Some((id, connection))
    }

    /// Closes the oldest connection that is not answering a request; false when there is none.
    fn close_oldest_idle(&mut self) -> bool {
        let oldest_idle = self
            .open
            .iter()
            .find(|(_, c)| c.is_idle())
            .map(|(id, _)| *id);
        let Some(id) = oldest_idle else {
            return false;
        };
        if let Some(connection) = self.open.remove(&id) {
            // A stored permit: the connection's task sees it even if it is not waiting yet.
            connection.evicted.notify_one();
        }
        true
    }
}

/// Serves `router` on an already-bound listener until `shutdown` resolves. Then no connection is
/// accepted; requests being answered get [`DRAIN`] to finish, idle connections close at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut last_exhaustion_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connection tasks so the set does not grow with every client.
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) if matches!(e.raw_os_error(), Some(23 | 24)) => {
                // EMFILE/ENFILE: the process (or system) is out of descriptors. Make room and
                // give the system a moment instead of spinning on the same error.
                if last_exhaustion_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "out of file descriptors accepting a connection ({e}): closing the oldest \
                         idle connection; raise LimitNOFILE or lower server.max_connections"
                    );
                    last_exhaustion_warning = Some(Instant::now());
                }
                registry.lock().expect("registry lock").close_oldest_idle();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // A client that gave up between SYN and accept, and the like: not ours to handle.
            Err(e) => {
                tracing::debug!("accepting a connection failed: {e}");
                continue;
            }
        };
        let admitted = registry
            .lock()
            .expect("registry lock")
            .admit(limits.max_connections);
        let Some((id, connection)) = admitted else {
            tracing::debug!(
                "refusing a connection: all {} are answering requests",
                limits.max_connections
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(serve_connection(
            stream,
            router.clone(),
            limits,
            connection,
            stop_rx.clone(),
            ConnectionSlot {
                id,
                registry: registry.clone(),
            },
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::debug!("closing connections whose requests did not finish within {DRAIN:?}");
        tasks.shutdown().await;
    }
    Ok(())
}

/// Leaves the registry when the connection's task ends, however it ends.
struct ConnectionSlot {
    id: u64,
    registry: Arc<Mutex<Registry>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.open.remove(&self.id);
        }
    }
}

/// Drives one HTTP/1.1 connection until the client closes it, it stays idle past its deadline,
/// the accept loop evicts it, or the server stops.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    limits: Limits,
    connection: Arc<Connection>,
    mut stop: watch::Receiver<bool>,
    _slot: ConnectionSlot,
) {
    let service = {
        let connection = connection.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let busy = Busy::start(connection.clone());
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper's own bound on a request's head, beside the deadline below.
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    loop {
        let wake = connection
            .deadline(&limits)
            // Busy: look again later (the deadline then counts from the answer).
            .unwrap_or_else(|| Instant::now() + limits.header_timeout);
        tokio::select! {
            result = http.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = connection.evicted.notified() => return,
            () = tokio::time::sleep_until(wake) => {
                if connection.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    // Finish a request being answered, then close; an idle one closes now.
                    http.as_mut().graceful_shutdown();
                    let _ = http.as_mut().await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_registry_closes_its_oldest_idle_connection_for_a_new_one() {
        let mut registry = Registry::default();
        let (first, a) = registry.admit(2).expect("room");
        let (_, b) = registry.admit(2).expect("room");
        let _busy = Busy::start(a.clone());
        // `a` is busy, so `b` (the oldest idle) makes room.
        let (_, _c) = registry.admit(2).expect("an idle one makes room");
        assert!(registry.open.contains_key(&first));
        assert_eq!(registry.open.len(), 2);
        assert!(!registry.open.values().any(|c| Arc::ptr_eq(c, &b)));
    }

    #[test]
    fn a_registry_of_busy_connections_refuses_a_new_one() {
        let mut registry = Registry::default();
        let (_, a) = registry.admit(1).expect("room");
        let _busy = Busy::start(a);
        assert!(registry.admit(1).is_none());
    }

    #[test]
    fn an_idle_connection_has_a_deadline_and_a_busy_one_has_none() {
        let limits = Limits {
            max_connections: 1,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        };
        let connection = Arc::new(Connection::new());
        let opened = connection.deadline(&limits).expect("idle");
        let busy = Busy::start(connection.clone());
        assert!(connection.deadline(&limits).is_none());
        drop(busy);
        let after = connection.deadline(&limits).expect("idle again");
        // After a request, the longer idle timeout applies.
        assert!(after >= opened + Duration::from_secs(50));
    }
}

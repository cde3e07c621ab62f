//! Locks a PostgreSQL state database is shared under: session advisory locks, each held by a
//! connection of its own for as long as its guard lives. The server releases one the moment its
//! session ends: the guard dropped, the process killed (its socket closes), or the machine lost
//! (the server's keep-alive, set short by [`crate::store::postgres_options`], ends the session
//! within about 20 seconds).

use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// What a lock guards. Locks are per database and per schema (the second key is the schema's
/// hash), so two deployments in two schemas of one database do not exclude each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// One run sends at a time: a daemon's runs and a manual `resync` take turns.
    Run,
    /// One daemon leads (plans and sends); the others stand by until it is gone.
    Leader,
}

impl LockKind {
    fn class(self) -> i32 {
        match self {
            LockKind::Run => 0x4255_0001,
            LockKind::Leader => 0x4255_0002,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LockKind::Run => "run lock",
            LockKind::Leader => "leader lock",
        }
    }
}

/// A held advisory lock. Dropping it ends its session, which releases the lock.
pub struct AdvisoryLock {
    conn: PgConnection,
    kind: LockKind,
}

impl std::fmt::Debug for AdvisoryLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdvisoryLock")
            .field("kind", &self.kind)
            .finish()
    }
}

/// A session of its own, on the pool's options (never a pooled one: a pooled connection would
/// go back to the pool still holding the lock).
async fn session(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    pool.connect_options().connect().await
}

impl AdvisoryLock {
    /// Takes the lock if nobody holds it, naming this process (`what`: `run`, `resync`…) to
    /// whoever asks who holds it.
    pub async fn try_acquire(
        pool: &PgPool,
        kind: LockKind,
        what: &str,
    ) -> Result<Option<AdvisoryLock>, sqlx::Error> {
        let mut conn = session(pool).await?;
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
                .bind(kind.class())
                .fetch_one(&mut conn)
                .await?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        let note = holder_note(what);
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(&note)
            .execute(&mut conn)
            .await?;
        Ok(Some(AdvisoryLock { conn, kind }))
    }

    /// Waits at most `timeout` for the lock, polling: a waiting task stays cancellable.
    pub async fn acquire(
        pool: &PgPool,
        kind: LockKind,
        what: &str,
        timeout: Duration,
    ) -> Result<Result<AdvisoryLock, Option<String>>, sqlx::Error> {
        let started = Instant::now();
        let mut told = false;
        loop {
            if let Some(lock) = Self::try_acquire(pool, kind, what).await? {
                return Ok(Ok(lock));
            }
            if started.elapsed() >= timeout {
                return Ok(Err(holder(pool, kind).await.unwrap_or(None)));
            }
            if !told {
                let holder = holder(pool, kind).await.unwrap_or(None);
                tracing::info!(
                    lock = kind.name(),
                    holder = holder.as_deref().unwrap_or("unknown"),
                    "another run is sending for this state database; waiting for it to finish"
                );
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the lock's session still answers: a leader that lost it (the server restarted,
    /// the network dropped it) must stop sending at once, since another may lead by now.
    pub async fn still_held(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(5), self.conn.ping())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Releases the lock now and ends its session.
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// What a lock's holder says about itself: its process, command and host, within the 63 bytes
/// PostgreSQL keeps of an application name.
fn holder_note(what: &str) -> String {
    let mut note = format!(
        "bynder-usage-sync pid {} ({what}) on {}",
        std::process::id(),
        hostname()
    );
    while note.len() > 63 {
        note.pop();
    }
    note
}

/// The machine's name, for naming a lock's holder.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_owned())
}

/// Who holds the lock, as its holder named itself, if anyone does.
pub async fn holder(pool: &PgPool, kind: LockKind) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = ($1::integer)::oid::bigint \
           AND l.objid = hashtext(current_schema())::oid AND l.objsubid = 2 \
         LIMIT 1",
    )
    .bind(kind.class())
    .fetch_optional(pool)
    .await
}

/// The advisory lock class of what-if copies; the second key is the copy's schema's hash.
const COPY_CLASS: i32 = 0x4255_0003;

/// Says a what-if copy (a schema of its own) is in use, for as long as it lives: its session
/// holds the copy's advisory lock, which the server frees when the process dies.
pub struct CopyInUse {
    _conn: PgConnection,
}

impl std::fmt::Debug for CopyInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyInUse")
    }
}

impl CopyInUse {
    /// Marks the copy `schema` as in use (a new name: nobody else holds its lock).
    pub async fn take(pool: &PgPool, schema: &str) -> Result<CopyInUse, sqlx::Error> {
        let mut conn = session(pool).await?;
        sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
            .bind(COPY_CLASS)
            .bind(schema)
            .execute(&mut conn)
            .await?;
        Ok(CopyInUse { _conn: conn })
    }

    /// Takes the lock of the copy `schema` if no live process holds it: `Some` means the copy
    /// is abandoned, and nobody else will use or drop it while the guard lives.
    pub async fn try_take(pool: &PgPool, schema: &str) -> Result<Option<CopyInUse>, sqlx::Error> {
        let mut conn = session(pool).await?;
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(COPY_CLASS)
            .bind(schema)
            .fetch_one(&mut conn)
            .await?;
        if !free {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(CopyInUse { _conn: conn }))
    }
}

//! Several daemons on one PostgreSQL state database: exactly one leads (plans and sends), the
//! others stand by, ready, and take over when it is gone. The leader holds a session advisory
//! lock ([`LockKind::Leader`]) for as long as it runs:
//!
//! - a standby tries to take it every [`STANDBY_POLL`]; the server frees it the moment the
//!   leader's session ends (stopped, killed: its socket closes) or, for a machine lost, once the
//!   server's keep-alive gives up on it (about 20 s, see [`crate::store::postgres_options`]);
//! - the leader asks its lock's session every [`LEADER_CHECK`] whether it still answers, and the
//!   daemon stops (to be restarted by its supervisor, as a standby) as soon as it does not: cut
//!   off from the server, it cannot know whether another leads by now.
//!
//! Only the leader sends, so Bynder's per-IP rate limit sees one sender however many replicas
//! run behind one egress address. A SQLite state file has a single daemon: it leads at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::health::{Health, Role};
use crate::store::lock::{holder, AdvisoryLock, LockKind};

/// How often a standby tries to take over.
pub const STANDBY_POLL: Duration = Duration::from_secs(2);

/// How often the leader makes sure its lock's session still answers.
pub const LEADER_CHECK: Duration = Duration::from_secs(5);

/// The leader lock's session stopped answering.
#[derive(Debug, thiserror::Error)]
#[error("this daemon lost its leader lock on the state database (its session stopped answering), so another daemon may lead by now; it stops sending and exits. Fix: none needed when a supervisor restarts it (systemd, Kubernetes): it comes back as a standby; check the PostgreSQL server and the network if this repeats")]
pub struct LostLeadership;

/// Stands by until this daemon leads (telling `leading`), then keeps leading until `stop`:
/// `Ok` when stopped, `Err` when the lock was lost.
pub async fn lead(
    pool: sqlx::PgPool,
    health: Arc<Health>,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LostLeadership> {
    let mut told = false;
    let mut lock = loop {
        if *stop.borrow() {
            return Ok(());
        }
        match AdvisoryLock::try_acquire(&pool, LockKind::Leader, "run").await {
            Ok(Some(lock)) => break lock,
            Ok(None) => {
                let leader = holder(&pool, LockKind::Leader).await.ok().flatten();
                if !told {
                    tracing::info!(
                        leader = leader.as_deref().unwrap_or("unknown"),
                        "another daemon leads for this state database; standing by"
                    );
                    told = true;
                }
                health.set_role(Role::Standby { leader });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the state database who leads; standing by");
                health.set_role(Role::Standby { leader: None });
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(STANDBY_POLL) => {}
        }
    };
    tracing::info!("this daemon leads: it plans and sends for the state database");
    health.set_role(Role::Leader);
    leading.send_replace(true);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() {
                    lock.release().await;
                    return Ok(());
                }
            }
            () = tokio::time::sleep(LEADER_CHECK) => {
                if !lock.still_held().await {
                    return Err(LostLeadership);
                }
            }
        }
    }
}

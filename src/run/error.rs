//! Why a run stopped before it could report: the state database, the CMS source, the run lock.
//! What Bynder answers is never a [`RunError`]: the queue's policy turns it into the operation's
//! next state and the run's outcome.

use crate::files::LockError;
use crate::store::StoreError;

/// A run that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state database failed.
    #[error("the state database failed")]
    Store(#[from] sqlx::Error),
    /// Opening or copying the state database failed (a dry run's snapshot).
    #[error(transparent)]
    Open(#[from] StoreError),
    /// The CMS rows could not be read; `reading` names the source.
    #[error("{reading}")]
    Source {
        reading: String,
        #[source]
        source: sqlx::Error,
    },
    /// The source yielded rows out of key order (a bug, or a custom query that ignores the
    /// documented order).
    #[error("internal error: source rows are not in key order")]
    Unsorted,
    /// The plan could not be written to the queue.
    #[error("writing the plan to the queue")]
    WritePlan(#[source] sqlx::Error),
    /// The run lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A worker sending to Bynder panicked.
    #[error("a worker panicked")]
    Worker(#[source] tokio::task::JoinError),
}

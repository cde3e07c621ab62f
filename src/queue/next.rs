//! [`Next`]: an operation's next state after a failed attempt, as the queue's policy decides it
//! and the store writes it. Its own file so that the store depends on this value alone, not on
//! the policy (which reads Bynder's errors).

use chrono::{DateTime, Utc};

/// What happens to an operation after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Back to pending, due at `at`. `counts`: whether the attempt uses up one of the run's tries.
    Retry {
        at: DateTime<Utc>,
        uncertain: bool,
        counts: bool,
    },
    /// Never retried on its own: moved to the dead letters with this reason.
    Dead { reason: String },
}

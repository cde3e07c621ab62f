//! The durable queue's behaviour: what a failed attempt means for the operation and the run
//! ([`policy`], pure) and how the queue is drained against Bynder ([`drain`]). The queue's storage
//! is `store`'s; the run that drains it is `run`'s.

pub mod drain;
pub mod next;
pub mod policy;

pub use self::policy::{backoff, batch_verdict, verdict, BatchVerdict, Next, RunEffect, Verdict};

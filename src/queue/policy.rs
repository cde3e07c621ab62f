//! The retry policy of the durable queue, as pure functions: what a failed attempt means for the
//! operation's next state and for the run ([`verdict`]), and what a failed sync request means for
//! its batch and for how the run goes on sending ([`batch_verdict`]: fall back to per-usage calls,
//! halve the batch, or fail each operation). The queue's storage lives in `store`, the draining in
//! [`super::drain`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::bynder::{Error, Reaction};
use crate::config::RetrySettings;

pub use super::next::Next;

/// Whether the run goes on after this failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEffect {
    Continue,
    /// Bynder's rate limit blocked us: every request waits until `until`.
    Paused {
        until: DateTime<Utc>,
    },
    /// The credentials were rejected: stop sending.
    StopCredentials,
    /// The portal could not be reached even after the run's retries (the last error): stop sending.
    StopUnreachable(String),
    /// Nothing can succeed until the setup is fixed (the message says what): stop sending.
    StopFatal(String),
}

/// The full reaction to one failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub next: Next,
    pub effect: RunEffect,
}

/// Decides what a failed attempt means.
///
/// - `run_attempts`: attempts this run already made for the operation, not counting this one;
/// - `uncertain`: whether Bynder may already hold what this operation creates (an earlier unseen
///   outcome, or a create in this attempt whose answer was lost);
/// - `jitter`: a number in `[0, 1)` picking the delay inside the backoff window (full jitter);
/// - `pause_until`: the end of the rate-limit pause the error started, for 429s.
pub fn verdict(
    error: &Error,
    run_attempts: u32,
    uncertain: bool,
    retry: &RetrySettings,
    now: DateTime<Utc>,
    jitter: f64,
    pause_until: DateTime<Utc>,
) -> Verdict {
    match error.reaction() {
        Reaction::Retry { .. } => {
            let delay = backoff(retry, run_attempts, jitter);
            let exhausted = run_attempts + 1 >= retry.max_attempts;
            let effect = if exhausted && matches!(error, Error::Connect { .. }) {
                RunEffect::StopUnreachable(error.to_string())
            } else {
                RunEffect::Continue
            };
            Verdict {
                next: Next::Retry {
                    at: now + chrono::Duration::from_std(delay).unwrap_or_default(),
                    uncertain,
                    counts: true,
                },
                effect,
            }
        }
        // In-flight requests are not retried during the pause: the operation waits for its end.
        Reaction::PauseAll => Verdict {
            next: Next::Retry {
                at: pause_until,
                uncertain,
                counts: false,
            },
            effect: RunEffect::Paused { until: pause_until },
        },
        Reaction::Fatal => Verdict {
            next: Next::Retry {
                at: now,
                uncertain,
                counts: false,
            },
            effect: RunEffect::StopFatal(error.to_string()),
        },
        Reaction::CredentialsRejected => Verdict {
            next: Next::Retry {
                at: now,
                uncertain,
                counts: false,
            },
            effect: RunEffect::StopCredentials,
        },
        Reaction::GiveUp => Verdict {
            next: Next::Dead {
                reason: dead_reason(error),
            },
            effect: RunEffect::Continue,
        },
    }
}

/// What a failed sync request means for its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchVerdict {
    /// The portal has no sync endpoint (404, 405, 501 in `auto`): per-usage calls for the rest
    /// of the run; the batch's operations go back to the queue untouched.
    NoEndpoint,
    /// The batch was too large (413) and can be halved: halve it and queue the operations again.
    Halve,
    /// The portal refused the batch (400 in `auto`): per-usage calls, whose answers name the
    /// usage at fault; the operations go back to the queue untouched.
    Refused,
    /// Anything else: each operation fails as a per-usage attempt would ([`verdict`]), read back
    /// first when the batch may have been applied.
    FailEach { maybe_applied: bool },
}

/// Decides what a failed sync request means. `auto`: `sync.strategy = "auto"` (only then may the
/// run fall back to per-usage calls); `batch_size`: the run's current batch size.
pub fn batch_verdict(error: &Error, auto: bool, batch_size: usize) -> BatchVerdict {
    match error.status().map(|s| s.as_u16()) {
        Some(404 | 405 | 501) if auto => BatchVerdict::NoEndpoint,
        Some(413) if batch_size > 1 => BatchVerdict::Halve,
        Some(400) if auto => BatchVerdict::Refused,
        _ => BatchVerdict::FailEach {
            maybe_applied: matches!(
                error.reaction(),
                Reaction::Retry {
                    maybe_applied: true
                }
            ),
        },
    }
}

/// Exponential backoff with full jitter: a delay in `[0, min(max, initial * 2^attempt))`.
pub fn backoff(retry: &RetrySettings, attempt: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(30));
    let window = retry
        .initial_backoff
        .saturating_mul(factor)
        .min(retry.max_backoff);
    window.mul_f64(jitter.clamp(0.0, 1.0))
}

fn dead_reason(error: &Error) -> String {
    match error.status().map(|s| s.as_u16()) {
        Some(404) => format!("Bynder does not know this asset (404): {error}"),
        Some(403) => format!(
            "Bynder refused (403): the token's user needs the STATISTICS security role and the \
             asset.usage:write scope: {error}"
        ),
        Some(400) => format!("Bynder rejected the request (400): {error}"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn retry() -> RetrySettings {
        RetrySettings {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_attempts: 4,
        }
    }

    fn status(code: u16) -> Error {
        Error::Status {
            status: StatusCode::from_u16(code).unwrap(),
            body: "b".into(),
        }
    }

    fn connect() -> Error {
        Error::Connect {
            url: "https://x".into(),
            detail: "refused".into(),
        }
    }

    fn run(error: &Error, attempts: u32, uncertain: bool) -> Verdict {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        verdict(
            error,
            attempts,
            uncertain,
            &retry(),
            now,
            0.5,
            now + chrono::Duration::seconds(300),
        )
    }

    #[test]
    fn backoff_doubles_within_a_capped_window_and_jitter_picks_inside_it() {
        let r = retry();
        assert_eq!(backoff(&r, 0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&r, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&r, 10, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&r, 40, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&r, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff(&r, 3, 0.25), Duration::from_secs(2));
    }

    #[test]
    fn every_failure_class_gets_its_documented_reaction() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let cases: Vec<(Error, bool /*dead*/, RunEffect)> = vec![
            (connect(), false, RunEffect::Continue),
            (
                Error::Timeout(Duration::from_secs(1)),
                false,
                RunEffect::Continue,
            ),
            (Error::Transport("reset".into()), false, RunEffect::Continue),
            (Error::Decode("garbage".into()), false, RunEffect::Continue),
            (status(500), false, RunEffect::Continue),
            (status(502), false, RunEffect::Continue),
            (status(503), false, RunEffect::Continue),
            (status(408), false, RunEffect::Continue),
            (
                status(429),
                false,
                RunEffect::Paused {
                    until: now + chrono::Duration::seconds(300),
                },
            ),
            (status(401), false, RunEffect::StopCredentials),
            (status(400), true, RunEffect::Continue),
            (status(403), true, RunEffect::Continue),
            (status(404), true, RunEffect::Continue),
            (status(413), true, RunEffect::Continue),
            (
                Error::Redirect {
                    status: StatusCode::MOVED_PERMANENTLY,
                    location: "/x".into(),
                },
                true,
                RunEffect::Continue,
            ),
            (
                Error::Tls("untrusted".into()),
                false,
                RunEffect::StopFatal("TLS failed: untrusted".into()),
            ),
        ];
        for (error, dead, effect) in cases {
            let v = run(&error, 0, false);
            assert_eq!(matches!(v.next, Next::Dead { .. }), dead, "{error:?}");
            assert_eq!(v.effect, effect, "{error:?}");
        }
    }

    #[test]
    fn transient_failures_count_as_attempts_but_pauses_and_rejected_credentials_do_not() {
        let counts = |e: &Error| match run(e, 0, false).next {
            Next::Retry { counts, .. } => counts,
            Next::Dead { .. } => panic!("not dead"),
        };
        assert!(counts(&status(503)));
        assert!(!counts(&status(429)));
        assert!(!counts(&status(401)));
    }

    #[test]
    fn a_429_waits_for_the_end_of_the_pause() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        match run(&status(429), 0, false).next {
            Next::Retry { at, .. } => assert_eq!(at, now + chrono::Duration::seconds(300)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_uncertain_flag_is_carried_into_the_next_attempt() {
        for e in [status(500), status(429), status(401), connect()] {
            match run(&e, 0, true).next {
                Next::Retry { uncertain, .. } => assert!(uncertain, "{e:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_unreachable_portal_stops_the_run_once_the_retries_are_used_up() {
        assert_eq!(run(&connect(), 2, false).effect, RunEffect::Continue);
        assert!(
            matches!(run(&connect(), 3, false).effect, RunEffect::StopUnreachable(m) if m.contains("refused"))
        );
        // A server error is not "unreachable": the run goes on with other operations.
        assert_eq!(run(&status(503), 3, false).effect, RunEffect::Continue);
    }

    #[test]
    fn dead_letter_reasons_name_the_cause() {
        let reason = |e: &Error| match run(e, 0, false).next {
            Next::Dead { reason } => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(&status(404)).contains("does not know this asset"));
        assert!(reason(&status(403)).contains("STATISTICS"));
        assert!(reason(&status(400)).contains("rejected"));
    }

    #[test]
    fn a_failed_sync_batch_falls_back_halves_or_fails_each_operation() {
        for code in [404, 405, 501] {
            assert_eq!(
                batch_verdict(&status(code), true, 1000),
                BatchVerdict::NoEndpoint
            );
            // Only `auto` may fall back; a forced sync strategy fails the operations.
            assert!(matches!(
                batch_verdict(&status(code), false, 1000),
                BatchVerdict::FailEach { .. }
            ));
        }
        assert_eq!(batch_verdict(&status(413), false, 2), BatchVerdict::Halve);
        assert_eq!(batch_verdict(&status(413), true, 2), BatchVerdict::Halve);
        assert!(matches!(
            batch_verdict(&status(413), true, 1),
            BatchVerdict::FailEach { .. }
        ));
        assert_eq!(batch_verdict(&status(400), true, 10), BatchVerdict::Refused);
        assert!(matches!(
            batch_verdict(&status(400), false, 10),
            BatchVerdict::FailEach { .. }
        ));
        assert_eq!(
            batch_verdict(&connect(), true, 10),
            BatchVerdict::FailEach {
                maybe_applied: false
            }
        );
        assert_eq!(
            batch_verdict(&status(503), true, 10),
            BatchVerdict::FailEach {
                maybe_applied: matches!(
                    status(503).reaction(),
                    Reaction::Retry {
                        maybe_applied: true
                    }
                )
            }
        );
    }
}

//! The daemon's health as it knows it: what Bynder last said about the credentials and the last
//! run it finished. The worker writes it; `/readyz`, `/metrics` and the status page read it. It
//! neither runs nor serves anything.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::run::{RunError, RunOutcome, RunReport};
use crate::text::error_chain;

/// What the daemon last learned about its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialState {
    /// No request has answered yet (the portal was unreachable since start).
    Unchecked,
    /// Bynder accepted them on the last request that said anything about them.
    Accepted,
    /// Bynder answered 401, with the fix to show.
    Rejected(String),
}

/// This daemon's part among the daemons sharing its state database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The only one there can be (a SQLite state file: one machine, one daemon).
    Single,
    /// It holds the leader lock: it plans and sends.
    Leader,
    /// Another daemon leads (named as it named itself, when known); this one takes over when
    /// that one's session ends.
    Standby { leader: Option<String> },
}

impl Role {
    pub fn label(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Standby { .. } => "standby",
        }
    }
}

/// The last run the daemon finished.
#[derive(Debug, Clone)]
pub struct LastRun {
    pub command: &'static str,
    /// A [`RunOutcome::label`], or `error`.
    pub outcome: String,
    pub message: Option<String>,
    pub finished_at: DateTime<Utc>,
}

/// The daemon's view of its own health: written by the worker, read by `/readyz`, `/metrics`
/// and the status page.
#[derive(Debug)]
pub struct Health {
    // A std mutex: held for a copy, never across an await.
    state: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    credentials: CredentialState,
    last_run: Option<LastRun>,
    started_at: DateTime<Utc>,
    role: Role,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(HealthState {
                credentials: CredentialState::Unchecked,
                last_run: None,
                started_at: Utc::now(),
                role: Role::Single,
            }),
        }
    }
}

impl Health {
    pub fn credentials(&self) -> CredentialState {
        self.lock().credentials.clone()
    }

    pub fn last_run(&self) -> Option<LastRun> {
        self.lock().last_run.clone()
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.lock().started_at
    }

    pub fn role(&self) -> Role {
        self.lock().role.clone()
    }

    pub fn set_role(&self, role: Role) {
        self.lock().role = role;
    }

    /// Records what a run's outcome says about the credentials: a 401 rejects them; any other
    /// outcome that made requests shows they were accepted.
    pub fn record_run(&self, command: &'static str, report: &RunReport) {
        let mut state = self.lock();
        match &report.outcome {
            RunOutcome::CredentialsRejected(m) => {
                state.credentials = CredentialState::Rejected(m.clone())
            }
            RunOutcome::Unreachable(_) => {}
            _ if report.sent.requests > 0 => state.credentials = CredentialState::Accepted,
            _ => {}
        }
        let message = match &report.outcome {
            RunOutcome::MassDeleteRefused(m)
            | RunOutcome::Unreachable(m)
            | RunOutcome::CredentialsRejected(m) => Some(m.clone()),
            _ => None,
        };
        state.last_run = Some(LastRun {
            command,
            outcome: report.outcome.label().to_owned(),
            message,
            finished_at: Utc::now(),
        });
    }

    pub fn record_error(&self, command: &'static str, error: &RunError) {
        self.lock().last_run = Some(LastRun {
            command,
            outcome: "error".to_owned(),
            message: Some(error_chain(error)),
            finished_at: Utc::now(),
        });
    }

    pub fn set_credentials(&self, credentials: CredentialState) {
        self.lock().credentials = credentials;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{PlanReport, SendReport};

    fn report(outcome: RunOutcome, requests: u64) -> RunReport {
        RunReport {
            run_id: Some(1),
            outcome,
            plan: PlanReport::default(),
            sent: SendReport {
                requests,
                ..SendReport::default()
            },
            dead_letters: 0,
            verify: None,
        }
    }

    #[test]
    fn a_rejected_run_rejects_the_credentials_and_a_later_run_that_sent_accepts_them() {
        let health = Health::default();
        assert_eq!(health.credentials(), CredentialState::Unchecked);
        health.record_run(
            "reconcile",
            &report(RunOutcome::CredentialsRejected("401. Fix: x".into()), 1),
        );
        assert!(matches!(health.credentials(), CredentialState::Rejected(m) if m.contains("Fix")));
        // A run that sent nothing says nothing about the credentials.
        health.record_run("reconcile", &report(RunOutcome::NothingToDo, 0));
        assert!(matches!(health.credentials(), CredentialState::Rejected(_)));
        health.record_run("drain", &report(RunOutcome::Converged, 3));
        assert_eq!(health.credentials(), CredentialState::Accepted);
        let last = health.last_run().unwrap();
        assert_eq!(
            (last.command, last.outcome.as_str()),
            ("drain", "converged")
        );
    }

    #[test]
    fn an_unreachable_portal_says_nothing_about_the_credentials() {
        let health = Health::default();
        health.record_run("reconcile", &report(RunOutcome::Converged, 2));
        health.record_run(
            "reconcile",
            &report(RunOutcome::Unreachable("down".into()), 6),
        );
        assert_eq!(health.credentials(), CredentialState::Accepted);
        assert_eq!(health.last_run().unwrap().message.as_deref(), Some("down"));
    }
}

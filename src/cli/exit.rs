//! The documented exit codes ([`Exit`]) and the one failure type every command ends with
//! ([`Failure`]): each error a user can cause is turned into its message and its code here.

use std::process::ExitCode;

use crate::app::BuildError;
use crate::auth::{AuthError, AuthFailure};
use crate::config::ConfigError;
use crate::files::LockError;
use crate::run::RunError;
use crate::store::StoreError;

/// Documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Converged, or nothing to do.
    Ok = 0,
    /// Unexpected error, portal unreachable after retries included.
    Unexpected = 1,
    /// Invalid command line (clap's own code for argument errors).
    Usage = 2,
    /// Finished, but some operations failed and wait in the queue or as dead letters (or the
    /// mass-delete guard held the run back).
    Partial = 3,
    /// Bynder rejected the credentials.
    Credentials = 4,
    /// With `--detailed-exitcode`: something would change (dry run) or changed.
    Changes = 10,
    /// Another process held the run lock longer than `database.lock_timeout` (EX_TEMPFAIL).
    Busy = 75,
    /// Configuration error (EX_CONFIG).
    Config = 78,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A failure that ends the process with a message and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(StoreError),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Busy(crate::files::LockTimeout),
    /// A command line that names something that does not exist.
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Unexpected(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<crate::files::LockError>() {
            Ok(crate::files::LockError::Timeout(timeout)) => Failure::Busy(timeout),
            Ok(other) => Failure::Unexpected(other.into()),
            Err(e) => Failure::Unexpected(e),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Missing(_)
            | StoreError::NotMigrated(_)
            | StoreError::MigrationsNotRun(_)
            | StoreError::Open { .. }
            | StoreError::Unsupported { .. } => Failure::Setup(e),
            // The server answered and refused (wrong user, password or database name): the
            // configuration is wrong. An unreachable server may come back (exit 1).
            StoreError::Connect {
                cause: sqlx::Error::Database(_) | sqlx::Error::Configuration(_),
                ..
            } => Failure::Setup(e),
            other => Failure::Unexpected(other.into()),
        }
    }
}

impl From<BuildError> for Failure {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::Store(e) => e.into(),
            BuildError::Auth(e) => e.into(),
            BuildError::Config(e) => Failure::Config(e),
            BuildError::SourceUnreachable(m) => Failure::Unreachable(m),
            e @ BuildError::Profile(_) => Failure::Unexpected(e.into()),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NotLoggedIn(m) => Failure::Config(ConfigError::new(m)),
            AuthError::Setup(_) => Failure::Config(ConfigError::new(e.to_string())),
            AuthError::Store(_) => Failure::Unexpected(anyhow::Error::new(e)),
            e => match e.failure() {
                AuthFailure::Rejected => Failure::Credentials(e.to_string()),
                AuthFailure::Transient | AuthFailure::RateLimited => {
                    Failure::Unreachable(format!("{e}. Try again later"))
                }
            },
        }
    }
}

impl From<RunError> for Failure {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Lock(LockError::Timeout(timeout)) => Failure::Busy(timeout),
            RunError::Open(e) => e.into(),
            e => Failure::Unexpected(anyhow::Error::new(e)),
        }
    }
}

impl From<crate::daemon::DaemonError> for Failure {
    fn from(e: crate::daemon::DaemonError) -> Self {
        Failure::Unexpected(anyhow::Error::new(e))
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Unexpected(anyhow::Error::new(e).context("state database"))
    }
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Config(_) | Failure::Setup(_) => Exit::Config,
            Failure::Credentials(_) => Exit::Credentials,
            Failure::Busy(_) => Exit::Busy,
            Failure::Usage(_) => Exit::Usage,
            Failure::Unreachable(_) | Failure::Unexpected(_) => Exit::Unexpected,
        }
    }
}

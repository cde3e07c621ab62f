//! The composition root: [`Context`], everything a run needs (configuration, state database,
//! CMS source, Bynder client with its credentials and request gate, the portal profile), and
//! [`build_context`], the one place they are put together. The command line, the daemon, the
//! demo and the tests all start here. It owns no behaviour of its own.

use std::sync::Arc;

use crate::auth::{AuthError, Credentials};
use crate::bynder::Client;
use crate::config::{Config, ConfigError};
use crate::gate::Gate;
use crate::profile::PortalProfile;
use crate::store::source::{Source, SourceError};
use crate::store::{open_store, OpenMode, Store, StoreError};

/// Everything a run needs.
#[derive(Clone)]
pub struct Context {
    pub config: Config,
    pub store: Store,
    pub source: Source,
    pub client: Arc<Client>,
    /// What the daemon learned about this portal; the sending side reads and extends it.
    pub profile: Arc<PortalProfile>,
}

impl Context {
    /// The same connections and credentials with another configuration (a reload).
    pub fn with_config(&self, config: Config) -> Context {
        Context {
            config,
            ..self.clone()
        }
    }
}

/// Why a [`Context`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The state database is missing, unmigrated or unreadable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The credentials could not be loaded (or, for OAuth 2, a first token fetched).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A configuration problem found while connecting (the CA file, the custom source).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `source.url` database server could not be reached.
    #[error("{0}")]
    SourceUnreachable(String),
    /// The portal profile could not be read from the state database.
    #[error("reading the portal profile from the state database")]
    Profile(#[source] sqlx::Error),
}

/// Builds the run context: store, credentials, client, source and profile.
pub async fn build_context(config: Config) -> Result<Context, BuildError> {
    let store = open_store(&config.database, OpenMode::Existing).await?;
    let gate = Arc::new(Gate::new(
        config.limits.requests_per_second,
        config.limits.block_pause,
    ));
    let credentials = Credentials::load(&config, Some(&store), gate.clone()).await?;
    let client = Client::new(&config, credentials, gate)
        .map_err(|e| ConfigError::new(format!("{e}. Fix: check bynder.ca_file")))?;
    let source = crate::store::source::open_source(&config)
        .await
        .map_err(|e| match e {
            SourceError::Config(e) => BuildError::Config(e),
            SourceError::Unreachable(m) => BuildError::SourceUnreachable(m),
        })?;
    let profile = PortalProfile::load(&store, config.bynder.base_url.as_str())
        .await
        .map_err(BuildError::Profile)?;
    Ok(Context {
        config,
        store,
        source,
        client: Arc::new(client),
        profile: Arc::new(profile),
    })
}

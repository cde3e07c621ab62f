//! Authentication: turns the configured credentials into an authorized request.
//!
//! Owns the secrets after configuration hands them over; they are exposed only here, while a
//! request is being signed. It does not know which endpoint a request is for.

use secrecy::{ExposeSecret, SecretString};

use crate::config::AuthSettings;

/// Why a request could not be authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the credential header could not be built: {0}")]
    Header(String),
}

/// The credentials a client signs its requests with.
pub struct Credentials {
    kind: Kind,
}

enum Kind {
    /// A permanent token, sent as a bearer token. It never expires; a 401 means it was revoked.
    Bearer(SecretString),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("method", &self.method_name())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_settings(settings: &AuthSettings) -> Self {
        match settings {
            AuthSettings::PermanentToken { token } => Credentials {
                kind: Kind::Bearer(token.clone()),
            },
        }
    }

    pub fn method_name(&self) -> &'static str {
        match self.kind {
            Kind::Bearer(_) => "permanent_token",
        }
    }

    /// Adds the `Authorization` header to a request that is about to be sent.
    pub async fn authorize(&self, request: &mut reqwest::Request) -> Result<(), AuthError> {
        match &self.kind {
            Kind::Bearer(token) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!(
                    "Bearer {}",
                    token.expose_secret()
                ))
                .map_err(|_| {
                    AuthError::Header(
                        "the token contains characters not allowed in a header".into(),
                    )
                })?;
                value.set_sensitive(true);
                request
                    .headers_mut()
                    .insert(reqwest::header::AUTHORIZATION, value);
                Ok(())
            }
        }
    }

    /// Called once when Bynder answered 401 to a request authorized with these credentials.
    /// Returns true when fresh credentials were obtained and the request is worth sending again
    /// (an OAuth2 access token renewed); false when nothing can change (a permanent token).
    pub async fn renew_after_rejection(&self) -> Result<bool, AuthError> {
        match self.kind {
            Kind::Bearer(_) => Ok(false),
        }
    }

    /// Hint for a user whose credentials Bynder rejected.
    pub fn rejection_fix(&self) -> &'static str {
        match self.kind {
            Kind::Bearer(_) => {
                "check auth.permanent_token: it may be mistyped, revoked, or for another portal \
                 (Settings > Advanced Settings > Portal Settings > Permanent Tokens)"
            }
        }
    }
}

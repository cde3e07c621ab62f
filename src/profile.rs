//! The portal profile: what the daemon has learned about the portal it talks to where Bynder's
//! documentation is silent, remembered in the state database with when and how it was learned.
//!
//! Runs learn as they go (a sync answer's shape, a read-back that shows whether the sync removed
//! an omitted asset, a 404 from the sync endpoint) and `probe` learns everything at once. The
//! sending side reads the profile to pick the means that is certain and cheapest on this portal
//! (see `docs/bynder-behaviour.md`). It owns no HTTP and no SQL of its own: storage is
//! [`crate::store`].

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::store::{self, Store};

/// One thing a portal may do either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fact {
    /// `POST /api/media/usage/sync` exists (`yes`/`no`).
    SyncEndpoint,
    /// The sync removes an asset left out of a listed uri that keeps other usages (`yes`), or
    /// only empties uris listed with no usage at all (`no`).
    SyncRemovesOmitted,
    /// The sync answers `{accepted, new, rejected, removed}` (`full`) or nothing usable
    /// (`empty`: 204, `{}`, `[]`).
    SyncAnswer,
    /// Asset ids come back as sent (`preserved`) or in another letter case (`recased`).
    AssetIdCase,
    /// A second create of the same (asset, uri) makes a second usage (`duplicates`) or not
    /// (`deduplicates`). Learned by `probe` only.
    RepeatedCreate,
    /// `GET /api/media/usage/` answers without `asset_id` (`yes`/`no`). Learned by `probe` only.
    ListWithoutAssetId,
}

impl Fact {
    pub const ALL: [Fact; 6] = [
        Fact::SyncEndpoint,
        Fact::SyncRemovesOmitted,
        Fact::SyncAnswer,
        Fact::AssetIdCase,
        Fact::RepeatedCreate,
        Fact::ListWithoutAssetId,
    ];

    /// The name stored and shown.
    pub fn key(self) -> &'static str {
        match self {
            Fact::SyncEndpoint => "sync_endpoint",
            Fact::SyncRemovesOmitted => "sync_removes_omitted",
            Fact::SyncAnswer => "sync_answer",
            Fact::AssetIdCase => "asset_id_case",
            Fact::RepeatedCreate => "repeated_create",
            Fact::ListWithoutAssetId => "list_without_asset_id",
        }
    }

    /// What the fact is about, for people.
    pub fn question(self) -> &'static str {
        match self {
            Fact::SyncEndpoint => "sync endpoint exists",
            Fact::SyncRemovesOmitted => {
                "sync removes an asset omitted from a uri that keeps others"
            }
            Fact::SyncAnswer => "sync answer",
            Fact::AssetIdCase => "asset ids in answers",
            Fact::RepeatedCreate => "a repeated create",
            Fact::ListWithoutAssetId => "GET without asset_id",
        }
    }

    fn from_key(key: &str) -> Option<Fact> {
        Fact::ALL.into_iter().find(|f| f.key() == key)
    }
}

/// One learned fact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Learned {
    pub fact: Fact,
    pub value: String,
    pub learned_at: String,
    /// How it was learned (the run or probe step that showed it).
    pub evidence: String,
}

/// How long a portal's missing sync endpoint is believed before it is tried again (portals
/// are upgraded).
const ABSENT_SYNC_ENDPOINT_TRUSTED: chrono::Duration = chrono::Duration::hours(24);

/// The profile of one portal (keyed by its base URL), shared by a run's workers.
pub struct PortalProfile {
    portal: String,
    store: Store,
    facts: Mutex<BTreeMap<Fact, Learned>>,
}

impl std::fmt::Debug for PortalProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalProfile")
            .field("portal", &self.portal)
            .field("facts", &self.facts())
            .finish()
    }
}

impl PortalProfile {
    /// Loads what the state database knows about `portal` (a base URL).
    pub async fn load(store: &Store, portal: &str) -> Result<PortalProfile, sqlx::Error> {
        let portal = portal.trim_end_matches('/').to_owned();
        let facts = store
            .portal_facts(&portal)
            .await?
            .into_iter()
            .filter_map(|(fact, value, learned_at, evidence)| {
                let fact = Fact::from_key(&fact)?;
                Some((
                    fact,
                    Learned {
                        fact,
                        value,
                        learned_at,
                        evidence,
                    },
                ))
            })
            .collect();
        Ok(PortalProfile {
            portal,
            store: store.clone(),
            facts: Mutex::new(facts),
        })
    }

    pub fn portal(&self) -> &str {
        &self.portal
    }

    /// Everything learned, in a stable order.
    pub fn facts(&self) -> Vec<Learned> {
        self.facts
            .lock()
            .expect("profile lock")
            .values()
            .cloned()
            .collect()
    }

    /// The learned value of one fact.
    pub fn get(&self, fact: Fact) -> Option<String> {
        self.facts
            .lock()
            .expect("profile lock")
            .get(&fact)
            .map(|l| l.value.clone())
    }

    /// Remembers a fact. Written only when the value changes, so the steady state costs no
    /// writes; a changed value is logged, since the portal behaves differently than before.
    pub async fn learn(&self, fact: Fact, value: &str, evidence: &str) -> Result<(), sqlx::Error> {
        let learned = {
            let mut facts = self.facts.lock().expect("profile lock");
            if facts.get(&fact).is_some_and(|l| l.value == value) {
                return Ok(());
            }
            let learned = Learned {
                fact,
                value: value.to_owned(),
                learned_at: store::now_text(),
                // Evidence may quote the portal's answers: no control character reaches a terminal.
                evidence: evidence
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect(),
            };
            facts.insert(fact, learned.clone());
            learned
        };
        tracing::info!(
            fact = fact.key(),
            value,
            evidence,
            "learned how the portal behaves"
        );
        self.store
            .save_portal_fact(
                &self.portal,
                fact.key(),
                &learned.value,
                &learned.learned_at,
                &learned.evidence,
            )
            .await
    }

    /// Whether the sync endpoint is known to be missing (and that knowledge is recent enough).
    pub fn sync_endpoint_missing(&self) -> bool {
        let facts = self.facts.lock().expect("profile lock");
        facts.get(&Fact::SyncEndpoint).is_some_and(|l| {
            l.value == "no"
                && chrono::DateTime::parse_from_rfc3339(&l.learned_at).is_ok_and(|t| {
                    chrono::Utc::now() - t.with_timezone(&chrono::Utc)
                        < ABSENT_SYNC_ENDPOINT_TRUSTED
                })
        })
    }

    /// Whether the sync is known to leave an omitted asset on a uri that keeps others.
    pub fn sync_keeps_omitted(&self) -> bool {
        self.get(Fact::SyncRemovesOmitted).as_deref() == Some("no")
    }

    /// Whether the sync is known to answer nothing that confirms a change.
    pub fn sync_answer_empty(&self) -> bool {
        self.get(Fact::SyncAnswer).as_deref() == Some("empty")
    }
}

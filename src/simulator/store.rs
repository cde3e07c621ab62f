//! The simulated portal's usage records ([`Usage`], as the handle shows them) and the
//! indexes over them.
//!
//! Owns storage only: no HTTP, no authorization, no knowledge of which request asked.
//! Records are indexed by id, by asset and by (integration, uri), so every request
//! touches only the records it is about, even with a million stored (the benchmarks load
//! that many). Strings a million records repeat (integration ids, asset ids, uris) are
//! shared through `Arc<str>` with the index keys instead of being copied.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

/// One usage record as the portal stores it (flat; the wire form nests the integration).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// The usage id (a UUID).
    pub id: String,
    /// The integration that owns the usage.
    pub integration_id: String,
    /// The Bynder asset (media) id.
    pub asset_id: String,
    /// Where the asset is used.
    pub uri: String,
    /// Free text.
    pub additional: String,
    /// When the usage was recorded, RFC 3339 with microseconds and a `+00:00` offset.
    pub timestamp: String,
}

/// One stored usage.
pub(super) struct Record {
    /// Creation order, so that answers list usages oldest first.
    pub seq: u64,
    pub integration_id: Arc<str>,
    pub asset_id: Arc<str>,
    pub uri: Arc<str>,
    pub additional: String,
    pub timestamp: DateTime<Utc>,
}

impl Record {
    pub fn to_usage(&self, id: &Uuid) -> Usage {
        Usage {
            id: id.to_string(),
            integration_id: self.integration_id.to_string(),
            asset_id: self.asset_id.to_string(),
            uri: self.uri.to_string(),
            additional: self.additional.clone(),
            timestamp: format_timestamp(&self.timestamp),
        }
    }
}

/// The timestamp format the portal answers with. Bynder's is unknown; this one has
/// microseconds and a `+00:00` offset, so a client that compares it textually with the
/// `...Z` it sent finds out here rather than in production.
pub(super) fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// Every usage record and the indexes over them.
#[derive(Default)]
pub(super) struct Store {
    next_seq: u64,
    records: HashMap<Uuid, Record>,
    by_asset: HashMap<Arc<str>, HashSet<Uuid>>,
    /// Integration id, then uri: one page as one integration sees it. Nested rather than
    /// keyed by a pair so that a lookup borrows the request's strings.
    by_page: HashMap<Arc<str>, HashMap<Arc<str>, HashSet<Uuid>>>,
    /// Interned integration ids; there are only a handful.
    integrations: HashSet<Arc<str>>,
}

impl Store {
    /// Stores a new usage and returns its id. Never deduplicates.
    pub fn insert(
        &mut self,
        integration_id: &str,
        asset_id: &str,
        uri: &str,
        additional: &str,
        timestamp: DateTime<Utc>,
    ) -> Uuid {
        let id = random_uuid();
        let integration_id = intern(&mut self.integrations, integration_id);
        let asset_id = match self.by_asset.get_key_value(asset_id) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(asset_id),
        };
        let pages = self.by_page.entry(Arc::clone(&integration_id)).or_default();
        let uri = match pages.get_key_value(uri) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(uri),
        };
        pages.entry(Arc::clone(&uri)).or_default().insert(id);
        self.by_asset
            .entry(Arc::clone(&asset_id))
            .or_default()
            .insert(id);
        self.next_seq += 1;
        self.records.insert(
            id,
            Record {
                seq: self.next_seq,
                integration_id,
                asset_id,
                uri,
                additional: additional.to_owned(),
                timestamp,
            },
        );
        id
    }

    /// Removes one usage; `None` when there was none with that id.
    pub fn remove(&mut self, id: &Uuid) -> Option<Record> {
        let record = self.records.remove(id)?;
        remove_from_index(&mut self.by_asset, &*record.asset_id, id);
        if let Some(pages) = self.by_page.get_mut(&*record.integration_id) {
            remove_from_index(pages, &*record.uri, id);
            if pages.is_empty() {
                self.by_page.remove(&*record.integration_id);
            }
        }
        Some(record)
    }

    pub fn get(&self, id: &Uuid) -> Option<&Record> {
        self.records.get(id)
    }

    pub fn usage(&self, id: &Uuid) -> Option<Usage> {
        self.records.get(id).map(|record| record.to_usage(id))
    }

    /// Replaces the `additional` text of one usage; false when it does not exist.
    pub fn set_additional(&mut self, id: &Uuid, additional: &str) -> bool {
        match self.records.get_mut(id) {
            Some(record) => {
                additional.clone_into(&mut record.additional);
                true
            }
            None => false,
        }
    }

    /// The usages of one asset, optionally narrowed to one integration and one uri,
    /// oldest first. Starts from whichever index holds fewer candidates.
    pub fn find(
        &self,
        asset_id: &str,
        integration_id: Option<&str>,
        uri: Option<&str>,
    ) -> Vec<Uuid> {
        let of_asset = self.by_asset.get(asset_id);
        let of_page = match (integration_id, uri) {
            (Some(integration_id), Some(uri)) => Some(self.page_ids(integration_id, uri)),
            _ => None,
        };
        let candidates: Box<dyn Iterator<Item = &Uuid>> = match (of_asset, &of_page) {
            (None, _) => return Vec::new(),
            (Some(of_asset), Some(of_page)) if of_page.len() < of_asset.len() => {
                Box::new(of_page.iter())
            }
            (Some(of_asset), _) => Box::new(of_asset.iter()),
        };
        let mut found: Vec<(u64, Uuid)> = candidates
            .filter_map(|id| self.records.get(id).map(|record| (id, record)))
            .filter(|(_, record)| {
                &*record.asset_id == asset_id
                    && integration_id.is_none_or(|wanted| &*record.integration_id == wanted)
                    && uri.is_none_or(|wanted| &*record.uri == wanted)
            })
            .map(|(id, record)| (record.seq, *id))
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, id)| id).collect()
    }

    /// The ids of every usage one integration has on one uri, oldest first.
    pub fn page(&self, integration_id: &str, uri: &str) -> Vec<Uuid> {
        let mut found: Vec<(u64, Uuid)> = self
            .page_ids(integration_id, uri)
            .iter()
            .filter_map(|id| self.records.get(id).map(|record| (record.seq, *id)))
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, id)| id).collect()
    }

    /// The ids of every usage of one integration, on any uri, oldest first. Reads only
    /// that integration's part of the page index.
    pub fn integration(&self, integration_id: &str) -> Vec<Uuid> {
        let mut found: Vec<(u64, Uuid)> = self
            .by_page
            .get(integration_id)
            .into_iter()
            .flat_map(HashMap::values)
            .flatten()
            .filter_map(|id| self.records.get(id).map(|record| (record.seq, *id)))
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, id)| id).collect()
    }

    fn page_ids(&self, integration_id: &str, uri: &str) -> &HashSet<Uuid> {
        static EMPTY: std::sync::LazyLock<HashSet<Uuid>> = std::sync::LazyLock::new(HashSet::new);
        self.by_page
            .get(integration_id)
            .and_then(|pages| pages.get(uri))
            .unwrap_or(&EMPTY)
    }

    /// Every usage, sorted by (integration_id, asset_id, uri, id).
    pub fn all_sorted(&self) -> Vec<Usage> {
        sorted(self.records.iter().collect())
    }

    /// One integration's usages, sorted like [`Store::all_sorted`].
    pub fn integration_sorted(&self, integration_id: &str) -> Vec<Usage> {
        sorted(
            self.records
                .iter()
                .filter(|(_, record)| &*record.integration_id == integration_id)
                .collect(),
        )
    }
}

/// Sorts before converting, so that a million entries move as pairs of references rather
/// than as six-string structs. A UUID's byte order is the order of its hyphenated
/// lower-case text, so comparing ids as bytes matches comparing them as strings.
fn sorted(mut records: Vec<(&Uuid, &Record)>) -> Vec<Usage> {
    records.sort_unstable_by(|(a_id, a), (b_id, b)| {
        (&*a.integration_id, &*a.asset_id, &*a.uri, a_id).cmp(&(
            &*b.integration_id,
            &*b.asset_id,
            &*b.uri,
            b_id,
        ))
    });
    records
        .into_iter()
        .map(|(id, record)| record.to_usage(id))
        .collect()
}

fn intern(pool: &mut HashSet<Arc<str>>, value: &str) -> Arc<str> {
    if let Some(existing) = pool.get(value) {
        return Arc::clone(existing);
    }
    let value: Arc<str> = Arc::from(value);
    pool.insert(Arc::clone(&value));
    value
}

fn remove_from_index<K, Q>(index: &mut HashMap<K, HashSet<Uuid>>, key: &Q, id: &Uuid)
where
    K: std::borrow::Borrow<Q> + Eq + std::hash::Hash,
    Q: Eq + std::hash::Hash + ?Sized,
{
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

/// A version-4 UUID from the thread-local generator: `Uuid::new_v4` asks the OS for
/// randomness on every call, which is slow when seeding a million usages.
fn random_uuid() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_narrows_by_integration_and_uri_and_lists_oldest_first() {
        let mut store = Store::default();
        let now = Utc::now();
        let first = store.insert("int-a", "asset-1", "https://cms/1", "", now);
        let other_page = store.insert("int-a", "asset-1", "https://cms/2", "", now);
        let _other_integration = store.insert("int-b", "asset-1", "https://cms/1", "", now);
        let second = store.insert("int-a", "asset-1", "https://cms/1", "", now);

        assert_eq!(store.find("asset-1", None, None).len(), 4);
        assert_eq!(
            store.find("asset-1", Some("int-a"), Some("https://cms/1")),
            vec![first, second]
        );
        assert_eq!(store.page("int-a", "https://cms/1"), vec![first, second]);
        assert_eq!(store.integration("int-a"), vec![first, other_page, second]);
        assert!(store.integration("int-c").is_empty());
        assert!(store.find("asset-2", None, None).is_empty());
    }

    #[test]
    fn remove_drops_the_record_from_every_index() {
        let mut store = Store::default();
        let id = store.insert("int-a", "asset-1", "https://cms/1", "", Utc::now());

        assert!(store.remove(&id).is_some());
        assert!(store.remove(&id).is_none());
        assert!(store.find("asset-1", None, None).is_empty());
        assert!(store.page("int-a", "https://cms/1").is_empty());
        assert!(store.by_asset.is_empty() && store.by_page.is_empty());
    }
}

//! Drift repair (`resync --verify`): reads back what Bynder holds for every asset we manage and
//! corrects the recorded state, so that the ordinary plan that follows repairs the differences:
//! usages removed by hand are re-created, usages added under our ownership are deleted, wrong
//! notes are rewritten, duplicates collapse to one.
//!
//! Bynder can only be read per asset (`GET ?asset_id&integration_id`), so the assets checked are
//! those of the CMS rows, the recorded state and the queue; a usage added by hand to an asset we
//! never used is out of reach.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};

use crate::app::Context;
use crate::bynder::{Error, Reaction};
use crate::model::AssetId;
use crate::model::{is_managed_uri, Reference};
use crate::run::error::RunError;

/// What the read-back found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub assets_checked: u64,
    /// Recorded usages Bynder no longer has (re-created if still wanted).
    pub missing: u64,
    /// Usages of ours Bynder has that were not recorded (deleted unless wanted).
    pub extra: u64,
    /// Keys with more than one usage in Bynder (collapsed to one).
    pub duplicates: u64,
    /// Usages whose note in Bynder differs from the recorded one (rewritten).
    pub wrong_additional: u64,
    /// Assets that could not be read back (left for the next verify).
    pub unreadable: u64,
}

impl VerifyReport {
    pub fn drift(&self) -> u64 {
        self.missing + self.extra + self.duplicates + self.wrong_additional
    }
}

/// Why a verify stopped early.
#[derive(Debug)]
pub enum VerifyStop {
    CredentialsRejected,
}

/// Reads back every managed asset and rewrites the recorded state to match Bynder (marking
/// duplicates for a read-back before anything is sent). A dry run passes a context on a snapshot.
pub async fn verify_assets(ctx: &Context) -> Result<(VerifyReport, Option<VerifyStop>), RunError> {
    let prefixes = &ctx.config.sync.uri_prefixes;
    // Keyed by the id ignoring case: Bynder treats case variants as one asset.
    let mut assets: BTreeMap<String, AssetId> = BTreeMap::new();
    let mut rows = ctx.source.stream_rows();
    while let Some(row) = rows.try_next().await.map_err(|source| RunError::Source {
        reading: ctx.source.reading().to_owned(),
        source,
    })? {
        if let Ok(r) = Reference::parse(&row.raw, prefixes, &ctx.config.sync.uri_schemes) {
            assets
                .entry(r.asset_id.to_ascii_lowercase())
                .or_insert(r.asset_id);
        }
    }
    drop(rows);
    let recorded = ctx.store.managed_asset_ids().await?;
    for id in recorded {
        assets.entry(id.to_ascii_lowercase()).or_insert(id);
    }

    let mut report = VerifyReport::default();
    let concurrency = ctx.config.limits.concurrency;
    let mut reads = futures::stream::iter(assets.into_values().map(|asset| async move {
        let result = read_back(ctx, &asset).await;
        (asset, result)
    }))
    .buffer_unordered(concurrency);
    while let Some((asset, result)) = reads.next().await {
        let usages = match result {
            Ok(u) => u,
            Err(e) if e.reaction() == Reaction::CredentialsRejected => {
                return Ok((report, Some(VerifyStop::CredentialsRejected)));
            }
            Err(e) => {
                tracing::warn!(asset_id = %asset, error = %e, "could not read the asset's usages back; it is verified next time");
                report.unreadable += 1;
                continue;
            }
        };
        report.assets_checked += 1;
        // Bynder's side, for managed uris: uri -> notes of every usage on it.
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in usages
            .into_iter()
            .filter(|u| is_managed_uri(&u.uri, prefixes))
        {
            held.entry(u.uri).or_default().push(u.additional);
        }
        let recorded: BTreeMap<String, String> = ctx
            .store
            .recorded_for_asset(&asset)
            .await?
            .into_iter()
            .collect();
        let uris: BTreeSet<&String> = held.keys().chain(recorded.keys()).collect();
        for uri in uris {
            let notes = held.get(uri).map(Vec::as_slice).unwrap_or(&[]);
            let fix = match (notes, recorded.get(uri)) {
                ([], Some(_)) => {
                    report.missing += 1;
                    Fix::Forget
                }
                ([], None) => continue,
                ([only], None) => {
                    report.extra += 1;
                    Fix::Record(only.clone())
                }
                ([only], Some(r)) if only != r => {
                    report.wrong_additional += 1;
                    Fix::Record(only.clone())
                }
                ([_], Some(_)) => continue,
                (_, _) => {
                    report.duplicates += 1;
                    Fix::ReadBack
                }
            };
            apply(ctx, &asset, uri, fix).await?;
        }
    }
    tracing::info!(
        assets = report.assets_checked,
        missing = report.missing,
        extra = report.extra,
        duplicates = report.duplicates,
        wrong_additional = report.wrong_additional,
        unreadable = report.unreadable,
        "drift check finished"
    );
    Ok((report, None))
}

enum Fix {
    /// Bynder lost the usage: forget it, so the plan re-creates it if it is still wanted.
    Forget,
    /// Bynder holds one usage with this note: record it, so the plan updates or deletes it.
    Record(String),
    /// Bynder holds several: the key is read back and rewritten before anything else.
    ReadBack,
}

async fn apply(ctx: &Context, asset: &str, uri: &str, fix: Fix) -> Result<(), RunError> {
    match fix {
        Fix::Forget => ctx.store.forget_recorded(asset, uri).await?,
        Fix::Record(additional) => ctx.store.record_observed(asset, uri, &additional).await?,
        Fix::ReadBack => ctx.store.mark_for_read_back(asset, uri).await?,
    }
    Ok(())
}

/// One asset's usages for our integration, retried on transient failures.
async fn read_back(ctx: &Context, asset: &AssetId) -> Result<Vec<crate::bynder::Usage>, Error> {
    let retry = &ctx.config.retry;
    let mut attempt = 0;
    loop {
        match ctx.client.list_usages(asset).await {
            Ok(u) => return Ok(u),
            Err(e) => match e.reaction() {
                // The gate holds the next request until a rate-limit pause is over.
                Reaction::PauseAll => continue,
                Reaction::Retry { .. } if attempt + 1 < retry.max_attempts => {
                    tokio::time::sleep(crate::queue::backoff(
                        retry,
                        attempt,
                        rand::random::<f64>(),
                    ))
                    .await;
                    attempt += 1;
                }
                _ => return Err(e),
            },
        }
    }
}

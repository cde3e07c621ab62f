//! `probe`: an explicit, safe self-test against a real portal. It finds out, with one existing
//! asset and probe uris under a reserved prefix (`urn:bynder-usage-sync:probe:<random>`), what
//! Bynder's documentation leaves open — whether a repeated create duplicates, whether `GET`
//! answers without `asset_id`, whether the sync endpoint exists, what it answers and whether it
//! removes an asset left out of a uri that keeps others, whether ids come back re-cased — then
//! removes everything it created, checks that by reading back, and stores what it learned in the
//! portal profile.
//!
//! It touches no usage but its own: every request names a probe uri (a sync lists only probe
//! uris; a delete always names the uri), and no CMS row ever has such a uri.

use super::status::print_profile;
use super::{Exit, Failure};
use crate::app::Context;
use crate::bynder::{self, Client, SyncAnswer};
use crate::model::{AssetId, SyncUsage, UsageUri};
use crate::profile::{Fact, PortalProfile};

/// The reserved prefix of every uri a probe creates usages on.
pub const PROBE_URI_PREFIX: &str = "urn:bynder-usage-sync:probe:";

const NOTE: &str = "bynder-usage-sync probe (removed when the probe ends)";

/// `probe` options.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// An existing asset's id. Give it twice (two different assets) to also learn whether the
    /// sync endpoint removes an asset left out of a uri that keeps another asset; with one, a
    /// second is taken from the usages the daemon recorded, else from cms_asset_references.
    #[arg(long = "asset", value_name = "ID", required = true, num_args = 1)]
    pub assets: Vec<String>,
    /// Print the steps and the profile as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One probe step, for the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub step: &'static str,
    pub result: String,
    pub detail: String,
}

struct Probe<'a> {
    client: &'a Client,
    profile: &'a PortalProfile,
    asset: AssetId,
    base: String,
    steps: Vec<Step>,
    /// (asset, uri) pairs that may hold a usage of ours: what the clean-up removes.
    touched: Vec<(AssetId, UsageUri)>,
}

impl Probe<'_> {
    fn uri(&self, n: u32) -> UsageUri {
        UsageUri::parse(&format!("{}:{n}", self.base)).expect("a probe uri is a valid uri")
    }

    fn note(&mut self, step: &'static str, result: impl Into<String>, detail: impl Into<String>) {
        self.steps.push(Step {
            step,
            result: result.into(),
            detail: escape_control(&detail.into()),
        });
    }

    fn touch(&mut self, asset: &AssetId, uri: &UsageUri) {
        let key = (asset.clone(), uri.clone());
        if !self.touched.contains(&key) {
            self.touched.push(key);
        }
    }

    /// Our usages of `asset` on `uri`, read back.
    async fn on_uri(
        &self,
        asset: &AssetId,
        uri: &UsageUri,
    ) -> Result<Vec<bynder::Usage>, bynder::Error> {
        Ok(self
            .client
            .list_usages(asset)
            .await?
            .into_iter()
            .filter(|u| u.uri == *uri)
            .collect())
    }
}

/// Runs the probe; see the module doc.
pub async fn probe(ctx: &Context, args: &ProbeArgs) -> Result<Exit, Failure> {
    let mut assets = args.assets.iter().map(|a| a.trim().to_owned());
    let given = assets.next().unwrap_or_default();
    let asset = AssetId::parse(&given).map_err(|reason| {
        Failure::Config(crate::config::ConfigError::new(format!(
            "--asset {given:?}: {reason}. Fix: give the id of an existing asset of the portal"
        )))
    })?;
    let second = match assets.next() {
        Some(b) if !crate::model::same_asset(&b, &asset) => Some(b),
        Some(_) => {
            return Err(Failure::Config(crate::config::ConfigError::new(
                "the two --asset ids name the same asset. Fix: give two different assets",
            )))
        }
        None => ctx.store.other_known_asset(&asset).await?,
    };
    let second = second.and_then(|b| AssetId::parse(&b).ok());
    let random: u64 = rand::random();
    let mut probe = Probe {
        client: &ctx.client,
        profile: &ctx.profile,
        asset,
        base: format!("{PROBE_URI_PREFIX}{random:016x}"),
        steps: Vec::new(),
        touched: Vec::new(),
    };
    let outcome = run_steps(&mut probe, second.as_ref()).await;
    let leftovers = clean_up(&mut probe).await;
    let profile = ctx.profile.facts();
    if args.json {
        let value = serde_json::json!({
            "portal": ctx.config.bynder.base_url.as_str(),
            "integration_id": ctx.config.bynder.integration_id,
            "probe_uri_prefix": probe.base,
            "steps": probe.steps,
            "left_behind": leftovers.iter().map(|(a, u)| serde_json::json!({"asset_id": a, "uri": u})).collect::<Vec<_>>(),
            "portal_profile": profile,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(anyhow::Error::from)?
        );
    } else {
        println!(
            "Probe of {} (integration {}), asset {}, probe uris {}:*",
            ctx.config.bynder.base_url, ctx.config.bynder.integration_id, probe.asset, probe.base
        );
        println!("  {:<36} {:<14} detail", "step", "result");
        for s in &probe.steps {
            println!(
                "  {:<36} {:<14} {}",
                s.step,
                s.result,
                crate::text::printable(&s.detail)
            );
        }
        print_profile(&profile);
    }
    outcome?;
    if leftovers.is_empty() {
        Ok(Exit::Ok)
    } else {
        let list: Vec<String> = leftovers
            .iter()
            .map(|(a, u)| format!("asset {a} on {u}"))
            .collect();
        eprintln!(
            "the probe could not remove every usage it created: {}. Fix: run the probe again \
             later, or delete them in Bynder (Asset Tracking of the asset)",
            list.join(", ")
        );
        Ok(Exit::Partial)
    }
}

/// The steps; an error ends them (the clean-up still runs) and becomes the command's failure.
async fn run_steps(probe: &mut Probe<'_>, second: Option<&AssetId>) -> Result<(), Failure> {
    // Authentication and scopes.
    match probe.client.credentials().token_info().await {
        Ok(Some(info)) => {
            let scopes = info
                .scopes
                .map(|s| s.join(" "))
                .unwrap_or_else(|| "(not reported)".to_owned());
            probe.note(
                "authentication",
                "ok",
                format!("OAuth 2 token; scopes: {scopes}"),
            );
        }
        Ok(None) => probe.note(
            "authentication",
            "ok",
            format!(
                "{} (no scopes to report)",
                probe.client.credentials().method_name()
            ),
        ),
        Err(e) => {
            probe.note("authentication", "FAILED", e.to_string());
            return Err(e.into());
        }
    }

    // Create, read back, id case.
    let asset = probe.asset.clone();
    let p1 = probe.uri(1);
    probe.touch(&asset, &p1);
    match probe.client.create_usage(&asset, &p1, NOTE).await {
        Ok(usage) => probe.note("create a usage", "ok", format!("usage id {}", usage.id)),
        Err(e) => {
            probe.note("create a usage", "FAILED", e.to_string());
            return Err(step_failure(probe.client, e, "create a usage of the asset"));
        }
    }
    let found = probe.on_uri(&asset, &p1).await.map_err(|e| {
        probe.note("read it back", "FAILED", e.to_string());
        step_failure(probe.client, e, "read the asset's usages")
    })?;
    match found.as_slice() {
        [] => probe.note("read it back", "MISSING", "the created usage is not listed"),
        [u, ..] => {
            probe.note(
                "read it back",
                "ok",
                "listed with GET ?asset_id&integration_id",
            );
            if u.asset_id == asset {
                if asset.bytes().any(|b| b.is_ascii_alphabetic()) {
                    probe
                        .profile
                        .learn(
                            Fact::AssetIdCase,
                            "preserved",
                            "probe: the id came back as sent",
                        )
                        .await?;
                }
                probe.note("asset ids in answers", "preserved", &u.asset_id);
            } else if crate::model::same_asset(&u.asset_id, &asset) {
                let evidence = format!("probe: sent {asset}, answered {}", u.asset_id);
                probe
                    .profile
                    .learn(Fact::AssetIdCase, "recased", &evidence)
                    .await?;
                probe.note("asset ids in answers", "recased", evidence);
            }
        }
    }

    // A repeated create.
    match probe.client.create_usage(&asset, &p1, NOTE).await {
        Ok(_) => match probe.on_uri(&asset, &p1).await {
            Ok(found) => {
                let value = if found.len() > 1 {
                    "duplicates"
                } else {
                    "deduplicates"
                };
                let detail = format!("{} usage(s) on one uri after two creates", found.len());
                probe
                    .profile
                    .learn(Fact::RepeatedCreate, value, &format!("probe: {detail}"))
                    .await?;
                probe.note("a repeated create", value, detail);
            }
            Err(e) => probe.note("a repeated create", "unknown", e.to_string()),
        },
        Err(e) => probe.note("a repeated create", "unknown", e.to_string()),
    }

    // GET without asset_id.
    match probe.client.list_usages_where(None, Some(&p1)).await {
        Ok(list) if list.iter().any(|u| u.uri == p1) => {
            probe
                .profile
                .learn(
                    Fact::ListWithoutAssetId,
                    "yes",
                    "probe: listed by integration and uri",
                )
                .await?;
            probe.note(
                "GET without asset_id",
                "yes",
                "integration_id and uri are enough",
            );
        }
        Ok(_) => {
            probe
                .profile
                .learn(
                    Fact::ListWithoutAssetId,
                    "no",
                    "probe: answered without the usage",
                )
                .await?;
            probe.note(
                "GET without asset_id",
                "no",
                "answered, but without the probe usage",
            );
        }
        Err(e) if e.status().is_some_and(|s| s.is_client_error()) => {
            probe
                .profile
                .learn(Fact::ListWithoutAssetId, "no", &format!("probe: {e}"))
                .await?;
            probe.note("GET without asset_id", "no", e.to_string());
        }
        Err(e) => probe.note("GET without asset_id", "unknown", e.to_string()),
    }

    // Delete with a uri.
    match probe.client.delete_usage(&asset, &p1).await {
        Ok(()) => match probe.on_uri(&asset, &p1).await {
            Ok(left) if left.is_empty() => probe.note("delete with uri", "ok", "read back: gone"),
            Ok(left) => probe.note(
                "delete with uri",
                "INCOMPLETE",
                format!("{} usage(s) still listed", left.len()),
            ),
            Err(e) => probe.note("delete with uri", "unknown", e.to_string()),
        },
        Err(e) => probe.note("delete with uri", "FAILED", e.to_string()),
    }

    // The sync endpoint: presence, answer shape.
    let p2 = probe.uri(2);
    probe.touch(&asset, &p2);
    let listing = |asset: &str, uri: &str| SyncUsage {
        asset_id: asset.to_owned(),
        uri: uri.to_owned(),
        additional: NOTE.to_owned(),
    };
    match probe
        .client
        .sync_usages(&[p2.to_string()], &[listing(&asset, &p2)])
        .await
    {
        Ok(answer) => {
            probe
                .profile
                .learn(
                    Fact::SyncEndpoint,
                    "yes",
                    "probe: a sync request was answered",
                )
                .await?;
            probe.note(
                "sync endpoint",
                "yes",
                "POST /api/media/usage/sync answered",
            );
            let (value, detail) = match &answer {
                SyncAnswer::Full(r) => (
                    "full",
                    format!(
                        "{} new, {} accepted, {} rejected, {} removed",
                        r.created.len(),
                        r.accepted.len(),
                        r.rejected.len(),
                        r.removed.len()
                    ),
                ),
                SyncAnswer::Unconfirmed(what) => ("empty", what.clone()),
            };
            probe
                .profile
                .learn(Fact::SyncAnswer, value, &format!("probe: {detail}"))
                .await?;
            probe.note("sync answer", value, detail);
            match probe.on_uri(&asset, &p2).await {
                Ok(found) if found.len() == 1 => {
                    probe.note("sync creates", "ok", "read back: one usage")
                }
                Ok(found) => probe.note(
                    "sync creates",
                    "UNEXPECTED",
                    format!("read back: {} usage(s)", found.len()),
                ),
                Err(e) => probe.note("sync creates", "unknown", e.to_string()),
            }
            sync_delete_semantics(probe, second).await?;
        }
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 405 | 501)) => {
            probe
                .profile
                .learn(
                    Fact::SyncEndpoint,
                    "no",
                    &format!(
                        "probe: the sync endpoint answered {}",
                        e.status().map(|s| s.as_u16()).unwrap_or(0)
                    ),
                )
                .await?;
            probe.note("sync endpoint", "no", e.to_string());
        }
        Err(e) => probe.note("sync endpoint", "unknown", e.to_string()),
    }
    Ok(())
}

/// Two usages on one probe uri (two assets), then a sync that drops one: is it removed?
async fn sync_delete_semantics(
    probe: &mut Probe<'_>,
    second: Option<&AssetId>,
) -> Result<(), Failure> {
    const STEP: &str = "sync removes an omitted asset";
    let Some(other) = second else {
        probe.note(
            STEP,
            "not tested",
            "needs a second asset: give --asset twice (two different existing assets)",
        );
        return Ok(());
    };
    let asset = probe.asset.clone();
    let p3 = probe.uri(3);
    probe.touch(&asset, &p3);
    probe.touch(other, &p3);
    let entry = |a: &str| SyncUsage {
        asset_id: a.to_owned(),
        uri: p3.to_string(),
        additional: NOTE.to_owned(),
    };
    let both = [entry(&asset), entry(other)];
    if let Err(e) = probe.client.sync_usages(&[p3.to_string()], &both).await {
        probe.note(STEP, "unknown", e.to_string());
        return Ok(());
    }
    // Both must be held before one is dropped, or the answer means nothing (an asset that
    // does not exist is rejected).
    match (
        probe.on_uri(&asset, &p3).await,
        probe.on_uri(other, &p3).await,
    ) {
        (Ok(a), Ok(b)) if a.len() == 1 && b.len() == 1 => {}
        (Ok(_), Ok(_)) => {
            probe.note(
                STEP,
                "unknown",
                format!("the sync did not record both {asset} and {other} on one uri (does {other} exist?)"),
            );
            return Ok(());
        }
        (Err(e), _) | (_, Err(e)) => {
            probe.note(STEP, "unknown", e.to_string());
            return Ok(());
        }
    }
    if let Err(e) = probe
        .client
        .sync_usages(&[p3.to_string()], &both[1..])
        .await
    {
        probe.note(STEP, "unknown", e.to_string());
        return Ok(());
    }
    match probe.on_uri(&asset, &p3).await {
        Ok(left) => {
            let (value, detail) = if left.is_empty() {
                ("yes", "the omitted asset was removed; the other kept")
            } else {
                (
                    "no",
                    "the omitted asset is still held: only a uri listed with no usage is emptied",
                )
            };
            probe
                .profile
                .learn(Fact::SyncRemovesOmitted, value, &format!("probe: {detail}"))
                .await?;
            probe.note(STEP, value, detail);
        }
        Err(e) => probe.note(STEP, "unknown", e.to_string()),
    }
    Ok(())
}

/// Removes every usage the probe may have created (a `DELETE` naming each probe uri), then reads
/// each asset back. Returns what is still there.
async fn clean_up(probe: &mut Probe<'_>) -> Vec<(String, String)> {
    let touched = probe.touched.clone();
    let mut failures = Vec::new();
    for (asset, uri) in &touched {
        if let Err(e) = probe.client.delete_usage(asset, uri).await {
            failures.push(format!("{asset} on {uri}: {e}"));
        }
    }
    let mut left = Vec::new();
    let mut assets: Vec<&AssetId> = touched.iter().map(|(a, _)| a).collect();
    assets.dedup();
    for asset in assets {
        match probe.client.list_usages(asset).await {
            Ok(usages) => left.extend(
                usages
                    .into_iter()
                    .filter(|u| u.uri.starts_with(&probe.base))
                    .map(|u| (asset.to_string(), u.uri)),
            ),
            Err(e) => {
                failures.push(format!("reading {asset} back: {e}"));
                left.extend(
                    touched
                        .iter()
                        .filter(|(a, _)| a == asset)
                        .map(|(a, u)| (a.to_string(), u.to_string())),
                );
            }
        }
    }
    if left.is_empty() {
        probe.note("clean-up", "ok", "read back: nothing left behind");
    } else {
        probe.note(
            "clean-up",
            "INCOMPLETE",
            format!("{} usage(s) left; {}", left.len(), failures.join("; ")),
        );
    }
    left
}

/// The command's failure for a step that cannot go on.
fn step_failure(client: &Client, error: bynder::Error, what: &str) -> Failure {
    match error.status().map(|s| s.as_u16()) {
        Some(401) => Failure::Credentials(format!(
            "Bynder rejected the credentials (401). Fix: {}",
            client.credentials().rejection_fix()
        )),
        Some(403) => Failure::Credentials(format!(
            "Bynder refused to {what} (403). Fix: give the credentials the asset.usage:read and \
             asset.usage:write scopes and their user the STATISTICS security role"
        )),
        Some(400 | 404) => Failure::Config(crate::config::ConfigError::new(format!(
            "the portal refused to {what} ({error}). Fix: give --asset the id of an asset that \
             exists in this portal"
        ))),
        _ => match error {
            bynder::Error::Auth(e) => e.into(),
            bynder::Error::Connect { .. } | bynder::Error::Timeout(_) => {
                Failure::Unreachable(error.to_string())
            }
            other => Failure::Unexpected(anyhow::Error::new(other)),
        },
    }
}

/// Control characters from the portal's answers never reach the terminal as such.
fn escape_control(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

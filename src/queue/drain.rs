//! Draining the queue against Bynder: the workers, one attempt per operation (or one sync batch),
//! what an answer settles, and the upsert of the recorded state in the transaction that finishes
//! an operation. An operation is finished only once Bynder confirmed it; anything in flight when
//! the process dies is read back before it is sent again. What a failure means is
//! [`super::policy`]'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::app::Context;
use crate::bynder::{self, Client, SyncAnswer};
use crate::config::{Config, RetrySettings, Strategy};
use crate::model::{folded_key, same_asset};
use crate::plan::Target;
use crate::profile::{Fact, PortalProfile};
use crate::queue::{self, BatchVerdict, Next, RunEffect};
use crate::run::error::RunError;
use crate::store::{self, Operation, Store, SyncBatch, SyncOpOutcome};

/// How this run sends: the sync endpoint (with its current batch size) or per-usage calls.
/// Shared by the workers, since any of them may learn that the portal lacks the sync endpoint
/// or finds a batch too large.
struct Mode {
    sync: AtomicBool,
    /// `sync.strategy = "auto"`: fall back to per-usage calls when the sync endpoint is missing.
    auto: bool,
    batch_size: AtomicUsize,
}

impl Mode {
    /// The configured strategy, narrowed by what the portal profile says: in `auto`, a portal
    /// known to lack the sync endpoint, or whose sync answers confirm nothing, gets per-usage
    /// calls (their answers are certain, so nothing needs a read-back).
    fn new(config: &Config, profile: &PortalProfile) -> Self {
        let auto = config.sync.strategy == Strategy::Auto;
        let mut sync = config.sync.strategy != Strategy::PerUsage;
        if auto && profile.sync_endpoint_missing() {
            tracing::debug!(
                "the portal profile says the sync endpoint is missing: per-usage calls"
            );
            sync = false;
        } else if auto && profile.sync_answer_empty() {
            tracing::debug!(
                "the portal profile says sync answers confirm nothing: per-usage calls"
            );
            sync = false;
        }
        Mode {
            sync: AtomicBool::new(sync),
            auto,
            batch_size: AtomicUsize::new(config.sync.batch_size),
        }
    }

    fn uses_sync(&self) -> bool {
        self.sync.load(Ordering::Relaxed)
    }

    fn fall_back(&self, why: &str) {
        if self.sync.swap(false, Ordering::Relaxed) {
            tracing::warn!("{why}: sending per-usage calls for the rest of this run");
        }
    }

    /// Halves the batch size (never below 1).
    fn halve(&self) {
        let half = (self.batch_size.load(Ordering::Relaxed) / 2).max(1);
        self.batch_size.store(half, Ordering::Relaxed);
        tracing::info!(
            batch_size = half,
            "the portal found a sync batch too large; halving it"
        );
    }
}

/// What one unit of work achieved.
#[derive(Debug, Default)]
struct Tally {
    done: u64,
    failed: u64,
    dead: u64,
    effects: Vec<RunEffect>,
}

impl Tally {
    fn add(&mut self, dead: bool, effect: RunEffect) {
        if dead {
            self.dead += 1;
        } else {
            self.failed += 1;
        }
        if effect != RunEffect::Continue {
            self.effects.push(effect);
        }
    }
}

/// Drains the queue with bounded concurrency until nothing is due for this run.
pub(crate) async fn drain(
    ctx: &Context,
    run_id: i64,
    progress: &dyn Progress,
) -> Result<(Option<RunEffect>, SendReport), RunError> {
    let concurrency = ctx.config.limits.concurrency;
    let max_attempts = ctx.config.retry.max_attempts;
    let mode = Arc::new(Mode::new(&ctx.config, &ctx.profile));
    let mut workers: JoinSet<Result<Tally, RunError>> = JoinSet::new();
    let mut sent = SendReport::default();
    let mut stop: Option<RunEffect> = None;
    let mut done = 0u64;

    loop {
        while stop.is_none() && !progress.stop_requested() && workers.len() < concurrency {
            let client = ctx.client.clone();
            let store = ctx.store.clone();
            let retry = ctx.config.retry.clone();
            if mode.uses_sync() {
                let size = mode.batch_size.load(Ordering::Relaxed);
                match ctx
                    .store
                    .claim_sync_batch(run_id, max_attempts, size)
                    .await?
                {
                    Some(batch) => {
                        let mode = mode.clone();
                        let profile = ctx.profile.clone();
                        workers.spawn(
                            async move {
                                attempt_batch(&client, &store, &retry, &mode, &profile, batch).await
                            }
                            .instrument(crate::telemetry::current_run_span()),
                        );
                    }
                    None => break,
                }
            } else {
                match ctx.store.claim_next(run_id, max_attempts).await? {
                    Some(op) => {
                        workers.spawn(
                            async move { attempt(&client, &store, &retry, op).await }
                                .instrument(crate::telemetry::current_run_span()),
                        );
                    }
                    None => break,
                }
            }
        }
        if workers.is_empty() {
            if stop.is_some() || progress.stop_requested() {
                break;
            }
            match ctx.store.next_retry_at(run_id, max_attempts).await? {
                Some(at) => {
                    let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    continue;
                }
                None => break,
            }
        }
        let next_retry = ctx.store.next_retry_at(run_id, max_attempts).await?;
        let joined = match next_retry {
            Some(at) if stop.is_none() => {
                let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    joined = workers.join_next() => joined,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            _ => workers.join_next().await,
        };
        let Some(joined) = joined else { continue };
        let tally = joined.map_err(RunError::Worker)??;
        sent.succeeded += tally.done;
        sent.dead += tally.dead;
        sent.failed_attempts += tally.failed;
        if tally.done + tally.dead > 0 {
            done += tally.done + tally.dead;
            progress.advanced(done);
        }
        for effect in tally.effects {
            match effect {
                RunEffect::Continue => {}
                RunEffect::Paused { until } => {
                    ctx.store
                        .set_setting("rate_limit_paused_until", Some(&store::format_time(until)))
                        .await?;
                }
                effect => stop = stop.or(Some(effect)),
            }
        }
    }
    if ctx.client.gate().paused_until().is_none() {
        ctx.store
            .set_setting("rate_limit_paused_until", None)
            .await?;
    }
    Ok((stop, sent))
}

fn action_label(target: &Target) -> &'static str {
    match target {
        Target::Upsert(_) => "upsert",
        Target::Delete => "delete",
    }
}

/// One attempt at one operation with per-usage calls; persists its outcome.
#[tracing::instrument(skip_all, fields(op = op.id, asset_id = %op.asset_id, uri = %op.uri))]
async fn attempt(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    op: Operation,
) -> Result<Tally, RunError> {
    let mut uncertain = op.uncertain;
    let result = match &op.target {
        Target::Delete => match client.delete_usage(&op.asset_id, &op.uri).await {
            Ok(()) => {
                store.complete_delete(&op).await?;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Target::Upsert(additional) => {
            upsert(client, store, &op, additional, &mut uncertain, None).await?
        }
    };
    let mut tally = Tally::default();
    match result {
        Ok(()) => {
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                .increment(1);
            tally.done = 1;
        }
        Err(error) => {
            let (dead, effect) = fail(client, store, retry, &op, &error, uncertain).await?;
            tally.add(dead, effect);
        }
    }
    Ok(tally)
}

/// Records a failed attempt: back to pending with a backoff, or dead with its reason.
async fn fail(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    op: &Operation,
    error: &bynder::Error,
    uncertain: bool,
) -> Result<(bool, RunEffect), RunError> {
    let now = chrono::Utc::now();
    let pause_until = client
        .gate()
        .paused_until()
        .map(|t| {
            now + chrono::Duration::from_std(t - tokio::time::Instant::now()).unwrap_or_default()
        })
        .unwrap_or(now);
    let verdict = queue::verdict(
        error,
        op.run_attempts as u32,
        uncertain,
        retry,
        now,
        rand::random::<f64>(),
        pause_until,
    );
    let action = action_label(&op.target);
    let dead = match &verdict.next {
        Next::Retry { .. } => {
            tracing::debug!(%error, "attempt failed; will retry");
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action, "result" => "retry")
                .increment(1);
            false
        }
        Next::Dead { reason } => {
            tracing::warn!(asset_id = %op.asset_id, uri = %op.uri, %reason, "operation moved to the dead letters");
            metrics::counter!("bynder_usage_sync_operations_total", "action" => action, "result" => "dead")
                .increment(1);
            true
        }
    };
    store
        .fail_operation(op.id, &verdict.next, &error.to_string())
        .await?;
    Ok((dead, verdict.effect))
}

/// Puts claimed operations back, untried, for another way of sending them.
async fn release(store: &Store, ops: &[Operation], why: &str) -> Result<(), RunError> {
    let untried = |op: &Operation| Next::Retry {
        at: chrono::Utc::now(),
        uncertain: op.uncertain,
        counts: false,
    };
    for op in ops {
        store.fail_operation(op.id, &untried(op), why).await?;
    }
    Ok(())
}

/// One sync-endpoint request for a batch of uris; persists its outcome. A change counts as done
/// only when the answer confirms it; the rest is settled by reading Bynder back ([`settle`]).
#[tracing::instrument(skip_all, fields(uris = batch.uris.len(), usages = batch.listing.len()))]
async fn attempt_batch(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    mode: &Mode,
    profile: &PortalProfile,
    batch: SyncBatch,
) -> Result<Tally, RunError> {
    let mut tally = Tally::default();
    let answer = match client.sync_usages(&batch.uris, &batch.listing).await {
        Ok(answer) => answer,
        Err(error) => {
            fail_batch(
                client, store, retry, mode, profile, batch, error, &mut tally,
            )
            .await?;
            return Ok(tally);
        }
    };
    profile
        .learn(Fact::SyncEndpoint, "yes", "a sync request was answered")
        .await?;
    // Keys are compared ignoring the asset id's case: a portal may answer ids re-cased.
    let kept_uris: HashSet<&str> = batch.listing.iter().map(|u| u.uri.as_str()).collect();
    let mut outcomes = vec![SyncOpOutcome::Unsettled; batch.ops.len()];
    let mut rejected_listed = Vec::new();
    match &answer {
        SyncAnswer::Full(result) => {
            profile
                .learn(Fact::SyncAnswer, "full", "a sync answer listed its outcome")
                .await?;
            learn_id_case(profile, &batch, result).await?;
            let mut upserted: HashMap<(String, String), Option<String>> = HashMap::new();
            for a in &result.accepted {
                upserted.entry(folded_key(&a.asset_id, &a.uri)).or_default();
            }
            for c in &result.created {
                let id = c.id.as_ref().map(|id| match id {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                upserted.insert(folded_key(&c.asset_id, &c.uri), id);
            }
            let removed: HashSet<(String, String)> = result
                .removed
                .iter()
                .map(|r| folded_key(&r.asset_id, &r.uri))
                .collect();
            let rejected: HashMap<(String, String), &str> = result
                .rejected
                .iter()
                .map(|r| (folded_key(&r.asset_id, &r.uri), r.reason.as_str()))
                .collect();
            let op_keys: HashSet<(String, String)> = batch
                .ops
                .iter()
                .map(|op| folded_key(&op.asset_id, &op.uri))
                .collect();
            rejected_listed = batch
                .listing
                .iter()
                .filter(|u| {
                    let key = folded_key(&u.asset_id, &u.uri);
                    rejected.contains_key(&key) && !op_keys.contains(&key)
                })
                .map(|u| (u.asset_id.clone(), u.uri.clone()))
                .collect();
            for (op, outcome) in batch.ops.iter().zip(outcomes.iter_mut()) {
                let key = folded_key(&op.asset_id, &op.uri);
                // An uncertain key may hold duplicates the answer would not show: read it back.
                if op.uncertain {
                    continue;
                }
                *outcome = match &op.target {
                    Target::Upsert(_) if rejected.contains_key(&key) => {
                        SyncOpOutcome::Rejected(rejected[&key].to_owned())
                    }
                    Target::Upsert(additional) => match upserted.get(&key) {
                        Some(usage_id) => SyncOpOutcome::Upserted {
                            additional: additional.clone(),
                            usage_id: usage_id.clone(),
                        },
                        None => SyncOpOutcome::Unsettled,
                    },
                    Target::Delete if removed.contains(&key) => {
                        if kept_uris.contains(op.uri.as_str()) {
                            profile
                                .learn(
                                    Fact::SyncRemovesOmitted,
                                    "yes",
                                    "a sync answer listed an omitted asset as removed",
                                )
                                .await?;
                        }
                        SyncOpOutcome::Removed
                    }
                    Target::Delete => SyncOpOutcome::Unsettled,
                };
            }
        }
        SyncAnswer::Unconfirmed(what) => {
            tracing::info!(answer = %what, "the sync answer confirms nothing; the batch is read back");
            profile
                .learn(
                    Fact::SyncAnswer,
                    "empty",
                    &format!("a sync request was answered {what}"),
                )
                .await?;
            if mode.auto {
                mode.fall_back(&format!(
                    "the portal's sync answers confirm nothing ({what}), and per-usage answers do"
                ));
            }
        }
    }
    store
        .complete_sync_batch(&batch, &outcomes, &rejected_listed)
        .await?;
    let mut unsettled = Vec::new();
    for (op, outcome) in batch.ops.into_iter().zip(outcomes) {
        match outcome {
            SyncOpOutcome::Unsettled => {
                let omitted =
                    matches!(op.target, Target::Delete) && kept_uris.contains(op.uri.as_str());
                unsettled.push((op, omitted));
            }
            SyncOpOutcome::Rejected(_) => {
                metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "dead")
                    .increment(1);
                tracing::warn!(asset_id = %op.asset_id, uri = %op.uri, "Bynder rejected the usage; moved to the dead letters");
                tally.dead += 1;
            }
            _ => {
                metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                    .increment(1);
                tally.done += 1;
            }
        }
    }
    settle(client, store, retry, profile, unsettled, &mut tally).await?;
    Ok(tally)
}

/// A sync request that failed: the endpoint may be missing, the batch too large, or the failure
/// transient; the batch's operations are released or fail accordingly.
#[allow(clippy::too_many_arguments)]
async fn fail_batch(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    mode: &Mode,
    profile: &PortalProfile,
    batch: SyncBatch,
    error: bynder::Error,
    tally: &mut Tally,
) -> Result<(), RunError> {
    let batch_size = mode.batch_size.load(Ordering::Relaxed);
    match queue::policy::batch_verdict(&error, mode.auto, batch_size) {
        BatchVerdict::NoEndpoint => {
            let status = error.status().map_or(0, |s| s.as_u16());
            profile
                .learn(
                    Fact::SyncEndpoint,
                    "no",
                    &format!("the sync endpoint answered {status}"),
                )
                .await?;
            mode.fall_back(&format!("the portal has no sync endpoint ({error})"));
            release(store, &batch.ops, "the sync endpoint is not available").await?;
        }
        BatchVerdict::Halve => {
            mode.halve();
            release(store, &batch.ops, "the sync batch was too large").await?;
        }
        BatchVerdict::Refused => {
            mode.fall_back(&format!("the portal refused a sync batch ({error})"));
            release(store, &batch.ops, "the sync batch was refused").await?;
        }
        BatchVerdict::FailEach { maybe_applied } => {
            for op in &batch.ops {
                // The batch may have been applied: the next attempt reads back first.
                let uncertain = op.uncertain || maybe_applied;
                let (dead, effect) = fail(client, store, retry, op, &error, uncertain).await?;
                tally.add(dead, effect);
            }
        }
    }
    Ok(())
}

/// Learns whether the portal answers asset ids as they were sent or re-cased.
async fn learn_id_case(
    profile: &PortalProfile,
    batch: &SyncBatch,
    result: &bynder::SyncResult,
) -> Result<(), RunError> {
    let sent: HashMap<(String, String), &str> = batch
        .listing
        .iter()
        .map(|u| (folded_key(&u.asset_id, &u.uri), u.asset_id.as_str()))
        .collect();
    let answered = result
        .accepted
        .iter()
        .map(|a| (&a.asset_id, &a.uri))
        .chain(result.created.iter().map(|c| (&c.asset_id, &c.uri)));
    for (asset_id, uri) in answered {
        if let Some(ours) = sent.get(&folded_key(asset_id, uri)) {
            if *ours != asset_id.as_str() {
                profile
                    .learn(
                        Fact::AssetIdCase,
                        "recased",
                        &format!("sent {ours}, answered {asset_id}"),
                    )
                    .await?;
                return Ok(());
            }
            if ours.bytes().any(|b| b.is_ascii_alphabetic()) {
                profile
                    .learn(
                        Fact::AssetIdCase,
                        "preserved",
                        "a sync answer repeated an asset id as sent",
                    )
                    .await?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Settles operations a sync answer did not confirm, by the means that is certain: one read-back
/// per asset (`GET ?asset_id&integration_id`), then a create, or an explicit `DELETE` naming the
/// uri, where Bynder does not hold what the operation asks for. `omitted`: a delete of an asset
/// left out of a uri that keeps other usages, which the portal's sync may or may not remove;
/// where the profile says it does not, the delete is sent at once without a read-back.
async fn settle(
    client: &Client,
    store: &Store,
    retry: &RetrySettings,
    profile: &PortalProfile,
    ops: Vec<(Operation, bool)>,
    tally: &mut Tally,
) -> Result<(), RunError> {
    let mut by_asset: BTreeMap<String, Vec<(Operation, bool)>> = BTreeMap::new();
    for (op, omitted) in ops {
        by_asset
            .entry(op.asset_id.to_ascii_lowercase())
            .or_default()
            .push((op, omitted));
    }
    for (_, ops) in by_asset {
        let known_kept = |(op, omitted): &(Operation, bool)| {
            *omitted && !op.uncertain && profile.sync_keeps_omitted()
        };
        let found = if ops.iter().all(known_kept) {
            None
        } else {
            match client.list_usages(&ops[0].0.asset_id).await {
                Ok(found) => Some(found),
                Err(error) => {
                    for (op, _) in &ops {
                        let uncertain = op.uncertain || matches!(op.target, Target::Upsert(_));
                        let (dead, effect) =
                            fail(client, store, retry, op, &error, uncertain).await?;
                        tally.add(dead, effect);
                    }
                    continue;
                }
            }
        };
        for (op, omitted) in ops {
            let on_uri: Option<Vec<bynder::Usage>> = found.as_ref().map(|found| {
                found
                    .iter()
                    .filter(|u| {
                        u.uri == op.uri
                            && (u.asset_id.is_empty() || same_asset(&u.asset_id, &op.asset_id))
                    })
                    .cloned()
                    .collect()
            });
            let mut uncertain = op.uncertain;
            let result = match (&op.target, on_uri) {
                (Target::Delete, on_uri) => {
                    if let (Some(on_uri), true, false) = (&on_uri, omitted, op.uncertain) {
                        let (value, evidence) = if on_uri.is_empty() {
                            (
                                "yes",
                                "a read-back found an omitted asset removed by the sync",
                            )
                        } else {
                            (
                                "no",
                                "a read-back found an omitted asset still held after the sync",
                            )
                        };
                        profile
                            .learn(Fact::SyncRemovesOmitted, value, evidence)
                            .await?;
                    }
                    if on_uri.is_some_and(|u| u.is_empty()) {
                        store.complete_delete(&op).await?;
                        Ok(())
                    } else {
                        match client.delete_usage(&op.asset_id, &op.uri).await {
                            Ok(()) => {
                                store.complete_delete(&op).await?;
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                (Target::Upsert(additional), on_uri) => {
                    uncertain = true;
                    upsert(client, store, &op, additional, &mut uncertain, on_uri).await?
                }
            };
            match result {
                Ok(()) => {
                    metrics::counter!("bynder_usage_sync_operations_total", "action" => action_label(&op.target), "result" => "done")
                        .increment(1);
                    tally.done += 1;
                }
                Err(error) => {
                    let (dead, effect) = fail(client, store, retry, &op, &error, uncertain).await?;
                    tally.add(dead, effect);
                }
            }
        }
    }
    Ok(())
}

/// What sending achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SendReport {
    pub succeeded: u64,
    /// Attempts that failed without making a dead letter: each was retried with backoff later in
    /// the run, or left queued for the next run (`left_pending`).
    pub failed_attempts: u64,
    /// Operations that became dead letters in this run.
    pub dead: u64,
    /// Operations still queued when the run ended.
    pub left_pending: u64,
    pub requests: u64,
}

/// Progress callbacks, so the CLI can draw a bar or print lines while the library stays silent.
pub trait Progress: Send + Sync {
    fn planned(&self, _total: u64) {}
    fn advanced(&self, _done: u64) {}
    fn finished(&self) {}
    /// Polled before each claim: when true, the drain stops taking operations and returns once
    /// those in flight are done (the daemon's graceful shutdown).
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Makes Bynder hold exactly one usage of ours for the key, with `additional`. When `uncertain`,
/// Bynder is read back first (or `found`, the usages already read back for the key, is used).
async fn upsert(
    client: &Client,
    store: &Store,
    op: &Operation,
    additional: &str,
    uncertain: &mut bool,
    found: Option<Vec<bynder::Usage>>,
) -> Result<Result<(), bynder::Error>, RunError> {
    macro_rules! bynder {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    if *uncertain {
        // An earlier request may have reached Bynder: look before sending anything.
        let found: Vec<_> = match found {
            Some(found) => found,
            None => bynder!(client.list_usages(&op.asset_id).await)
                .into_iter()
                .filter(|u| {
                    u.uri == op.uri
                        && (u.asset_id.is_empty() || same_asset(&u.asset_id, &op.asset_id))
                })
                .collect(),
        };
        if let [only] = found.as_slice() {
            if only.additional == additional {
                store
                    .complete_upsert(op, additional, Some(&only.id))
                    .await?;
                return Ok(Ok(()));
            }
        }
        if !found.is_empty() {
            bynder!(client.delete_usage(&op.asset_id, &op.uri).await);
        }
        store.forget_recorded(&op.asset_id, &op.uri).await?;
        *uncertain = false;
    } else if store
        .recorded_additional(&op.asset_id, &op.uri)
        .await?
        .is_some()
    {
        // Bynder has no update: remove the old usage, then create the new one.
        bynder!(client.delete_usage(&op.asset_id, &op.uri).await);
        store.forget_recorded(&op.asset_id, &op.uri).await?;
    }
    match client.create_usage(&op.asset_id, &op.uri, additional).await {
        Ok(usage) => {
            store
                .complete_upsert(op, additional, Some(&usage.id))
                .await?;
            Ok(Ok(()))
        }
        Err(e) => {
            if matches!(
                e.reaction(),
                bynder::Reaction::Retry {
                    maybe_applied: true
                }
            ) {
                *uncertain = true;
            }
            Ok(Err(e))
        }
    }
}

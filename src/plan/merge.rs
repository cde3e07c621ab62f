//! The streaming merge beside the pure [`decide`]: the CMS rows, the recorded usages and the
//! queued operations, each sorted by (asset_id, uri), are walked together, so memory does not grow
//! with the table; every key's decision becomes a queued operation or a report line, and the whole
//! plan is written in one transaction. The mass-delete guard lives here too.

use futures::stream::BoxStream;
use futures::TryStreamExt;

use crate::app::Context;
use crate::model::{key_order, AssetId, Reference, SkipReason, UsageUri};
use crate::plan::{decide, Change, Decision, Desired, Queued, Target};
use crate::run::error::RunError;
use crate::store::changes::FullPass;
use crate::store::SourceRow;

/// How many rows of each kind a report keeps when not asked for everything.
pub const REPORT_SAMPLE: usize = 20;

/// One planned change, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedItem {
    pub asset_id: String,
    pub uri: String,
    pub change: Change,
    /// The note the usage will carry (absent for deletes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional: Option<String>,
}

/// A row that was not used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SkippedRow {
    pub asset_id: String,
    pub uri: String,
    pub reason: String,
}

/// What the plan found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlanReport {
    pub rows_read: u64,
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    pub verifies: u64,
    /// Queued operations made unnecessary by the CMS (e.g. a create whose row is gone again).
    pub cancelled: u64,
    /// Operations already queued from earlier runs, still to send.
    pub already_queued: u64,
    /// Dead letters left alone because their row did not change.
    pub dead_letters: u64,
    pub skipped: u64,
    pub items: Vec<PlannedItem>,
    pub skipped_rows: Vec<SkippedRow>,
    /// Whether `items` and `skipped_rows` hold everything or a sample.
    pub complete: bool,
    /// The merge was skipped: nothing changed since the full pass at this time (`--if-changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unchanged_since: Option<String>,
}

/// What planning is asked to do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanOptions {
    /// Keep every planned item in the report, not just a sample.
    pub keep_all_items: bool,
    /// Let the plan delete more than `sync.max_deletes` (or every usage).
    pub allow_mass_delete: bool,
    /// Write the plan to the queue (otherwise only report it).
    pub write: bool,
}

/// Which keys a plan covers, and what it settles in the change log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    /// Only the keys of these assets (ids compared ignoring case), what the change log named;
    /// `None`: every key (a full pass).
    pub assets: Option<Vec<String>>,
    /// The change log's end when the plan began, trimmed with the plan (only the entries of
    /// `assets`, and those naming no asset, when set): everything written up to it is read by
    /// this plan.
    pub log_upto: Option<i64>,
    /// Recorded as the last full pass with the plan (a plan of some assets without one forgets
    /// the last).
    pub pass: Option<FullPass>,
    /// Deletes that change runs queued since the last reconcile: a plan of some assets counts
    /// them with its own against `sync.max_deletes`, so a table emptied a little at a time is
    /// refused as a truncation in one transaction would be.
    pub prior_deletes: u64,
}

impl Scope {
    /// A full pass that settles nothing in the change log (dry runs, custom sources).
    pub(crate) const FULL: Scope = Scope {
        assets: None,
        log_upto: None,
        pass: None,
        prior_deletes: 0,
    };
}

type Key = (String, String);

/// One desired key from the source.
struct DesiredRow {
    key: Key,
    additional: Option<String>, // None: hold (invalid row)
}

/// Reads the source in key order, turning invalid rows into reports.
struct DesiredStream<'a> {
    rows: BoxStream<'a, Result<SourceRow, sqlx::Error>>,
    last: Option<Key>,
    uri_prefixes: Vec<String>,
    uri_schemes: Vec<String>,
    /// What reading the source means, for errors (`source.query` or the table, and the file).
    reading: &'a str,
}

impl DesiredStream<'_> {
    async fn next(
        &mut self,
        report: &mut PlanReport,
        keep_all: bool,
    ) -> Result<Option<DesiredRow>, RunError> {
        while let Some(row) = self
            .rows
            .try_next()
            .await
            .map_err(|source| RunError::Source {
                reading: self.reading.to_owned(),
                source,
            })?
        {
            report.rows_read += 1;
            let skip = |reason: SkipReason, report: &mut PlanReport| {
                let (asset_id, uri) = row.raw.display_key();
                report.skipped += 1;
                if keep_all || report.skipped_rows.len() < REPORT_SAMPLE {
                    report.skipped_rows.push(SkippedRow {
                        asset_id,
                        uri,
                        reason: reason.to_string(),
                    });
                }
            };
            if !row.text_keys {
                skip(SkipReason::NotText, report);
                continue;
            }
            let parsed = Reference::parse(&row.raw, &self.uri_prefixes, &self.uri_schemes);
            let (key, additional) = match parsed {
                Ok(r) => (
                    (r.asset_id.as_str().to_owned(), r.uri.as_str().to_owned()),
                    Some(r.additional),
                ),
                Err(reason) => {
                    let key = key_of(&row);
                    skip(reason.clone(), report);
                    match (key, reason) {
                        // The key is fine but the rest of the row is not: hold what Bynder has.
                        (
                            Some(key),
                            SkipReason::TooLong {
                                field: "additional",
                                ..
                            },
                        )
                        | (Some(key), SkipReason::ControlCharacter("additional"))
                        | (Some(key), SkipReason::NotUtf8("additional")) => (key, None),
                        _ => continue,
                    }
                }
            };
            if let Some(last) = &self.last {
                match key_order((&key.0, &key.1), (&last.0, &last.1)) {
                    std::cmp::Ordering::Equal if key.0 == last.0 => {
                        skip(SkipReason::Duplicate, report);
                        continue;
                    }
                    std::cmp::Ordering::Equal => {
                        skip(SkipReason::CaseVariant(last.0.clone()), report);
                        continue;
                    }
                    std::cmp::Ordering::Less => return Err(RunError::Unsorted),
                    std::cmp::Ordering::Greater => {}
                }
            }
            self.last = Some(key.clone());
            return Ok(Some(DesiredRow { key, additional }));
        }
        Ok(None)
    }
}

fn key_of(row: &SourceRow) -> Option<Key> {
    let text = |v: &Option<Vec<u8>>| {
        v.as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_owned)
    };
    let asset = AssetId::parse(&text(&row.raw.asset_id)?).ok()?;
    let uri = UsageUri::parse(&text(&row.raw.uri)?).ok()?;
    Some((asset.as_str().to_owned(), uri.as_str().to_owned()))
}

/// Plans the run by merging the source, the recorded state and the queue. When `write`, the
/// decisions are written to the queue in one transaction, unless the mass-delete guard refuses
/// (the reason is returned and nothing is written).
pub(crate) async fn plan_run(
    ctx: &Context,
    options: PlanOptions,
    scope: &Scope,
) -> Result<(PlanReport, Option<String>), RunError> {
    let write = options.write;
    let keep_all = options.keep_all_items;
    let prefixes = &ctx.config.sync.uri_prefixes;
    let mut report = PlanReport {
        complete: keep_all,
        ..PlanReport::default()
    };
    let (rows, mut recorded, mut queued) = match &scope.assets {
        None => (
            ctx.source.stream_rows(),
            ctx.store.stream_recorded(),
            ctx.store.stream_queued(),
        ),
        Some(assets) => (
            ctx.source.rows_of_assets(assets),
            ctx.store.stream_recorded_of(assets),
            ctx.store.stream_queued_of(assets),
        ),
    };
    let mut desired = DesiredStream {
        rows,
        last: None,
        uri_prefixes: prefixes.clone(),
        uri_schemes: ctx.config.sync.uri_schemes.clone(),
        reading: ctx.source.reading(),
    };

    let mut d_head = desired.next(&mut report, keep_all).await?;
    let mut r_head = recorded.try_next().await?;
    let mut q_head = queued.try_next().await?;
    let mut tx = if write {
        Some(ctx.store.begin_plan().await?)
    } else {
        None
    };
    let mut valid_rows = 0u64;

    loop {
        let keys = [
            d_head
                .as_ref()
                .map(|d| (d.key.0.as_str(), d.key.1.as_str())),
            r_head.as_ref().map(|(a, u, _)| (a.as_str(), u.as_str())),
            q_head.as_ref().map(|(a, u, _)| (a.as_str(), u.as_str())),
        ]
        .into_iter()
        .flatten()
        .min_by(|a, b| key_order(*a, *b))
        .map(|(a, u)| (a.to_owned(), u.to_owned()));
        let Some(key) = keys else { break };
        let is_key = |a: &str, u: &str| key_order((a, u), (&key.0, &key.1)).is_eq();

        let d = if d_head.as_ref().is_some_and(|d| is_key(&d.key.0, &d.key.1)) {
            let taken = d_head.take();
            d_head = desired.next(&mut report, keep_all).await?;
            taken
        } else {
            None
        };
        let r = if r_head.as_ref().is_some_and(|(a, u, _)| is_key(a, u)) {
            let taken = r_head.take().map(|(_, _, additional)| additional);
            r_head = recorded.try_next().await?;
            taken
        } else {
            None
        };
        let q: Option<Queued> = if q_head.as_ref().is_some_and(|(a, u, _)| is_key(a, u)) {
            let taken = q_head.take().map(|(_, _, q)| q);
            q_head = queued.try_next().await?;
            taken
        } else {
            None
        };

        // Keys outside the prefixes are not ours, whatever the recorded state says (the prefixes
        // may have been narrowed since): never touch them.
        if !crate::model::is_managed_uri(&key.1, prefixes) {
            // The drain sends whatever is queued: an operation queued before the prefixes were
            // narrowed (a pending one, or a dead letter `queue retry` could revive) must go.
            if q.is_some() {
                report.cancelled += 1;
                if let Some(tx) = tx.as_mut() {
                    tx.cancel(&key.0, &key.1).await?;
                }
            }
            continue;
        }
        let desired_state = match &d {
            Some(DesiredRow {
                additional: Some(a),
                ..
            }) => {
                valid_rows += 1;
                Desired::Present(a)
            }
            Some(DesiredRow {
                additional: None, ..
            }) => Desired::Hold,
            None => Desired::Absent,
        };
        let decision = decide(desired_state, r.as_deref(), q.as_ref());
        match decision {
            Decision::Nothing => {
                if let Some(q) = &q {
                    if q.dead {
                        report.dead_letters += 1;
                    } else {
                        report.already_queued += 1;
                        push_item(
                            &mut report,
                            keep_all,
                            &key,
                            queued_change(q, r.is_some()),
                            &q.target,
                        );
                    }
                }
            }
            Decision::Cancel => {
                report.cancelled += 1;
                if let Some(tx) = tx.as_mut() {
                    tx.cancel(&key.0, &key.1).await?;
                }
            }
            Decision::Enqueue { target, change } => {
                match change {
                    Change::Create => report.creates += 1,
                    Change::Update => report.updates += 1,
                    Change::Delete => report.deletes += 1,
                    Change::Verify => report.verifies += 1,
                }
                push_item(&mut report, keep_all, &key, change, &target);
                if let Some(tx) = tx.as_mut() {
                    tx.enqueue(&key.0, &key.1, &target).await?;
                }
            }
        }
    }
    drop((desired, recorded, queued));

    // A plan of some assets cannot tell whether the table has usable rows elsewhere; the run
    // plans everything instead when the table is empty (`run::changes_once`).
    let valid_rows = scope.assets.is_none().then_some(valid_rows);
    let refused = mass_delete_refusal(ctx, options, &report, valid_rows, scope.prior_deletes);
    if let Some(mut tx) = tx {
        if refused.is_some() {
            tx.rollback().await?;
        } else {
            if let Some(upto) = scope.log_upto {
                tx.trim_changes(upto, scope.assets.as_deref()).await?;
            }
            match (&scope.pass, &scope.assets) {
                (Some(pass), _) => tx.save_full_pass(Some(pass)).await?,
                // A plan of some assets that cannot carry the last full pass over ends it.
                (None, Some(_)) => tx.save_full_pass(None).await?,
                (None, None) => {}
            }
            // A full pass starts the count of change runs' deletes again; a change run adds to it.
            let change_deletes = match scope.assets {
                None => 0,
                Some(_) => scope.prior_deletes + report.deletes,
            };
            if ctx.source.captures_changes() {
                tx.set_change_deletes(change_deletes).await?;
            }
            tx.commit().await.map_err(RunError::WritePlan)?;
        }
    }
    if let Some(why) = &refused {
        tracing::warn!("{why}");
    }
    Ok((report, refused))
}

fn queued_change(q: &Queued, recorded: bool) -> Change {
    match (&q.target, recorded) {
        (_, _) if q.uncertain => Change::Verify,
        (Target::Delete, _) => Change::Delete,
        (Target::Upsert(_), true) => Change::Update,
        (Target::Upsert(_), false) => Change::Create,
    }
}

fn push_item(report: &mut PlanReport, keep_all: bool, key: &Key, change: Change, target: &Target) {
    if keep_all || report.items.len() < REPORT_SAMPLE {
        report.items.push(PlannedItem {
            asset_id: key.0.clone(),
            uri: key.1.clone(),
            change,
            additional: match target {
                Target::Upsert(a) => Some(a.clone()),
                Target::Delete => None,
            },
        });
    }
}

/// The guard against a truncated CMS table: too many deletes (with those change runs queued since
/// the last reconcile, `prior`), or every row gone.
fn mass_delete_refusal(
    ctx: &Context,
    options: PlanOptions,
    report: &PlanReport,
    valid_rows: Option<u64>,
    prior: u64,
) -> Option<String> {
    if options.allow_mass_delete || report.deletes == 0 {
        return None;
    }
    let max = ctx.config.sync.max_deletes;
    if report.deletes > max {
        return Some(format!(
            "refusing to delete {} usages in one run (sync.max_deletes = {max}); nothing was sent. \
             If the CMS table really lost these rows on purpose, run again with --allow-mass-delete",
            report.deletes
        ));
    }
    if report.deletes + prior > max {
        return Some(format!(
            "refusing to delete {} more usages: changes seen since the last reconcile already \
             deleted {prior} (sync.max_deletes = {max} per reconcile); nothing was sent. The next \
             scheduled reconcile decides; if the CMS table really lost these rows on purpose, run \
             `resync --allow-mass-delete`",
            report.deletes
        ));
    }
    if valid_rows == Some(0) {
        return Some(format!(
            "cms_asset_references has no usable rows, so every one of the {} recorded usages would be deleted; \
             nothing was sent. If the table is empty on purpose, run again with --allow-mass-delete",
            report.deletes
        ));
    }
    None
}

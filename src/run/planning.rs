//! What a run plans: everything, nothing (a scheduled reconcile when nothing can have changed
//! since the last full pass), or only the assets the change log names, and what each settles in
//! the change log. The trust in a skipped merge is decided here: the triggers, the log and its
//! counter, the schema, the row count and the planning settings.

use crate::app::Context;
use crate::plan::merge::{plan_run, PlanOptions, PlanReport, Scope};
use crate::run::{RunError, RunOptions};
use crate::store::changes::{Changes, FullPass};

/// Most changed assets one change run plans by themselves; beyond it (a bulk load) the run
/// merges everything, which costs no more and sends the same batches.
pub const CHANGED_ASSETS_PER_PLAN: usize = 2_000;

/// What a run plans.
pub(super) enum Planning {
    /// Everything (a full pass), or nothing when `if_changed` and nothing changed.
    Full,
    /// The assets the change log names.
    Changes(Changes),
}

/// What planning depends on besides the rows, as a digest: the version of this program and the
/// settings that decide which rows are ours and how they are read.
fn planning_digest(ctx: &Context) -> String {
    use sha2::Digest as _;
    let config = &ctx.config;
    let inputs = format!(
        "{}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        env!("CARGO_PKG_VERSION"),
        config.sync.uri_prefixes,
        config.sync.uri_schemes,
        config.source.database,
        config.source.query,
        config.source.url.as_ref().map(|u| u.display()),
    );
    let digest = sha2::Sha256::digest(inputs.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The scope of a full pass: over the captured table it settles the change log up to where it
/// ended when the pass began, and records the pass (while the triggers are in place).
async fn full_pass_scope(ctx: &Context) -> Result<Scope, RunError> {
    if !ctx.source.captures_changes() {
        // The triggers still log writes to the state database's own table, which this source
        // does not read: the pass settles them, so the log does not grow for ever.
        return Ok(Scope {
            log_upto: ctx.store.log_counter().await.ok(),
            ..Scope::FULL
        });
    }
    // Triggers lost with a recreated table go back first: from then on every write is logged,
    // and this pass reads what was written before.
    if ctx.store.ensure_capture().await? {
        tracing::warn!(
            "the change-capture triggers on cms_asset_references were missing (was the table \
             recreated?) and were put back; this full pass covers what was written meanwhile"
        );
    }
    // The log's end next: whatever is written after it is read by this pass or planned later.
    let log_upto = Some(ctx.store.log_counter().await?);
    let pass = Some(FullPass {
        fingerprint: ctx.store.fingerprint(&planning_digest(ctx)).await?,
        at: crate::model::now_text(),
    });
    Ok(Scope {
        assets: None,
        log_upto,
        pass,
        prior_deletes: 0,
    })
}

/// When the last full pass was, if nothing can have changed since: the source is the captured
/// table, the triggers are in place, the change log holds nothing unplanned, and the schema, the
/// row count and the planning settings are those the pass saw. Every write since went through
/// the triggers and was planned by a change run, so a full merge would find nothing new. Edits
/// that bypass the triggers change the schema (a dropped trigger, a recreated table) or most
/// likely the row count; the rest are caught by the next drift repair (`sync.verify_schedule`)
/// or a plain `resync`, which always merge everything.
async fn unchanged_since_full_pass(ctx: &Context) -> Result<Option<String>, RunError> {
    if !ctx.source.captures_changes() {
        return Ok(None);
    }
    let Some(last) = ctx.store.last_full_pass().await? else {
        return Ok(None);
    };
    if ctx.store.latest_change().await?.is_some()
        || !ctx.store.log_settled().await?
        || !ctx.store.capture_installed().await?
    {
        return Ok(None);
    }
    let now = ctx.store.fingerprint(&planning_digest(ctx)).await?;
    Ok((now == last.fingerprint).then_some(last.at))
}

async fn source_is_empty(ctx: &Context) -> Result<bool, RunError> {
    ctx.source
        .is_empty()
        .await
        .map_err(|source| RunError::Source {
            reading: ctx.source.reading().to_owned(),
            source,
        })
}

/// The last full pass carried over a plan of the changed assets: that plan settles the change
/// log as the pass did, so the record stays trusted, with the row count as it is now (read after
/// the log's end, so it counts every write the plan covers). `None` when no pass was trusted, or
/// the schema or the planning settings changed since.
async fn advanced_full_pass(ctx: &Context) -> Result<Option<FullPass>, RunError> {
    let Some(last) = ctx.store.last_full_pass().await? else {
        return Ok(None);
    };
    let now = ctx.store.fingerprint(&planning_digest(ctx)).await?;
    let same_ground = now.schema_version == last.fingerprint.schema_version
        && now.planning == last.fingerprint.planning;
    Ok(same_ground.then_some(FullPass {
        fingerprint: now,
        at: last.at,
    }))
}

/// Plans the run: everything (or nothing, when `if_changed` and nothing changed), or the assets
/// the change log names. A refused plan of changed assets is planned again without the assets
/// whose deletes were refused, so one refusal does not hold back every other write.
pub(super) async fn plan_step(
    ctx: &Context,
    options: &RunOptions,
    planning: Planning,
) -> Result<Planned, RunError> {
    let changes = match planning {
        Planning::Full => {
            if options.if_changed && !options.verify {
                if let Some(at) = unchanged_since_full_pass(ctx).await? {
                    tracing::debug!(last_full_pass = %at, "nothing changed since the last full pass: merge skipped");
                    // A reconcile all the same: change runs' deletes are counted afresh.
                    ctx.store.reset_change_deletes().await?;
                    let plan = PlanReport {
                        unchanged_since: Some(at),
                        complete: true,
                        ..PlanReport::default()
                    };
                    return Ok(Planned {
                        plan,
                        refused: None,
                        full: true,
                        send: true,
                    });
                }
            }
            None
        }
        Planning::Changes(changes) => Some(changes),
    };
    let scope = match changes {
        // A bulk load, or a table emptied: the full pass (and its mass-delete guard) decides.
        Some(changes) if !changes.more && !source_is_empty(ctx).await? => Scope {
            assets: Some(changes.assets.clone()),
            log_upto: Some(changes.upto),
            // Entries deleted by hand may have named other assets: no longer trusted.
            pass: match changes.unbroken {
                true => advanced_full_pass(ctx).await?,
                false => None,
            },
            prior_deletes: ctx.store.change_deletes().await?,
        },
        _ => full_pass_scope(ctx).await?,
    };
    let Some(assets) = scope.assets.clone() else {
        let (plan, refused) = plan_run(ctx, options.plan(true), &scope).await?;
        return Ok(Planned {
            plan,
            send: refused.is_none(),
            refused,
            full: true,
        });
    };
    // A plan of the changed assets keeps every item: a refusal names the assets it holds back.
    let every_item = PlanOptions {
        keep_all_items: true,
        ..options.plan(true)
    };
    let (plan, refused) = plan_run(ctx, every_item, &scope).await?;
    let Some(why) = refused else {
        return Ok(Planned {
            plan,
            refused: None,
            full: false,
            send: true,
        });
    };
    // The deletes wait (with their assets' log entries) for the next reconcile to decide;
    // the other assets' changes need not: they are planned and sent now.
    let held: std::collections::HashSet<String> = plan
        .items
        .iter()
        .filter(|item| item.change == crate::plan::Change::Delete)
        .map(|item| item.asset_id.to_ascii_lowercase())
        .collect();
    let rest: Vec<String> = assets
        .into_iter()
        .filter(|a| !held.contains(&a.to_ascii_lowercase()))
        .collect();
    // The held entries stay in the log, so no reconcile skips its merge until one planned them.
    let rest_scope = Scope {
        assets: Some(rest),
        ..scope
    };
    let (mut sent_plan, again) = plan_run(ctx, options.plan(true), &rest_scope).await?;
    sent_plan.skipped_rows = plan.skipped_rows;
    sent_plan.skipped = plan.skipped;
    let why = format!(
        "{why}. The changes of {} other asset(s) were sent; the deletes wait in the change log",
        rest_scope.assets.as_ref().map_or(0, Vec::len)
    );
    Ok(Planned {
        plan: sent_plan,
        refused: Some(again.unwrap_or(why)),
        full: false,
        send: true,
    })
}

/// What planning gave a run.
pub(super) struct Planned {
    pub plan: PlanReport,
    /// The mass-delete guard's refusal, if any.
    pub refused: Option<String>,
    /// The plan covered the whole table (only then can the run say Bynder matches it).
    pub full: bool,
    /// Something was queued: the queue is sent.
    pub send: bool,
}

//! Change capture: the log the triggers on `cms_asset_references` write (`cms_changes`, one
//! entry per asset id a write touched), read by the daemon's watcher and by the runs that plan
//! only what changed, and trimmed in the same transaction that queues the plan covering it. Beside
//! it, the record of the last full pass, which lets a scheduled reconcile skip the full merge
//! when nothing can have changed since.

use crate::plan::Queued;
use crate::store::db::{on_pool, on_tx, Db, Tx};
use crate::store::{target_from, OperationState, Store};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

/// The triggers the migration installs; change capture is trusted only while all are there.
const TRIGGERS: [&str; 3] = [
    "cms_changes_after_insert",
    "cms_changes_after_update",
    "cms_changes_after_delete",
];

/// PostgreSQL's statement trigger that notifies [`CHANGES_CHANNEL`]: capture is trusted there
/// only while it is in place too.
const NOTIFY_TRIGGER: &str = "cms_changes_notify";

/// The channel the PostgreSQL capture notifies when a transaction that wrote the CMS table
/// commits; the payload is the table's schema.
pub const CHANGES_CHANNEL: &str = "bynder_usage_sync_changes";

/// The setting that holds the last full pass's [`Fingerprint`] (absent: none trusted).
const FULL_PASS: &str = "cms.full_pass";

/// The setting that holds the highest sequence number a plan trimmed the log up to.
const LOG_TRIMMED: &str = "cms.log_trimmed";

/// The setting that counts the deletes change runs queued since the last reconcile.
const CHANGE_DELETES: &str = "cms.change_deletes";

/// What the log holds up to one sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The highest sequence number covered: the plan trims the log up to it.
    pub upto: i64,
    /// The asset ids that changed (case variants once), at most the limit asked for.
    pub assets: Vec<String>,
    /// More assets changed than the limit: plan everything instead.
    pub more: bool,
    /// Every entry since the last plan's is still there: none was deleted by hand, so the
    /// assets named are all that changed since (a plan of them may carry the full pass over).
    pub unbroken: bool,
}

/// What a full pass saw, cheap to read again: when it has not changed, neither has the table
/// (every write since went through the triggers, which change capture planned already).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// `PRAGMA schema_version`: dropping a trigger or recreating the table changes it.
    pub schema_version: i64,
    /// Rows in `cms_asset_references` (a file swapped under the daemon rarely keeps the count).
    pub rows: i64,
    /// What planning depends on beside the rows (settings, version), as a digest.
    pub planning: String,
}

/// The last full pass: what it saw and when (`YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FullPass {
    pub fingerprint: Fingerprint,
    pub at: String,
}

/// Change capture at a glance, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureSummary {
    /// Whether the three triggers are on `cms_asset_references`.
    pub triggers_installed: bool,
    /// Log entries no plan has covered yet (a refused change run leaves them).
    pub unplanned_entries: i64,
    /// When the last full pass trusted by `--if-changed` ran.
    pub last_full_pass: Option<String>,
}

impl Store {
    /// Change capture at a glance (`status`).
    pub async fn capture_summary(&self) -> Result<CaptureSummary, sqlx::Error> {
        let unplanned_entries: i64 = on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT count(*) FROM cms_changes"
        )
        .fetch_one(pool)
        .await)?;
        Ok(CaptureSummary {
            triggers_installed: self.capture_installed().await?,
            unplanned_entries,
            last_full_pass: self.last_full_pass().await?.map(|p| p.at),
        })
    }

    /// Whether the three capture triggers are installed on `cms_asset_references`, and the log
    /// they write is there.
    pub async fn capture_installed(&self) -> Result<bool, sqlx::Error> {
        capture_present(&self.db).await
    }

    /// Puts the capture triggers back if any is missing; whether it had to.
    pub async fn ensure_capture(&self) -> Result<bool, sqlx::Error> {
        if self.capture_installed().await? {
            return Ok(false);
        }
        install_capture(&self.db).await?;
        Ok(true)
    }

    /// The highest sequence number in the log, if it holds anything: one look at the end of its
    /// primary key, cheap enough to poll several times a second.
    pub async fn latest_change(&self) -> Result<Option<i64>, sqlx::Error> {
        on_pool!(&self.probe, |pool, pg| sqlx::query_scalar(
            "SELECT max(seq) FROM cms_changes"
        )
        .fetch_one(pool)
        .await)
    }

    /// The changes logged so far: every distinct asset id up to the highest sequence number now
    /// in the log, at most `limit` of them (`more` says there were others). `None`: the log is
    /// empty.
    pub async fn pending_changes(&self, limit: usize) -> Result<Option<Changes>, sqlx::Error> {
        let Some(upto) = self.latest_change().await? else {
            return Ok(None);
        };
        // Case variants of an id count once (the plan reads every variant of a changed id).
        let mut assets: Vec<String> = on_pool!(&self.db, |pool, pg| {
            sqlx::query_scalar(if pg {
            "SELECT DISTINCT lower(asset_id) FROM cms_changes WHERE seq <= $1 AND asset_id IS NOT NULL LIMIT $2"
        } else {
            "SELECT DISTINCT asset_id FROM cms_changes WHERE seq <= $1 AND asset_id IS NOT NULL LIMIT $2"
        })
        .bind(upto)
        .bind(limit as i64 + 1)
        .fetch_all(pool)
        .await
        })?;
        let more = assets.len() > limit;
        assets.truncate(limit);
        let (entries, trimmed): (i64, i64) = on_pool!(&self.db, |pool, pg| sqlx::query_as(
            "SELECT (SELECT count(*) FROM cms_changes WHERE seq <= $1), \
                    coalesce((SELECT CAST(value AS BIGINT) FROM settings WHERE key = $2), 0)",
        )
        .bind(upto)
        .bind(LOG_TRIMMED)
        .fetch_one(pool)
        .await)?;
        Ok(Some(Changes {
            upto,
            assets,
            more,
            unbroken: entries == upto - trimmed,
        }))
    }

    /// The log's sequence counter: the number of the last entry ever written (0: none), which
    /// a full pass covers whatever entries are still there. PostgreSQL's counter also counts
    /// entries of CMS transactions that rolled back: the log then looks unsettled, and the next
    /// reconcile makes a full pass rather than skip one.
    pub async fn log_counter(&self) -> Result<i64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(if pg {
            LOG_COUNTER_PG
        } else {
            LOG_COUNTER
        })
        .fetch_one(pool)
        .await)
    }

    /// Whether every entry the triggers ever wrote was covered by a plan: the log's sequence
    /// counter is where the last plan trimmed it. Entries deleted by hand leave it ahead.
    pub async fn log_settled(&self) -> Result<bool, sqlx::Error> {
        let counter = self.log_counter().await?;
        let trimmed = self
            .setting(LOG_TRIMMED)
            .await?
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        Ok(counter == trimmed)
    }

    /// Reads what a full pass would record now.
    pub async fn fingerprint(&self, planning: &str) -> Result<Fingerprint, sqlx::Error> {
        let (schema_version, rows): (i64, i64) = on_pool!(&self.db, |pool, pg| {
            let schema_version: i64 = sqlx::query_scalar(if pg {
                // What a CMS can change under the daemon: the table (recreated: a new oid) and
                // the triggers on it (each new one gets a new oid).
                "SELECT coalesce(to_regclass('cms_asset_references')::oid::bigint, 0) * 65536 \
                      + coalesce((SELECT sum(oid::bigint) FROM pg_trigger \
                                  WHERE tgrelid = to_regclass('cms_asset_references') AND tgenabled <> 'D'), 0)::bigint"
            } else {
                "PRAGMA schema_version"
            })
            .fetch_one(pool)
            .await?;
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cms_asset_references")
                .fetch_one(pool)
                .await?;
            Ok::<_, sqlx::Error>((schema_version, rows))
        })?;
        Ok(Fingerprint {
            schema_version,
            rows,
            planning: planning.to_owned(),
        })
    }

    /// The last full pass recorded, if one is trusted.
    pub async fn last_full_pass(&self) -> Result<Option<FullPass>, sqlx::Error> {
        Ok(self
            .setting(FULL_PASS)
            .await?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// How many deletes change runs queued since the last reconcile (the mass-delete guard
    /// counts them with a change run's own).
    pub async fn change_deletes(&self) -> Result<u64, sqlx::Error> {
        Ok(self
            .setting(CHANGE_DELETES)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Starts the count of change runs' deletes again (a reconcile that skipped its merge).
    pub async fn reset_change_deletes(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        set_change_deletes(&mut tx, 0).await?;
        tx.commit().await
    }

    /// The recorded usages of these assets (ids compared ignoring case), in key order: what a
    /// plan of only the changed assets merges.
    pub fn stream_recorded_of(
        &self,
        assets: &[String],
    ) -> BoxStream<'static, Result<(String, String, String), sqlx::Error>> {
        let assets = serde_json::to_string(assets).expect("strings serialise");
        let db = self.db.clone();
        futures::stream::once(async move {
            on_pool!(&db, |pool, pg| sqlx::query_as::<_, (String, String, String)>(if pg {
                "SELECT asset_id, uri, additional FROM recorded_usages \
                 WHERE asset_id IN (SELECT json_array_elements_text($1::json)) ORDER BY asset_id, uri"
            } else {
                "SELECT asset_id, uri, additional FROM recorded_usages \
                 WHERE asset_id IN (SELECT value FROM json_each($1)) ORDER BY asset_id, uri"
            })
            .bind(assets)
            .fetch_all(pool)
            .await)
        })
        .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    /// The queued operations of these assets, in key order (see [`Store::stream_recorded_of`]).
    pub fn stream_queued_of(
        &self,
        assets: &[String],
    ) -> BoxStream<'static, Result<(String, String, Queued), sqlx::Error>> {
        let assets = serde_json::to_string(assets).expect("strings serialise");
        let db = self.db.clone();
        futures::stream::once(async move {
            on_pool!(&db, |pool, pg| sqlx::query_as::<
                _,
                (String, String, String, Option<String>, OperationState, bool),
            >(if pg {
                "SELECT asset_id, uri, action, additional, state, uncertain FROM operations \
                 WHERE asset_id IN (SELECT json_array_elements_text($1::json)) ORDER BY asset_id, uri"
            } else {
                "SELECT asset_id, uri, action, additional, state, uncertain FROM operations \
                 WHERE asset_id IN (SELECT value FROM json_each($1)) ORDER BY asset_id, uri"
            })
            .bind(assets)
            .fetch_all(pool)
            .await)
        })
        .map_ok(|rows| {
            futures::stream::iter(rows.into_iter().map(
                |(asset_id, uri, action, additional, state, uncertain)| {
                    let queued = Queued {
                        target: target_from(action, additional),
                        dead: state == OperationState::Dead,
                        uncertain,
                    };
                    Ok((asset_id, uri, queued))
                },
            ))
        })
        .try_flatten()
        .boxed()
    }
}

/// The log's sequence counter in SQLite (see [`Store::log_counter`]).
const LOG_COUNTER: &str =
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'cms_changes'), 0)";

/// The log's sequence counter in PostgreSQL: the identity's sequence, 0 before its first use.
const LOG_COUNTER_PG: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM cms_changes_seq_seq";

/// The change log's bookkeeping, in the transaction that queues a plan.
impl super::PlanWriter {
    /// Deletes the log's entries up to `upto` that the plan covers: all, or (`assets`) those
    /// of these assets and those naming none.
    pub async fn trim_changes(
        &mut self,
        upto: i64,
        assets: Option<&[String]>,
    ) -> Result<(), sqlx::Error> {
        match assets {
            None => trim_changes(&mut self.tx, upto).await,
            Some(assets) => {
                let assets = serde_json::to_string(assets).expect("strings serialise");
                let left: i64 = on_tx!(&mut self.tx, |conn, pg| {
                    sqlx::query(if pg {
                        "DELETE FROM cms_changes WHERE seq <= $1 AND (asset_id IS NULL \
                         OR lower(asset_id) IN (SELECT lower(json_array_elements_text($2::json))))"
                    } else {
                        "DELETE FROM cms_changes WHERE seq <= $1 \
                         AND (asset_id IS NULL OR asset_id IN (SELECT value FROM json_each($2)))"
                    })
                    .bind(upto)
                    .bind(assets)
                    .execute(&mut *conn)
                    .await?;
                    // Only a log emptied up to `upto` is settled up to it.
                    sqlx::query_scalar("SELECT count(*) FROM cms_changes WHERE seq <= $1")
                        .bind(upto)
                        .fetch_one(&mut *conn)
                        .await?
                });
                if left == 0 {
                    trim_changes(&mut self.tx, upto).await?;
                }
                Ok(())
            }
        }
    }

    /// Records the plan as the last full pass, or (`None`) forgets the last one.
    pub async fn save_full_pass(&mut self, pass: Option<&FullPass>) -> Result<(), sqlx::Error> {
        save_full_pass(&mut self.tx, pass).await
    }

    /// Sets the count of deletes change runs queued since the last reconcile.
    pub async fn set_change_deletes(&mut self, count: u64) -> Result<(), sqlx::Error> {
        set_change_deletes(&mut self.tx, count).await
    }
}

/// Whether the three capture triggers are on `cms_asset_references` (and enabled), and the log
/// they write is there.
async fn capture_present(db: &Db) -> Result<bool, sqlx::Error> {
    let found: i64 = on_pool!(db, |pool, pg| {
        sqlx::query_scalar(if pg {
        "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass('cms_asset_references') \
                 AND tgname IN ($1, $2, $3, $4) AND tgenabled <> 'D') \
              + (SELECT count(*) FROM pg_class WHERE oid = to_regclass('cms_changes'))"
    } else {
        "SELECT count(*) FROM sqlite_master WHERE (type = 'trigger' AND tbl_name = 'cms_asset_references' \
         AND name IN ($1, $2, $3, $4)) OR (type = 'table' AND name = 'cms_changes')"
    })
    .bind(TRIGGERS[0])
    .bind(TRIGGERS[1])
    .bind(TRIGGERS[2])
    .bind(NOTIFY_TRIGGER)
    .fetch_one(pool)
    .await
    })?;
    // SQLite has no notify trigger: the watcher polls its log.
    let notify = i64::from(matches!(db, Db::Postgres(_)));
    Ok(found == TRIGGERS.len() as i64 + notify + 1)
}

/// Puts the change log and its triggers in place if they are missing (the migration's own,
/// idempotent statements): a CMS that dropped and recreated its table lost the triggers with it.
pub(super) async fn install_capture(db: &Db) -> Result<(), sqlx::Error> {
    if !super::has_table(db, "cms_asset_references").await? {
        return Ok(());
    }
    // In place already: nothing to run (PostgreSQL's CREATE OR REPLACE TRIGGER would lock the
    // CMS table against writes, at every command's start).
    if capture_present(db).await? {
        return Ok(());
    }
    on_pool!(db, |pool, pg| {
        sqlx::raw_sql(if pg {
            concat!(
                include_str!("../../migrations/postgres/20261203000002_capture_cms_changes.sql"),
                include_str!("../../migrations/postgres/20261203000003_notify_cms_changes.sql")
            )
        } else {
            include_str!("../../migrations/sqlite/20261202000005_capture_cms_changes.sql")
        })
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Deletes the log's entries up to `upto`, inside the transaction that queues their plan.
pub async fn trim_changes(tx: &mut Tx, upto: i64) -> Result<(), sqlx::Error> {
    on_tx!(&mut *tx, |conn, pg| sqlx::query(
        "DELETE FROM cms_changes WHERE seq <= $1"
    )
    .bind(upto)
    .execute(&mut *conn)
    .await
    .map(|r| r.rows_affected()))?;
    put_setting(tx, LOG_TRIMMED, Some(&upto.to_string())).await
}

/// Sets the count of deletes change runs queued since the last reconcile, inside the
/// transaction that queues a plan (0 after a reconcile).
pub async fn set_change_deletes(tx: &mut Tx, count: u64) -> Result<(), sqlx::Error> {
    put_setting(tx, CHANGE_DELETES, Some(&count.to_string())).await
}

/// Records a full pass (or forgets the last one, with `None`), inside the transaction that
/// queues its plan.
pub async fn save_full_pass(tx: &mut Tx, pass: Option<&FullPass>) -> Result<(), sqlx::Error> {
    let value = pass.map(|p| serde_json::to_string(p).expect("a fingerprint serialises"));
    put_setting(tx, FULL_PASS, value.as_deref()).await
}

/// Sets (or, with `None`, removes) a setting inside the caller's transaction.
pub(super) async fn put_setting(
    tx: &mut Tx,
    key: &str,
    value: Option<&str>,
) -> Result<(), sqlx::Error> {
    on_tx!(tx, |conn, pg| {
        match value {
        Some(value) => sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *conn)
        .await?.rows_affected(),
        None => sqlx::query("DELETE FROM settings WHERE key = $1")
            .bind(key)
            .execute(&mut *conn)
            .await?.rows_affected(),
    }
    });
    Ok(())
}

/// PostgreSQL's word that a transaction which wrote the CMS table of this store's schema has
/// committed (LISTEN on [`CHANGES_CHANNEL`]), on a connection of its own.
pub struct ChangeNotifications {
    listener: sqlx::postgres::PgListener,
    schema: String,
}

impl ChangeNotifications {
    /// Resolves at the next notification for this schema. A lost connection is opened again
    /// first (what was notified meanwhile is missed: the log still holds it); `Err` when that
    /// fails. Not cancel-safe: keep it in a task of its own.
    pub async fn next(&mut self) -> Result<(), sqlx::Error> {
        loop {
            if self.listener.recv().await?.payload() == self.schema {
                return Ok(());
            }
        }
    }
}

impl Store {
    /// On PostgreSQL, the notifications of the capture trigger; `None` on SQLite, whose log the
    /// watcher polls.
    pub async fn change_notifications(&self) -> Result<Option<ChangeNotifications>, sqlx::Error> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(pool)
            .await?;
        // Its own connection, not one of the pool's eight, for as long as the daemon runs.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(Some(ChangeNotifications { listener, schema }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::fresh as scratch_store;

    async fn exec(store: &Store, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(store.test_pool())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_write_to_the_cms_table_logs_the_asset_ids_it_touched() {
        let (_dir, store) = scratch_store().await;
        assert!(store.capture_installed().await.unwrap());
        assert_eq!(store.pending_changes(10).await.unwrap(), None);
        exec(
            &store,
            "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('A', 'u1'), ('b', 'u2')",
        )
        .await;
        exec(
            &store,
            "UPDATE cms_asset_references SET asset_id = 'C' WHERE asset_id = 'b'",
        )
        .await;
        exec(
            &store,
            "UPDATE cms_asset_references SET additional = 'x' WHERE asset_id = 'A'",
        )
        .await;
        exec(
            &store,
            "DELETE FROM cms_asset_references WHERE asset_id = 'C'",
        )
        .await;
        exec(
            &store,
            "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('a', 'u3'), (X'00', 'u4')",
        )
        .await;
        let changes = store.pending_changes(10).await.unwrap().unwrap();
        let mut assets: Vec<String> = changes
            .assets
            .iter()
            .map(|a| a.to_ascii_lowercase())
            .collect();
        assets.sort();
        // Case variants of one id count once; the BLOB id is logged, but has no id to plan.
        assert_eq!(assets, ["a", "b", "c"]);
        assert!(!changes.more);
        let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM cms_changes")
            .fetch_one(store.test_pool())
            .await
            .unwrap();
        // 2 inserts, an update of the key (old and new id), an update of the note (one id), a
        // delete, 2 inserts.
        assert_eq!(logged, 8);
    }

    #[tokio::test]
    async fn the_log_is_trimmed_up_to_what_a_plan_covered_and_never_reuses_numbers() {
        let (_dir, store) = scratch_store().await;
        exec(
            &store,
            "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('A', 'u1')",
        )
        .await;
        let first = store.pending_changes(10).await.unwrap().unwrap();
        exec(
            &store,
            "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('B', 'u1')",
        )
        .await;
        let mut tx = store.begin().await.unwrap();
        trim_changes(&mut tx, first.upto).await.unwrap();
        tx.commit().await.unwrap();
        let left = store.pending_changes(10).await.unwrap().unwrap();
        assert_eq!(left.assets, ["B"]);
        assert!(left.upto > first.upto);
        let mut tx = store.begin().await.unwrap();
        trim_changes(&mut tx, left.upto).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.latest_change().await.unwrap(), None);
        exec(
            &store,
            "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('C', 'u1')",
        )
        .await;
        assert!(store.latest_change().await.unwrap().unwrap() > left.upto);
    }

    #[tokio::test]
    async fn more_changed_assets_than_the_limit_are_reported_as_more() {
        let (_dir, store) = scratch_store().await;
        exec(&store, "INSERT INTO cms_asset_references (asset_id, uri) VALUES ('A', 'u'), ('B', 'u'), ('C', 'u')").await;
        let changes = store.pending_changes(2).await.unwrap().unwrap();
        assert_eq!(changes.assets.len(), 2);
        assert!(changes.more);
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_seen_and_changes_the_fingerprint() {
        let (_dir, store) = scratch_store().await;
        let before = store.fingerprint("p").await.unwrap();
        assert_eq!(before, store.fingerprint("p").await.unwrap());
        exec(&store, "DROP TRIGGER cms_changes_after_update").await;
        assert!(!store.capture_installed().await.unwrap());
        assert_ne!(
            before.schema_version,
            store.fingerprint("p").await.unwrap().schema_version
        );
        // `migrate` puts it back.
        store.migrate().await.unwrap();
        assert!(store.capture_installed().await.unwrap());
    }

    #[tokio::test]
    async fn a_full_pass_is_recorded_read_back_and_forgotten() {
        let (_dir, store) = scratch_store().await;
        assert_eq!(store.last_full_pass().await.unwrap(), None);
        let pass = FullPass {
            fingerprint: store.fingerprint("p").await.unwrap(),
            at: "2026-12-02T10:00:00.000Z".into(),
        };
        let mut tx = store.begin().await.unwrap();
        save_full_pass(&mut tx, Some(&pass)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.last_full_pass().await.unwrap(), Some(pass));
        let mut tx = store.begin().await.unwrap();
        save_full_pass(&mut tx, None).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.last_full_pass().await.unwrap(), None);
    }
}

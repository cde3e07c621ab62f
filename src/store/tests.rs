//! The set-based queue writes against what one statement per usage did: the plan's
//! [`PlanWriter`] against [`enqueue`] and [`cancel`], and the sync batches' claim and completion.

use super::*;

/// A new, migrated state database in a temporary folder.
pub(super) async fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let settings = DatabaseSettings {
        path: dir.path().join("state.db"),
        url: None,
        busy_timeout: std::time::Duration::from_secs(5),
        group_shared: false,
        lock_timeout: std::time::Duration::from_secs(5),
    };
    let store = open_store(&settings, OpenMode::Create).await.unwrap();
    (dir, store)
}

fn asset(n: usize) -> String {
    format!("{n:08X}-C13A-4DA5-86EC{n:012X}")
}

fn uri(n: usize) -> String {
    format!("https://cms.example/pages/{n:05}")
}

/// Every operation's columns but the timestamps, in id order.
type Row = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    bool,
    i64,
    Option<i64>,
    i64,
    Option<String>,
);

async fn operations(store: &Store) -> Vec<Row> {
    sqlx::query_as(
        "SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_id, run_attempts, \
             last_error FROM operations ORDER BY id",
    )
    .fetch_all(store.test_pool())
    .await
    .unwrap()
}

/// `(asset_id, uri, created_at, next_attempt_at, updated_at)` of every operation, in id order.
async fn operation_times(store: &Store) -> Vec<(String, String, String, String, String)> {
    sqlx::query_as(
        "SELECT asset_id, uri, created_at, next_attempt_at, updated_at FROM operations ORDER BY id",
    )
    .fetch_all(store.test_pool())
    .await
    .unwrap()
}

async fn recorded(store: &Store) -> Vec<(String, String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT asset_id, uri, additional, usage_id FROM recorded_usages ORDER BY asset_id, uri",
    )
    .fetch_all(store.test_pool())
    .await
    .unwrap()
}

const EARLIER: &str = "2026-01-01T00:00:00.000Z";

/// Queues an operation in a given state, as earlier runs would have left it.
async fn queue_as(
    store: &Store,
    asset_id: &str,
    uri: &str,
    target: &Target,
    state: &str,
    uncertain: bool,
) {
    let (action, additional) = match target {
        Target::Upsert(a) => ("upsert", Some(a.as_str())),
        Target::Delete => ("delete", None),
    };
    sqlx::query(
        "INSERT INTO operations (asset_id, uri, action, additional, state, uncertain, attempts, run_id, \
             run_attempts, next_attempt_at, last_error, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 3, 7, 2, ?7, 'earlier failure', ?7, ?7)",
    )
    .bind(asset_id)
    .bind(uri)
    .bind(action)
    .bind(additional)
    .bind(state)
    .bind(uncertain)
    .bind(EARLIER)
    .execute(store.test_pool())
    .await
    .unwrap();
}

async fn record(
    store: &Store,
    asset_id: &str,
    uri: &str,
    additional: &str,
    usage_id: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO recorded_usages (asset_id, uri, additional, usage_id, synced_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(asset_id)
    .bind(uri)
    .bind(additional)
    .bind(usage_id)
    .bind(EARLIER)
    .execute(store.test_pool())
    .await
    .unwrap();
}

/// What a plan writes: enqueues and cancels, in planning order.
#[derive(Debug, Clone)]
enum Write {
    Enqueue(String, String, Target),
    Cancel(String, String),
}

/// The queue as earlier runs left it: a dead uncertain letter, an in-flight operation, a
/// pending one and a dead one, each of which the plan then writes over.
async fn earlier_queue(store: &Store) {
    let note = |s: &str| Target::Upsert(s.to_owned());
    queue_as(store, &asset(1), &uri(1), &note("dead"), "dead", true).await;
    queue_as(
        store,
        &asset(2),
        &uri(2),
        &note("flying"),
        "in_flight",
        false,
    )
    .await;
    queue_as(store, &asset(3), &uri(3), &Target::Delete, "pending", false).await;
    queue_as(store, &asset(4), &uri(4), &note("dead"), "dead", false).await;
    queue_as(
        store,
        &asset(5),
        &uri(5),
        &note("flying"),
        "in_flight",
        true,
    )
    .await;
}

/// A plan of more writes than one chunk, over the earlier queue: coalescing over each earlier
/// operation (one by another letter case of its asset id), cancelling the in-flight ones (which
/// must stay), a dead letter and a key never queued.
fn plan_writes() -> Vec<Write> {
    let note = |s: &str| Target::Upsert(s.to_owned());
    let mut writes = vec![
        Write::Enqueue(asset(1).to_lowercase(), uri(1), note("new note")),
        Write::Cancel(asset(2), uri(2)),
        Write::Enqueue(asset(3), uri(3), note("back again")),
        Write::Cancel(asset(4), uri(4)),
        Write::Enqueue(asset(5), uri(5), Target::Delete),
        Write::Cancel(asset(6), uri(6)),
    ];
    for n in 10..(10 + 2 * PLAN_WRITE_CHUNK + 500) {
        let target = if n % 3 == 0 {
            Target::Delete
        } else {
            note(&format!("note {n}"))
        };
        writes.push(Write::Enqueue(asset(n), uri(n % 400), target));
    }
    // Cancels in the second chunk of what this plan queued itself.
    writes.push(Write::Cancel(asset(20), uri(20)));
    writes.push(Write::Cancel(asset(21).to_lowercase(), uri(21)));
    writes
}

async fn write_one_at_a_time(store: &Store, writes: &[Write]) {
    let mut tx = store.begin().await.unwrap();
    for w in writes {
        match w {
            Write::Enqueue(a, u, t) => enqueue(&mut tx, a, u, t).await.unwrap(),
            Write::Cancel(a, u) => cancel(&mut tx, a, u).await.unwrap(),
        }
    }
    tx.commit().await.unwrap();
}

async fn write_collected(store: &Store, writes: &[Write]) {
    let mut tx = store.begin_plan().await.unwrap();
    for w in writes {
        match w {
            Write::Enqueue(a, u, t) => tx.enqueue(a, u, t).await.unwrap(),
            Write::Cancel(a, u) => tx.cancel(a, u).await.unwrap(),
        }
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn plan_writer_leaves_the_queue_as_one_statement_per_usage_does() {
    let writes = plan_writes();
    assert!(writes.len() > 2 * PLAN_WRITE_CHUNK);
    let (_a, one_at_a_time) = fresh().await;
    let (_b, collected) = fresh().await;
    for store in [&one_at_a_time, &collected] {
        earlier_queue(store).await;
    }
    write_one_at_a_time(&one_at_a_time, &writes).await;
    write_collected(&collected, &writes).await;

    let expected = operations(&one_at_a_time).await;
    let got = operations(&collected).await;
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);

    // Spelled out for the earlier operations.
    let by_key = |rows: &[Row], n: usize| {
        rows.iter()
            .find(|r| r.1.eq_ignore_ascii_case(&asset(n)) && r.2 == uri(n))
            .cloned()
    };
    let dead = by_key(&got, 1).unwrap();
    assert_eq!(dead.1, asset(1).to_lowercase(), "the id as planned last");
    assert_eq!(dead.4.as_deref(), Some("new note"));
    assert_eq!(dead.5, "pending");
    assert!(dead.6, "the uncertain flag is kept");
    assert_eq!((dead.7, dead.8, dead.9, dead.10), (0, None, 0, None));
    assert_eq!(by_key(&got, 2).unwrap().5, "in_flight", "never cancelled");
    assert_eq!(by_key(&got, 3).unwrap().3, "upsert");
    assert!(by_key(&got, 4).is_none(), "a dead letter is cancelled");
    let flying = by_key(&got, 5).unwrap();
    assert_eq!(
        (flying.3.as_str(), flying.5.as_str()),
        ("delete", "pending")
    );
    assert!(flying.6);
    assert!(by_key(&got, 20).is_none() && by_key(&got, 21).is_none());

    // Timestamps: a coalesced operation keeps when it was first queued, the rest is now.
    for (asset_id, uri, created, next, updated) in operation_times(&collected).await {
        assert_eq!(next, updated, "{asset_id} {uri}");
        if asset_id.eq_ignore_ascii_case(&asset(1)) || asset_id == asset(3) || asset_id == asset(5)
        {
            assert_eq!(created, EARLIER);
            assert!(updated > created);
        } else if asset_id == asset(2) {
            assert_eq!((created, updated), (EARLIER.to_owned(), EARLIER.to_owned()));
        } else {
            assert_eq!(created, updated);
        }
    }
}

#[tokio::test]
async fn plan_writer_keeps_the_order_of_writes_to_one_key() {
    let note = |s: &str| Target::Upsert(s.to_owned());
    let writes = vec![
        // Queued, then cancelled in the same plan: gone.
        Write::Enqueue(asset(1), uri(1), note("a")),
        Write::Cancel(asset(1), uri(1)),
        // Cancelled, then queued: there.
        Write::Cancel(asset(2), uri(2)),
        Write::Enqueue(asset(2), uri(2), note("b")),
        // Queued twice: the later target.
        Write::Enqueue(asset(3), uri(3), note("c")),
        Write::Enqueue(asset(3).to_lowercase(), uri(3), Target::Delete),
    ];
    let (_a, one_at_a_time) = fresh().await;
    let (_b, collected) = fresh().await;
    for store in [&one_at_a_time, &collected] {
        queue_as(store, &asset(2), &uri(2), &note("old"), "dead", true).await;
    }
    write_one_at_a_time(&one_at_a_time, &writes).await;
    write_collected(&collected, &writes).await;
    let got = operations(&collected).await;
    assert_eq!(got, operations(&one_at_a_time).await);
    let keys: Vec<(&str, &str)> = got.iter().map(|r| (r.1.as_str(), r.3.as_str())).collect();
    let lower = asset(3).to_lowercase();
    assert_eq!(
        keys,
        vec![(asset(2).as_str(), "upsert"), (lower.as_str(), "delete")]
    );
}

#[tokio::test]
async fn a_refused_plan_discards_every_chunk_written() {
    let (_dir, store) = fresh().await;
    earlier_queue(&store).await;
    let before = operations(&store).await;
    let mut tx = store.begin_plan().await.unwrap();
    for w in plan_writes() {
        match w {
            Write::Enqueue(a, u, t) => tx.enqueue(&a, &u, &t).await.unwrap(),
            Write::Cancel(a, u) => tx.cancel(&a, &u).await.unwrap(),
        }
    }
    tx.rollback().await.unwrap();
    assert_eq!(operations(&store).await, before);

    // Dropped without a commit (an error half way): the same.
    let mut tx = store.begin_plan().await.unwrap();
    for n in 100..(100 + PLAN_WRITE_CHUNK + 1) {
        tx.enqueue(&asset(n), &uri(n), &Target::Delete)
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(operations(&store).await, before);
}

/// A queue over 250 uris, two usages recorded on each: per uri one upsert of a new usage, one
/// delete of a recorded usage, and a dead letter for the other recorded usage (which the
/// listing keeps as recorded). Uri 3 has an operation in flight, uri 7's new usage is its
/// recorded one in another letter case.
async fn sync_queue(store: &Store) {
    for k in 0..250 {
        let (keep, gone, new) = (asset(3 * k), asset(3 * k + 1), asset(3 * k + 2));
        record(store, &keep, &uri(k), "kept", Some("usage-keep")).await;
        record(store, &gone, &uri(k), "gone", Some("usage-gone")).await;
        queue_as(
            store,
            &keep,
            &uri(k),
            &Target::Upsert("dead".into()),
            "dead",
            false,
        )
        .await;
        let mut tx = store.begin().await.unwrap();
        let new = if k == 7 { keep.to_lowercase() } else { new };
        let note = format!("new {k}");
        enqueue(&mut tx, &new, &uri(k), &Target::Upsert(note))
            .await
            .unwrap();
        enqueue(&mut tx, &gone, &uri(k), &Target::Delete)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query("UPDATE operations SET state = 'in_flight' WHERE uri = ? AND action = 'delete'")
        .bind(uri(3))
        .execute(store.test_pool())
        .await
        .unwrap();
}

fn expected_listing(k: usize) -> Vec<SyncUsage> {
    let usage = |asset_id: String, additional: &str| SyncUsage {
        asset_id,
        uri: uri(k),
        additional: additional.to_owned(),
    };
    if k == 7 {
        return vec![usage(asset(3 * k).to_lowercase(), "new 7")];
    }
    vec![
        usage(asset(3 * k), "kept"),
        usage(asset(3 * k + 2), &format!("new {k}")),
    ]
}

#[tokio::test]
async fn a_sync_batch_is_claimed_by_whole_uris_across_chunks() {
    let (_dir, store) = fresh().await;
    sync_queue(&store).await;
    // 2 usages per uri (1 on uri 7): 150 listed uris is more than one chunk of candidates.
    let batch = store.claim_sync_batch(11, 3, 300).await.unwrap().unwrap();
    let uris: Vec<usize> = (0..151).filter(|k| *k != 3).collect();
    assert!(uris.len() > CLAIM_CHUNK_URIS);
    assert_eq!(batch.uris, uris.iter().map(|k| uri(*k)).collect::<Vec<_>>());
    let listing: Vec<SyncUsage> = uris.iter().flat_map(|k| expected_listing(*k)).collect();
    assert_eq!(batch.listing.len(), 299);
    assert_eq!(batch.listing, listing);
    // Every pending operation of those uris, in uri order, then queue order; in flight now.
    let keys: Vec<(String, String)> = batch
        .ops
        .iter()
        .map(|op| (op.uri.to_string(), op.asset_id.to_string()))
        .collect();
    let expected: Vec<(String, String)> = uris
        .iter()
        .flat_map(|k| {
            let new = if *k == 7 {
                asset(21).to_lowercase()
            } else {
                asset(3 * k + 2)
            };
            [(uri(*k), new), (uri(*k), asset(3 * k + 1))]
        })
        .collect();
    assert_eq!(keys, expected);
    assert!(batch
        .ops
        .windows(2)
        .all(|w| w[0].uri != w[1].uri || w[0].id < w[1].id));
    for op in &batch.ops {
        assert_eq!((op.state, op.run_attempts), (OperationState::InFlight, 0));
    }
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE state = 'in_flight' AND run_id = 11",
    )
    .fetch_one(store.test_pool())
    .await
    .unwrap();
    assert_eq!(claimed as usize, batch.ops.len());

    // The rest; uri 3 waits for its operation in flight; then nothing.
    let rest = store.claim_sync_batch(11, 3, 300).await.unwrap().unwrap();
    assert_eq!(
        rest.uris,
        (151..250).map(uri).collect::<Vec<_>>(),
        "the rest, uri 3 skipped"
    );
    assert_eq!(rest.ops.len(), 2 * 99);
    assert!(store.claim_sync_batch(11, 3, 300).await.unwrap().is_none());
}

#[tokio::test]
async fn a_uri_listing_more_than_the_batch_size_goes_alone() {
    let (_dir, store) = fresh().await;
    sync_queue(&store).await;
    let batch = store.claim_sync_batch(1, 3, 1).await.unwrap().unwrap();
    assert_eq!(batch.uris, vec![uri(0)]);
    assert_eq!(batch.listing, expected_listing(0));
    assert_eq!(batch.ops.len(), 2);
}

#[tokio::test]
async fn completing_a_sync_batch_records_each_outcome() {
    let (_dir, store) = fresh().await;
    sync_queue(&store).await;
    let batch = store.claim_sync_batch(1, 3, 8).await.unwrap().unwrap();
    // Uris 0, 1, 2 and 4: per uri the new usage's operation, then the delete's.
    assert_eq!(batch.uris, [0, 1, 2, 4].map(uri).to_vec());
    let assets: Vec<String> = batch.ops.iter().map(|op| op.asset_id.to_string()).collect();
    assert_eq!(assets, [2, 1, 5, 4, 8, 7, 14, 13].map(asset).to_vec());
    let outcomes = vec![
        SyncOpOutcome::Upserted {
            additional: "new 0".into(),
            usage_id: Some("usage-0".into()),
        },
        SyncOpOutcome::Removed,
        SyncOpOutcome::Upserted {
            additional: "new 1".into(),
            usage_id: None,
        },
        // Recorded with an id already: an answer without one keeps it.
        SyncOpOutcome::Upserted {
            additional: "revived".into(),
            usage_id: None,
        },
        SyncOpOutcome::Rejected("no such asset".into()),
        SyncOpOutcome::Rejected("busy".into()),
        SyncOpOutcome::Unsettled,
        SyncOpOutcome::Removed,
    ];
    // Uri 1's kept usage was refused too, named in another letter case.
    let rejected_listed = vec![(asset(3).to_lowercase(), uri(1))];
    store
        .complete_sync_batch(&batch, &outcomes, &rejected_listed)
        .await
        .unwrap();

    let recorded = recorded(&store).await;
    let on = |k: usize| -> Vec<(String, String, Option<String>)> {
        recorded
            .iter()
            .filter(|r| r.1 == uri(k))
            .map(|r| (r.0.clone(), r.2.clone(), r.3.clone()))
            .collect()
    };
    let usage =
        |n: usize, note: &str, id: Option<&str>| (asset(n), note.to_owned(), id.map(str::to_owned));
    let kept = |n: usize| usage(n, "kept", Some("usage-keep"));
    assert_eq!(on(0), vec![kept(0), usage(2, "new 0", Some("usage-0"))]);
    assert_eq!(
        on(1),
        vec![
            usage(4, "revived", Some("usage-gone")),
            usage(5, "new 1", None)
        ]
    );
    assert_eq!(on(2), vec![kept(6)], "a rejected key is forgotten");
    assert_eq!(on(4), vec![kept(12)]);
    assert_eq!(on(5), vec![kept(15), usage(16, "gone", Some("usage-gone"))]);

    let mut ops: Vec<(String, OperationState, i64, bool, Option<String>)> = store
        .list_operations(false)
        .await
        .unwrap()
        .into_iter()
        .filter(|op| batch.uris.iter().any(|u| u == op.uri.as_str()))
        .map(|op| {
            (
                op.asset_id.to_string(),
                op.state,
                op.attempts,
                op.uncertain,
                op.last_error,
            )
        })
        .collect();
    ops.sort_by(|a, b| a.0.cmp(&b.0));
    let earlier = |n: usize| {
        (
            asset(n),
            OperationState::Dead,
            3,
            false,
            Some("earlier failure".to_owned()),
        )
    };
    let rejected = |n: usize, why: &str| {
        let error = format!("Bynder rejected the usage: {why}");
        (asset(n), OperationState::Dead, 1, false, Some(error))
    };
    let mut expected = vec![
        earlier(0),
        earlier(3),
        earlier(6),
        rejected(7, "busy"),
        rejected(8, "no such asset"),
        earlier(12),
        (asset(14), OperationState::InFlight, 0, false, None),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ops, expected);
}

/// The candidate uris of a sync batch as they were chosen before the walk along the due-time
/// index: the whole pending queue grouped by uri.
async fn candidates_by_grouping(store: &Store, run_id: i64, now: &str, max: i64) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT uri FROM operations WHERE state = 'pending' \
             AND (run_id IS NOT ?1 OR (next_attempt_at <= ?2 AND run_attempts < ?3)) \
             AND uri NOT IN (SELECT uri FROM operations WHERE state = 'in_flight') \
         GROUP BY uri ORDER BY min(next_attempt_at), uri LIMIT 1024",
    )
    .bind(run_id)
    .bind(now)
    .bind(max)
    .fetch_all(store.test_pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn sync_candidates_come_in_the_order_grouping_the_queue_gave() {
    let (_dir, store) = fresh().await;
    // 1,500 uris, three operations each, due at one of seven times (so the 1,024th uri shares
    // its due time with many others, some sorting before it), more rows than one page; some
    // uris have an operation in flight, some operations used up this run's attempts (due
    // earliest, so counting them would change the order).
    let mut tx = store.test_pool().begin().await.unwrap();
    for n in 0..1500usize {
        for k in 0..3usize {
            let due = format!("2026-01-01T00:00:0{}.000Z", (n * 5 + k * 3) % 7);
            let (state, run_id, run_attempts, due) = match (n % 11, k) {
                (0, 0) => ("in_flight", 5, 0, due),
                (1, 0) => ("pending", 5, 3, "2025-01-01T00:00:00.000Z".to_owned()),
                (2, 1) => ("dead", 5, 0, "2025-01-01T00:00:00.000Z".to_owned()),
                _ => ("pending", (n % 2) as i64 * 5, 0, due),
            };
            sqlx::query(
                "INSERT INTO operations (asset_id, uri, action, state, run_id, run_attempts, next_attempt_at, \
                     created_at, updated_at) VALUES (?1, ?2, 'delete', ?3, ?4, ?5, ?6, ?6, ?6)",
            )
            .bind(asset(3 * n + k))
            .bind(format!("https://cms.example/{}", (n * 7919) % 1500))
            .bind(state)
            .bind(run_id)
            .bind(run_attempts)
            .bind(&due)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
    let now = "2026-06-01T00:00:00.000Z";
    let expected = candidates_by_grouping(&store, 5, now, 3).await;
    assert_eq!(expected.len(), SYNC_CANDIDATES);
    let mut conn = store.begin().await.unwrap();
    let got = sync_candidates(&mut conn, 5, now, 3).await.unwrap();
    conn.rollback().await.unwrap();
    assert_eq!(got, expected);

    // Fewer uris than the limit, after most are claimed: still the same.
    sqlx::query("UPDATE operations SET state = 'dead' WHERE id % 5 != 0")
        .execute(store.test_pool())
        .await
        .unwrap();
    let expected = candidates_by_grouping(&store, 5, now, 3).await;
    assert!(expected.len() < SYNC_CANDIDATES && !expected.is_empty());
    let mut conn = store.begin().await.unwrap();
    let got = sync_candidates(&mut conn, 5, now, 3).await.unwrap();
    assert_eq!(got, expected);
}

-- What Bynder holds for this integration, as far as the daemon knows: one row per usage it
-- created and Bynder confirmed. Only rows here are ever deleted by the daemon.
CREATE TABLE recorded_usages (
    asset_id   TEXT NOT NULL,
    uri        TEXT NOT NULL,
    additional TEXT NOT NULL,
    usage_id   TEXT,                       -- Bynder's id of the usage, when known
    synced_at  TEXT NOT NULL,
    PRIMARY KEY (asset_id, uri)
) WITHOUT ROWID;

-- The durable queue: per (asset, uri) the state Bynder must reach. A usage with `additional`
-- (action 'upsert') or no usage at all (action 'delete'). Planning a new target for the same key
-- replaces the old one, so operations coalesce by construction.
CREATE TABLE operations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    asset_id        TEXT NOT NULL,
    uri             TEXT NOT NULL,
    action          TEXT NOT NULL CHECK (action IN ('upsert', 'delete')),
    additional      TEXT,                  -- the target note for 'upsert'
    state           TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'dead')),
    -- 1 when a request may have reached Bynder without us seeing the answer: the next attempt
    -- reads Bynder back before sending anything, so a retried create never duplicates.
    uncertain       INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    run_id          INTEGER,               -- the run that last tried it
    run_attempts    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (asset_id, uri)
);
CREATE INDEX operations_due ON operations (state, next_attempt_at);

-- One row per reconcile run, for `status` and the daemon's health.
CREATE TABLE runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    command       TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    finished_at   TEXT,
    outcome       TEXT,                    -- converged | nothing_to_do | partial | failed | dry_run
    creates       INTEGER NOT NULL DEFAULT 0,
    updates       INTEGER NOT NULL DEFAULT 0,
    deletes       INTEGER NOT NULL DEFAULT 0,
    skipped_rows  INTEGER NOT NULL DEFAULT 0,
    succeeded     INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    requests      INTEGER NOT NULL DEFAULT 0,
    message       TEXT
);

-- Small process-wide facts that must survive restarts (e.g. a rate-limit pause).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

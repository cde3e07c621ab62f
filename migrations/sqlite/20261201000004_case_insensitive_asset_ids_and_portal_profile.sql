-- Bynder may answer asset ids in another letter case than the CMS wrote them (Contentful's app
-- lowercases them on both sides), so one usage is one (asset id ignoring ASCII case, uri). The
-- daemon's own tables compare asset ids with NOCASE from now on; ids are still stored and sent
-- exactly as the CMS wrote them. Rows that only differed in case collapse to the first one: the
-- next plan (or `resync --verify`) repairs whatever that leaves.
CREATE TABLE recorded_usages_nocase (
    asset_id   TEXT NOT NULL COLLATE NOCASE,
    uri        TEXT NOT NULL,
    additional TEXT NOT NULL,
    usage_id   TEXT,
    synced_at  TEXT NOT NULL,
    PRIMARY KEY (asset_id, uri)
) WITHOUT ROWID;
INSERT OR IGNORE INTO recorded_usages_nocase (asset_id, uri, additional, usage_id, synced_at)
    SELECT asset_id, uri, additional, usage_id, synced_at FROM recorded_usages ORDER BY asset_id, uri;
DROP TABLE recorded_usages;
ALTER TABLE recorded_usages_nocase RENAME TO recorded_usages;
CREATE INDEX recorded_usages_by_uri ON recorded_usages (uri);

CREATE TABLE operations_nocase (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    asset_id        TEXT NOT NULL COLLATE NOCASE,
    uri             TEXT NOT NULL,
    action          TEXT NOT NULL CHECK (action IN ('upsert', 'delete')),
    additional      TEXT,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'dead')),
    uncertain       INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    run_id          INTEGER,
    run_attempts    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (asset_id, uri)
);
-- A case variant of a queued key keeps the operation planned last (the highest id).
INSERT OR REPLACE INTO operations_nocase
    SELECT id, asset_id, uri, action, additional, state, uncertain, attempts, run_id, run_attempts,
           next_attempt_at, last_error, created_at, updated_at FROM operations ORDER BY id;
DROP TABLE operations;
ALTER TABLE operations_nocase RENAME TO operations;
CREATE INDEX operations_due ON operations (state, next_attempt_at);
CREATE INDEX operations_by_uri ON operations (uri, state);

-- The plan reads the CMS table in the same order: asset id ignoring case, then uri (the binary
-- asset id last only orders case variants, the second of which is skipped).
CREATE INDEX IF NOT EXISTS cms_asset_references_by_key_nocase
    ON cms_asset_references (asset_id COLLATE NOCASE, uri, asset_id);

-- What the daemon learned about the portal it talks to, where Bynder's documentation is silent
-- (whether the sync endpoint exists, removes omitted assets, answers in full; whether ids come
-- back re-cased…), per portal base URL, with when and how it was learned.
CREATE TABLE portal_profile (
    portal     TEXT NOT NULL,
    fact       TEXT NOT NULL,
    value      TEXT NOT NULL,
    learned_at TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    PRIMARY KEY (portal, fact)
) WITHOUT ROWID;

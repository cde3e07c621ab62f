-- The CMS-facing table: one row per place the CMS uses a Bynder asset.
-- The CMS (or its export job) writes it; the daemon only reads it.
CREATE TABLE IF NOT EXISTS cms_asset_references (
    asset_id   TEXT NOT NULL,              -- Bynder media id, e.g. C078E8EE-C13A-4DA5-86EC8D6F335364EB
    uri        TEXT NOT NULL,              -- where the CMS uses it (absolute URL recommended)
    additional TEXT,                       -- optional note shown in Bynder (field, page title)
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (asset_id, uri)
);

-- Change capture: every write to cms_asset_references leaves the asset id it touched in
-- cms_changes, so the daemon notices an edit within a fraction of a second and plans only the
-- assets that changed (all their uris), instead of waiting for the next scheduled full pass.
-- The daemon deletes entries once the plan that covers them is in the queue. A key that is not
-- text is logged as NULL: such a row is never sent, but the entry still wakes the daemon.
-- AUTOINCREMENT: sequence numbers never go back, even after the log is emptied. Every statement
-- is idempotent: `migrate` runs this file again to put back triggers a recreated table lost.
CREATE TABLE IF NOT EXISTS cms_changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    asset_id TEXT COLLATE NOCASE
);

CREATE TRIGGER IF NOT EXISTS cms_changes_after_insert AFTER INSERT ON cms_asset_references
BEGIN
    INSERT INTO cms_changes (asset_id)
        VALUES (CASE WHEN typeof(NEW.asset_id) = 'text' THEN NEW.asset_id END);
END;

CREATE TRIGGER IF NOT EXISTS cms_changes_after_update AFTER UPDATE ON cms_asset_references
BEGIN
    INSERT INTO cms_changes (asset_id)
        VALUES (CASE WHEN typeof(OLD.asset_id) = 'text' THEN OLD.asset_id END);
    INSERT INTO cms_changes (asset_id)
        SELECT CASE WHEN typeof(NEW.asset_id) = 'text' THEN NEW.asset_id END
        WHERE NEW.asset_id IS NOT OLD.asset_id;
END;

CREATE TRIGGER IF NOT EXISTS cms_changes_after_delete AFTER DELETE ON cms_asset_references
BEGIN
    INSERT INTO cms_changes (asset_id)
        VALUES (CASE WHEN typeof(OLD.asset_id) = 'text' THEN OLD.asset_id END);
END;

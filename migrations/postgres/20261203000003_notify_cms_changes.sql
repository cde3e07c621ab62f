-- Change capture without polling: a statement that wrote cms_asset_references notifies the
-- channel `bynder_usage_sync_changes` (the payload: the table's schema, so daemons of other
-- schemas in the database ignore it). PostgreSQL delivers it when the writing transaction
-- commits, to the daemon LISTENing there, which then reads the log at once. The log itself stays
-- the record: a notification lost (a reconnect) only waits for the daemon's slower look at the
-- log. Idempotent, as the capture file: `migrate` runs it again to put back what a recreated
-- table lost.
CREATE OR REPLACE FUNCTION cms_changes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bynder_usage_sync_changes', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER cms_changes_notify AFTER INSERT OR UPDATE OR DELETE ON cms_asset_references
    FOR EACH STATEMENT EXECUTE FUNCTION cms_changes_notify();

-- The sync endpoint works per uri: find a uri's recorded usages and queued operations fast.
CREATE INDEX recorded_usages_by_uri ON recorded_usages (uri);
CREATE INDEX operations_by_uri ON operations (uri, state);

-- pacs-cache/cache.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY, complete INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0, last_used REAL NOT NULL);
CREATE INDEX studies_lru ON studies (last_used);
CREATE TABLE instances (
    study_uid TEXT NOT NULL, sop_uid TEXT NOT NULL, digest TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (study_uid, sop_uid));
CREATE INDEX instances_digest ON instances (digest);

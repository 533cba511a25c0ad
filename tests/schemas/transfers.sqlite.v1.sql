-- transfers.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE fetches (
    id TEXT PRIMARY KEY, started REAL NOT NULL, document TEXT NOT NULL);
CREATE TABLE stream_instances (
    stream_id TEXT NOT NULL, study BLOB NOT NULL, digest BLOB NOT NULL, size INTEGER NOT NULL);
CREATE TABLE streams (
    stream_id TEXT PRIMARY KEY, kind TEXT NOT NULL, token_id BLOB NOT NULL, peer TEXT NOT NULL,
    started REAL NOT NULL, recorded INTEGER NOT NULL DEFAULT 0);
CREATE INDEX stream_instances_by_stream ON stream_instances (stream_id);

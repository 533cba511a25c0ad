-- forward.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE cursor (id INTEGER PRIMARY KEY CHECK (id = 1), last_rowid INTEGER);
CREATE TABLE queue (
    sop_instance_uid TEXT PRIMARY KEY,
    index_rowid INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    forwarded INTEGER NOT NULL DEFAULT 0,
    last_success_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at REAL
);
CREATE INDEX queue_due ON queue (state, next_try, index_rowid);

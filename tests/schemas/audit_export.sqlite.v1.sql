-- audit_export.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, message BLOB NOT NULL);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    queued_bytes INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0
);

-- ledger.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE entries (
    log INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    PRIMARY KEY (log, idx)
) WITHOUT ROWID;
CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    log_id BLOB NOT NULL UNIQUE,
    origin TEXT NOT NULL UNIQUE,
    vkey TEXT NOT NULL,
    own INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    checkpoint_size INTEGER,
    checkpoint_time INTEGER
);
CREATE TABLE subtrees (
    log INTEGER NOT NULL,
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (log, level, idx)
) WITHOUT ROWID;
CREATE TABLE log_keys (
    log INTEGER NOT NULL,
    first_size INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    PRIMARY KEY (log, first_size)
) WITHOUT ROWID;

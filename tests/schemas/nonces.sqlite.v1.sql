-- nonces.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE nonces (
    signer TEXT NOT NULL, nonce BLOB NOT NULL, timestamp INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)) WITHOUT ROWID;
CREATE INDEX nonces_by_time ON nonces (timestamp);

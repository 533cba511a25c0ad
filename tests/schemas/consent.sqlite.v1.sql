-- consent.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE grants (
    token_id BLOB PRIMARY KEY, patient_key BLOB NOT NULL, token BLOB NOT NULL,
    ledger_index INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE patient_keys (
    public_key BLOB PRIMARY KEY, subject BLOB NOT NULL, enrolled_index INTEGER NOT NULL,
    retired_index INTEGER) WITHOUT ROWID;
CREATE TABLE replay (
    name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE revocations (
    patient_key BLOB NOT NULL, token_id BLOB NOT NULL, ledger_index INTEGER NOT NULL,
    PRIMARY KEY (patient_key, token_id)) WITHOUT ROWID;
CREATE TABLE study_refs (
    ref BLOB PRIMARY KEY, study_uid TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE subjects (
    subject BLOB PRIMARY KEY, patient_id TEXT NOT NULL UNIQUE) WITHOUT ROWID;
CREATE INDEX grants_by_key ON grants (patient_key);
CREATE INDEX patient_keys_by_subject ON patient_keys (subject);

-- federation.sqlite at schema version 1, as the node created it; tests upgrade from it.
CREATE TABLE equivocations ( log_id TEXT NOT NULL, origin TEXT NOT NULL, note_a TEXT NOT NULL, note_b TEXT NOT NULL, reason TEXT NOT NULL, detected_at INTEGER NOT NULL, prefix_root BLOB, consistency BLOB NOT NULL DEFAULT x'', PRIMARY KEY (log_id, note_a, note_b));

// C2SP tlog-proof files (what `imageshare proof export` writes) verified in the browser,
// offline: the entry in the file's extra line sits at its index under a checkpoint signed
// by the log's key and cosigned by enough of the witnesses given. As strict as the node's
// verifier (node/core/proof_file.py), so that no byte of a file changes unnoticed.

import { fromBase64, toBase64 } from "./bytes.js";
import { leafHash, parseNote, parseVkey, validCosigners, verifyCheckpoint, verifyInclusion } from "./ledger.js";
import { decode } from "./msgpack.js";

const HEADER = "c2sp.org/tlog-proof@v1";
const MAX_HASHES = 63;

function strictBase64(text, what) {
  let data;
  try {
    data = fromBase64(text);
  } catch {
    throw new Error(`${what} is not base64`);
  }
  if (toBase64(data) !== text) throw new Error(`${what} is not canonical base64`);
  return data;
}

/** Parse a proof file's bytes: {entry, index, proof, note}; throws if malformed. */
export function parseProofFile(bytes) {
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new Error("a proof file is UTF-8 text");
  }
  const split = text.indexOf("\n\n");
  if (split < 0) throw new Error("a proof file needs a blank line before the checkpoint");
  const lines = text.slice(0, split).split("\n");
  const note = text.slice(split + 2);
  if (lines.length < 3 || lines[0] !== HEADER) throw new Error(`not a ${HEADER} file`);
  if (!lines[1].startsWith("extra ")) throw new Error("the file has no extra line (the entry)");
  const entry = strictBase64(lines[1].slice(6), "the extra line");
  const index = /^index (0|[1-9][0-9]{0,15})$/.exec(lines[2]);
  if (!index) throw new Error("the index line is 'index <decimal>'");
  const hashes = lines.slice(3);
  if (hashes.length > MAX_HASHES) throw new Error("too many proof lines");
  const proof = hashes.map((line) => {
    const hash = strictBase64(line, "a proof line");
    if (hash.length !== 32) throw new Error("a proof line is one 32-byte hash");
    return hash;
  });
  return { entry, index: Number(index[1]), proof, note };
}

/**
 * Verify a proof file offline. Returns {origin, size, index, kind, time, cosigners};
 * throws with the reason if anything does not verify, any signature line is neither the
 * log's nor a given witness's valid cosignature, or fewer than ``threshold`` cosigned.
 */
export async function verifyProofFile(bytes, logVkey, witnessVkeys = [], threshold = 0) {
  const file = parseProofFile(bytes);
  const checkpoint = await verifyCheckpoint(file.note, logVkey);
  const log = await parseVkey(logVkey);
  const { signatures } = parseNote(file.note);
  const cosigners = await validCosigners(file.note, witnessVkeys);
  const logLines = signatures.filter((s) => s.name === log.name).length;
  if (logLines !== 1 || signatures.length !== 1 + cosigners.length) {
    throw new Error("the proof carries a signature that is not the log's or a known witness's");
  }
  if (cosigners.length < threshold) {
    throw new Error(`${cosigners.length} known witnesses cosigned, ${threshold} are needed`);
  }
  const leaf = await leafHash(file.entry);
  if (!(await verifyInclusion(file.proof, leaf, file.index, checkpoint.size, checkpoint.root))) {
    throw new Error(`the entry is not at index ${file.index} of the signed tree`);
  }
  const entry = decode(file.entry);
  if (!entry || typeof entry.kind !== "string") throw new Error("the entry does not decode");
  return {
    origin: checkpoint.origin,
    size: checkpoint.size,
    index: file.index,
    kind: entry.kind,
    time: Number(entry.time),
    cosigners,
  };
}

/**
 * The "verify a proof file" screen: a file input, the log's key (default: the pinned key
 * of this node) and witness keys (default: the other logs this node lists).
 */
export function mountProofScreen(section, defaults) {
  const file = section.querySelector("#proof-file");
  const logKey = section.querySelector("#proof-log-key");
  const witnesses = section.querySelector("#proof-witnesses");
  const result = section.querySelector("#proof-result");
  section.querySelector("#proof-verify").addEventListener("click", async () => {
    result.textContent = "";
    result.dataset.verdict = "";
    try {
      if (!file.files.length) throw new Error("choose a .tlog-proof file");
      const bytes = new Uint8Array(await file.files[0].arrayBuffer());
      const { vkey, witnessVkeys } = await defaults();
      const keys = witnesses.value.split(/\s+/).filter(Boolean);
      const shown = await verifyProofFile(
        bytes,
        logKey.value.trim() || vkey,
        keys.length ? keys : witnessVkeys,
        1,
      );
      const when = new Date(shown.time * 1000).toISOString().slice(0, 16).replace("T", " ");
      result.textContent =
        `Proven: ${shown.kind} of ${when} UTC, entry ${shown.index} of ${shown.origin}` +
        ` (checkpoint ${shown.size}), witnessed by ${shown.cosigners.join(", ")}`;
      result.dataset.verdict = "proven";
    } catch (error) {
      result.textContent = `Not proven: ${error.message || String(error)}`;
      result.dataset.verdict = "refused";
    }
  });
}


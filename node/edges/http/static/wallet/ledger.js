// Checking the custodian's log in the browser: C2SP signed notes and checkpoints (with
// witnesses' cosignatures) verified by WebCrypto Ed25519, and RFC 6962 inclusion proofs
// recomputed here, so the activity shown is proven rather than taken on trust.

import { concat, equal, fromBase64, sha256, toHex, utf8 } from "./bytes.js";
import { decode } from "./msgpack.js";

const SIGNATURE_PREFIX = "\u2014 ";
const NODE_ALG = 0x01;
const COSIGNATURE_ALG = 0x04;

export function leafHash(entry) {
  return sha256(concat(Uint8Array.of(0), entry));
}

export function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(1), left, right));
}

/** The root an RFC 9162 inclusion proof implies for ``leaf`` at ``index``, or null. */
export async function rootFromInclusion(proof, leaf, index, size) {
  if (!(index >= 0 && index < size)) return null;
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of proof) {
    if (p.length !== 32 || sn === 0) return null;
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 ? r : null;
}

export async function verifyInclusion(proof, leaf, index, size, root) {
  const computed = await rootFromInclusion(proof, leaf, index, size);
  return computed !== null && equal(computed, root);
}

async function keyId(name, alg, publicKey) {
  return (await sha256(concat(utf8(name + "\n"), Uint8Array.of(alg), publicKey))).slice(0, 4);
}

/**
 * A C2SP verifier key "name+keyid+base64(alg||key)": {name, alg, keyId, publicKey}; alg is
 * 0x01 (a log's Ed25519 key) or 0x04 (a witness's cosigning key).
 */
export async function parseVkey(vkey) {
  const parts = vkey.split("+");
  if (parts.length < 3) throw new Error("malformed verifier key");
  const [name, hexId] = parts;
  const raw = fromBase64(parts.slice(2).join("+"));
  const alg = raw[0];
  if (raw.length !== 33 || (alg !== NODE_ALG && alg !== COSIGNATURE_ALG)) {
    throw new Error("not an Ed25519 verifier key");
  }
  const publicKey = raw.slice(1);
  const id = await keyId(name, alg, publicKey);
  if (toHex(id) !== hexId) throw new Error("verifier key id does not match its key");
  return { name, alg, keyId: id, publicKey };
}

export function verifyEd25519(publicKey, signature, message) {
  return crypto.subtle
    .importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"])
    .then((key) => crypto.subtle.verify({ name: "Ed25519" }, key, signature, message))
    .catch(() => false);
}

/** Split a signed note into body and signature lines (unverified). */
export function parseNote(text) {
  const split = text.lastIndexOf("\n\n");
  if (split < 0 || !text.endsWith("\n")) throw new Error("malformed signed note");
  const body = text.slice(0, split + 1);
  const signatures = text
    .slice(split + 2, -1)
    .split("\n")
    .map((line) => {
      if (!line.startsWith(SIGNATURE_PREFIX)) throw new Error("malformed signature line");
      const [name, encoded, extra] = line.slice(SIGNATURE_PREFIX.length).split(" ");
      if (!name || !encoded || extra !== undefined) throw new Error("malformed signature line");
      const raw = fromBase64(encoded);
      if (raw.length < 5) throw new Error("signature too short");
      return { name, keyId: raw.slice(0, 4), signature: raw.slice(4) };
    });
  return { body, signatures };
}

function parseCheckpoint(body) {
  const lines = body.slice(0, -1).split("\n");
  if (lines.length < 3 || !/^(0|[1-9][0-9]{0,15})$/.test(lines[1])) {
    throw new Error("malformed checkpoint");
  }
  const root = fromBase64(lines[2]);
  if (root.length !== 32) throw new Error("malformed checkpoint root");
  return { origin: lines[0], size: Number(lines[1]), root };
}

/** The checkpoint of a note signed by the log key ``vkey``; throws if it does not verify. */
export async function verifyCheckpoint(note, vkey) {
  const key = await parseVkey(vkey);
  if (key.alg !== NODE_ALG) throw new Error("a log's key is an Ed25519 (0x01) key");
  const { body, signatures } = parseNote(note);
  const own = signatures.find((s) => s.name === key.name && equal(s.keyId, key.keyId));
  if (!own) throw new Error(`the checkpoint carries no signature by ${key.name}`);
  if (!(await verifyEd25519(key.publicKey, own.signature, utf8(body)))) {
    throw new Error(`the signature of ${key.name} on the checkpoint does not verify`);
  }
  const checkpoint = parseCheckpoint(body);
  if (checkpoint.origin !== key.name) throw new Error("the checkpoint names another log");
  return { ...checkpoint, body };
}

/** Names of the witnesses (vkeys given) whose tlog-cosignature/v1 on the note verifies. */
export async function validCosigners(note, witnessVkeys) {
  const { body, signatures } = parseNote(note);
  const names = new Set();
  for (const vkey of witnessVkeys) {
    let key;
    try {
      key = await parseVkey(vkey);
    } catch {
      continue;
    }
    const id = await keyId(key.name, COSIGNATURE_ALG, key.publicKey);
    for (const s of signatures) {
      if (s.name !== key.name || !equal(s.keyId, id) || s.signature.length !== 72) continue;
      const time = s.signature.slice(0, 8);
      let seconds = 0n;
      for (const b of time) seconds = seconds * 256n + BigInt(b);
      const message = utf8(`cosignature/v1\ntime ${seconds}\n` + body);
      if (await verifyEd25519(key.publicKey, s.signature.slice(8), message)) names.add(key.name);
    }
  }
  return [...names].sort();
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "omit" });
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.json();
}

async function getText(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "omit" });
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.text();
}

/** This node's origin and its own log's listing ({origin, log_id, vkey}), plus all logs. */
export async function describeNode() {
  const { origin } = await getJson("/healthz");
  const logs = await getJson("/ledger/logs");
  const own = logs.find((log) => log.origin === origin);
  if (!own) throw new Error("the node does not publish its own log");
  return { origin, own, logs };
}

async function entries(logId, size) {
  const all = [];
  while (all.length < size) {
    const response = await fetch(`/ledger/logs/${logId}/entries?start=${all.length}&end=${size}`, {
      cache: "no-store",
      credentials: "omit",
    });
    if (!response.ok) throw new Error(`the log's entries answered ${response.status}`);
    const page = decode(new Uint8Array(await response.arrayBuffer()));
    if (!Array.isArray(page) || page.length === 0) throw new Error("the log served no entries");
    for (const raw of page) {
      if (!(raw instanceof Uint8Array)) throw new Error("the log served a malformed entry");
      all.push(raw);
    }
  }
  return all.slice(0, size);
}

function eventTokenId(entry) {
  if (["access", "denial", "contribution"].includes(entry.kind)) return entry.token_id;
  if (entry.kind === "revoke") {
    const revocation = decode(entry.revocation);
    return revocation[2];
  }
  if (entry.kind === "break_glass") return entry.request;
  return null;
}

// The entries about my grants (a contribution: an opinion returned through my link).
const EVENT_KINDS = ["access", "denial", "revoke", "break_glass", "contribution"];

/**
 * Every access, denial, revocation and contribution naming one of ``tokenIds`` (hex) in this node's
 * log (and, given ``ownKey``, every break-glass naming that key and what came under it),
 * each with its proof: checkpoint signed by ``pinnedVkey``, witnesses' valid
 * cosignatures (under ``witnessVkeys``, the pinned roster's, when given), and the
 * entry's inclusion under the checkpoint root.
 */
export async function myEvents(node, pinnedVkey, tokenIds, ownKey = null, witnessVkeys = null) {
  const note = await getText(`/ledger/logs/${node.own.log_id}/checkpoint`);
  const checkpoint = await verifyCheckpoint(note, pinnedVkey);
  // Without a pinned federation roster, the witnesses' keys are the node's own listing.
  const witnesses =
    witnessVkeys ?? node.logs.filter((log) => log.origin !== node.origin).map((log) => log.vkey);
  const cosigners = await validCosigners(note, witnesses);
  const events = [];
  const raws = await entries(node.own.log_id, checkpoint.size);
  for (let index = 0; index < raws.length; index++) {
    let entry;
    try {
      entry = decode(raws[index]);
    } catch {
      continue;
    }
    if (!EVENT_KINDS.includes(entry.kind)) continue;
    // Break-glass naming my key is mine (safety.js), and so is every access under it.
    if (entry.kind === "break_glass") {
      if (!ownKey || !(entry.patient_key instanceof Uint8Array)) continue;
      if (!equal(entry.patient_key, ownKey)) continue;
      tokenIds.add(toHex(entry.request));
    }
    let id;
    try {
      id = toHex(eventTokenId(entry));
    } catch {
      continue;
    }
    if (!tokenIds.has(id)) continue;
    const answer = await getJson(
      `/ledger/logs/${node.own.log_id}/proof/inclusion?index=${index}&size=${checkpoint.size}`,
    );
    const proof = answer.proof.map(fromBase64);
    const included = await verifyInclusion(
      proof,
      await leafHash(raws[index]),
      index,
      checkpoint.size,
      checkpoint.root,
    );
    events.push({ index, entry, tokenId: id, included, cosigners, size: checkpoint.size });
  }
  return { events, checkpoint, cosigners };
}

/**
 * Check that a submission's answer proves an entry (kind, field = expected) in this
 * node's log under a checkpoint signed by ``pinnedVkey``; returns the entry's index.
 */
export async function verifyRecorded(answer, pinnedVkey, kind, field, expected) {
  const raw = fromBase64(answer.entry);
  const entry = decode(raw);
  if (
    entry.kind !== kind ||
    !(entry[field] instanceof Uint8Array) ||
    !equal(entry[field], expected)
  ) {
    throw new Error(`the node's proof is for another entry than my ${kind}`);
  }
  const checkpoint = await verifyCheckpoint(answer.checkpoint, pinnedVkey);
  const proof = answer.proof.map(fromBase64);
  const ok = await verifyInclusion(
    proof,
    await leafHash(raw),
    answer.index,
    checkpoint.size,
    checkpoint.root,
  );
  if (!ok) throw new Error(`the ${kind} is not proven to be in the hospital's log`);
  return answer.index;
}

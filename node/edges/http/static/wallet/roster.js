// The federation roster in the browser: the wallet pins the federation key (from the
// enrollment desk's code), takes the roster log from the custodian (it is signed, so any
// copy will do), checks its chain of versions from the pinned key, and counts a witness's
// cosignature only under a key the newest verified version names. The format and the
// chain rule are docs/federation.md § The signed roster (node/core/roster_document.py).

import { equal, utf8 } from "./bytes.js";
import { store } from "./keys.js";
import {
  leafHash,
  nodeHash,
  parseNote,
  parseVkey,
  verifyCheckpoint,
  verifyEd25519,
} from "./ledger.js";
import { decode } from "./msgpack.js";

const HEADER = "imageshare-roster/v1";
const MAX_ENTRIES = 8192;
const DECIMAL = /^(0|[1-9][0-9]{0,15})$/;

function field(line, name) {
  if (!line || !line.startsWith(name + " ")) throw new Error(`roster line should be '${name} ...'`);
  return line.slice(name.length + 1);
}

function number(line, name) {
  const value = field(line, name);
  if (!DECIMAL.test(value)) throw new Error(`roster ${name} is not a decimal integer`);
  return Number(value);
}

function bodyOf(doc) {
  const head =
    `${HEADER}\nfederation ${doc.federation}\nversion ${doc.version}\n` +
    `not-before ${doc.notBefore}\nnot-after ${doc.notAfter}\nkey ${doc.key}\n` +
    `threshold ${doc.threshold}\n`;
  const lines = doc.members.map((m) => `member ${m.origin} ${m.vkey} ${m.roles} ${m.url}\n`);
  return head + lines.join("");
}

/** A roster note body as {federation, version, key, threshold, members}; throws if malformed. */
export function parseRoster(body) {
  if (!body.endsWith("\n")) throw new Error("a roster ends with a newline");
  const lines = body.slice(0, -1).split("\n");
  if (lines[0] !== HEADER || lines.length < 7) throw new Error("not a roster");
  const doc = {
    federation: field(lines[1], "federation"),
    version: number(lines[2], "version"),
    notBefore: number(lines[3], "not-before"),
    notAfter: number(lines[4], "not-after"),
    key: field(lines[5], "key"),
    threshold: number(lines[6], "threshold"),
    members: lines.slice(7).map((line) => {
      const parts = field(line, "member").split(" ");
      if (parts.length !== 4) throw new Error("malformed roster member line");
      const [origin, vkey, roles, url] = parts;
      return { origin, vkey, roles, url };
    }),
  };
  // The Python side checks every field's rule; here, one canonical form is enough.
  if (bodyOf(doc) !== body) throw new Error("the roster is not in its canonical form");
  return doc;
}

async function signedBy(body, signatures, vkey) {
  let key;
  try {
    key = await parseVkey(vkey);
  } catch {
    return false;
  }
  for (const s of signatures) {
    if (s.name === key.name && equal(s.keyId, key.keyId)) {
      if (await verifyEd25519(key.publicKey, s.signature, utf8(body))) return true;
    }
  }
  return false;
}

async function openRoster(note) {
  const { body, signatures } = parseNote(note);
  const doc = parseRoster(body);
  if (!(await signedBy(body, signatures, doc.key))) {
    throw new Error(`roster version ${doc.version} is not signed by the key it names`);
  }
  return { doc, body, signatures };
}

async function checkSuccessor(previous, note) {
  const { doc, body, signatures } = await openRoster(note);
  if (doc.federation !== previous.federation || doc.version !== previous.version + 1) {
    throw new Error(`roster version ${doc.version} does not follow version ${previous.version}`);
  }
  if (await signedBy(body, signatures, previous.key)) return doc;
  let count = 0;
  for (const m of previous.members) if (await signedBy(body, signatures, m.vkey)) count++;
  if (previous.threshold > 0 && count >= previous.threshold) return doc;
  throw new Error(
    `roster version ${doc.version} is not signed as version ${previous.version} requires`,
  );
}

async function treeRoot(leaves) {
  if (leaves.length === 1) return leaves[0];
  let split = 1;
  while (split * 2 < leaves.length) split *= 2;
  return nodeHash(await treeRoot(leaves.slice(0, split)), await treeRoot(leaves.slice(split)));
}

/** The newest roster version a roster log proves from ``pinnedKey``; throws if it does not. */
export async function verifyRosterLog(pinnedKey, checkpointNote, raws) {
  const pinned = await parseVkey(pinnedKey);
  const notes = raws
    .map((raw) => decode(raw))
    .filter((entry) => entry.kind === "roster")
    .map((entry) => new TextDecoder("utf-8", { fatal: true }).decode(entry.note));
  let newest = null;
  for (let i = 0; i < notes.length; i++) {
    if (newest) {
      newest = await checkSuccessor(newest, notes[i]);
      continue;
    }
    const doc = parseRoster(parseNote(notes[i]).body);
    if (doc.version !== i + 1) throw new Error("the roster log is out of order");
    const key = await parseVkey(doc.key);
    if (equal(key.publicKey, pinned.publicKey)) newest = (await openRoster(notes[i])).doc;
  }
  if (!newest) throw new Error("no roster version names the pinned federation key");
  const checkpoint = await verifyCheckpoint(checkpointNote, newest.key);
  if (checkpoint.size !== raws.length || raws.length === 0) {
    throw new Error("the roster checkpoint does not cover the roster log served");
  }
  const leaves = await Promise.all(raws.map(leafHash));
  if (!equal(await treeRoot(leaves), checkpoint.root)) {
    throw new Error("the roster log does not give its checkpoint's root");
  }
  return newest;
}

async function fetchOk(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "omit" });
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response;
}

async function rosterLog() {
  const checkpoint = await (await fetchOk("/federation/roster/log/checkpoint")).text();
  const size = Number(parseNote(checkpoint).body.split("\n")[1]);
  if (!(size > 0 && size <= MAX_ENTRIES)) throw new Error("the roster log's size is out of range");
  const raws = [];
  while (raws.length < size) {
    const path = `/federation/roster/log/entries?start=${raws.length}&end=${size}`;
    const page = decode(new Uint8Array(await (await fetchOk(path)).arrayBuffer()));
    if (!Array.isArray(page) || page.length === 0) {
      throw new Error("the roster log served no entries");
    }
    for (const raw of page) {
      if (!(raw instanceof Uint8Array)) throw new Error("the roster log served a malformed entry");
      raws.push(raw);
    }
  }
  return { checkpoint, raws: raws.slice(0, size) };
}

/**
 * The federation key pinned for the custodian ``node``, or null. The enrollment desk's
 * code opens the wallet at `/wallet/#custodian=<vkey>&federation=<vkey>`: the custodian's
 * key must be the log key this address serves, and the federation key is pinned once.
 */
export async function pinFederation(node) {
  const offered = new URLSearchParams(location.hash.slice(1));
  // "pin:" names survive a restore (keys.js); no origin holds a space.
  const name = `pin:${node.origin} federation`;
  const custodian = offered.get("custodian");
  const federation = offered.get("federation");
  if (custodian && custodian !== node.own.vkey) {
    throw new Error(`the desk's code names another log key for ${node.origin} than it serves`);
  }
  if (federation) {
    await parseVkey(federation);
    const pinned = await store.get(name);
    if (pinned && pinned !== federation) {
      throw new Error(`the federation key for ${node.origin} changed since this wallet pinned it`);
    }
    await store.put(name, federation);
    history.replaceState(null, "", location.pathname);
  }
  return (await store.get(name)) || null;
}

/**
 * The witnesses whose cosignatures count for ``node``'s log: the members (other than the
 * custodian) of the newest roster version verified from ``federationKey``, as
 * {vkeys, version}. A roster older than the one this wallet saw last is refused, and so
 * is one that does not name the custodian under the log key this wallet pinned.
 */
export async function rosterWitnesses(node, federationKey) {
  const { checkpoint, raws } = await rosterLog();
  const newest = await verifyRosterLog(federationKey, checkpoint, raws);
  const seenName = `pin:${node.origin} roster-version`;
  const seen = (await store.get(seenName)) || 0;
  if (newest.version < seen) {
    throw new Error(
      `the hospital serves roster version ${newest.version}; this wallet saw ${seen}`,
    );
  }
  if (!newest.members.some((m) => m.origin === node.origin && m.vkey === node.own.vkey)) {
    throw new Error(`roster version ${newest.version} does not name this hospital's log key`);
  }
  await store.put(seenName, newest.version);
  const vkeys = newest.members.filter((m) => m.origin !== node.origin).map((m) => m.vkey);
  return { vkeys, version: newest.version };
}

/**
 * For the activity screen: the witness keys that count ({vkeys, note}). With no pinned
 * federation key, null (the custodian's own listing, as before); with one, the pinned
 * roster's members, or none at all if the roster the custodian serves does not verify.
 */
export async function federationWitnesses(node, federationKey) {
  if (!federationKey) return { vkeys: null, note: "" };
  try {
    const { vkeys, version } = await rosterWitnesses(node, federationKey);
    return { vkeys, note: ` Witnesses: members of the federation roster, version ${version}.` };
  } catch (error) {
    return { vkeys: [], note: ` The federation roster does not verify: ${error.message}.` };
  }
}

// The wallet's keys, kept in this browser's IndexedDB, locked at rest.
//
// The wallet seed (32 random bytes) is kept only inside the passphrase-sealed backup:
//
//   {"format": "imageshare-wallet-backup", "version": 1,
//    "kdf": "PBKDF2-SHA256", "iterations": 600000, "salt": b64(16),
//    "cipher": "AES-256-GCM", "iv": b64(12), "box": b64(AES-GCM(seed) with its tag)}
//
// with additional data "imageshare/wallet-backup/v1". That sealed box is also the lock:
// unlocking opens it with the passphrase and imports the seed as a non-extractable
// HMAC-SHA-512 key held in the page's memory only (script can derive with it but never
// read it back); locking, closing or reloading the page drops it. Nothing that can sign
// is ever written to storage: only the public key per custodian, to show it while locked.
// The key for a custodian is the Ed25519 key whose seed is HMAC-SHA512(wallet seed,
// "imageshare/patient-key/v1\n" + origin)[:32], exactly as the command-line wallet
// derives it (node/core/patient_keys.py), imported as a non-extractable signing key.
// A restore also takes the command-line wallet's unsealed seed.json
// ({"version": 1, "encryption": "none", "seed": b64}).
//
// A passkey may lock the same seed a second time, where the browser's platform
// authenticator has the WebAuthn PRF extension: the passkey's PRF output for a random
// salt, through HKDF-SHA256 (its own random salt, info "imageshare/wallet-passkey/v1"),
// is an AES-256-GCM key sealing the seed, with additional data "imageshare/wallet-passkey/v1":
//
//   wallet.passkey = {"credential": b64url(raw id), "prfSalt": b64(32),
//                     "hkdfSalt": b64(16), "iv": b64(12), "box": b64(AES-GCM(seed))}
//
// Nothing of it leaves the browser (no server checks the passkey: only its PRF output
// opens the box). The passphrase backup stays: it is the fallback and the backup file.

import { concat, fromBase64, randomBytes, toBase64, utf8, fromB64url, toB64url } from "./bytes.js";

const DB_NAME = "imageshare-wallet";
const STORE = "kv";
const DERIVATION_DOMAIN = "imageshare/patient-key/v1\n";
const BACKUP_AAD = utf8("imageshare/wallet-backup/v1");
const BACKUP_FORMAT = "imageshare-wallet-backup";
export const PBKDF2_ITERATIONS = 600000;
const MIN_PASSPHRASE = 8;
const PASSKEY_DOMAIN = utf8("imageshare/wallet-passkey/v1");
// PKCS#8 wrapping of a raw Ed25519 seed (RFC 8410).
const PKCS8_ED25519_PREFIX = Uint8Array.from([
  0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
]);

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function withStore(mode, action) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = action(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

export const store = {
  get: (key) => withStore("readonly", (s) => s.get(key)),
  put: (key, value) => withStore("readwrite", (s) => s.put(value, key)),
  // Keys cached by older versions, which kept signing keys in storage.
  forgetSigningKeys: () =>
    withStore("readwrite", (s) => {
      const request = s.getAllKeys();
      request.onsuccess = () => {
        for (const key of request.result) if (String(key).startsWith("key:")) s.delete(key);
      };
      return request;
    }),
  // A restore (and "forget this wallet on this device") forgets the wallet's keys and
  // tokens; log keys pinned per node (and the node's last description) are about the
  // nodes, so they stay.
  forgetWallet: () =>
    withStore("readwrite", (s) => {
      const request = s.getAllKeys();
      request.onsuccess = () => {
        for (const key of request.result) {
          if (!String(key).startsWith("pin:") && key !== "node") s.delete(key);
        }
      };
      return request;
    }),
};

/** The stored wallet, locked ({backup, created, backupSaved}), or undefined if this
 * browser has none. A wallet kept by an older version with its seed key in storage is
 * rewritten without it (the sealed backup holds the seed). */
export async function loadWallet() {
  const wallet = await store.get("wallet");
  if (wallet && wallet.seedKey) {
    const { seedKey: _dropped, ...locked } = wallet;
    await store.forgetSigningKeys();
    await store.put("wallet", { backupSaved: false, ...locked });
    return { backupSaved: false, ...locked };
  }
  return wallet;
}

async function seedKeyOf(seed) {
  const seedKey = await crypto.subtle.importKey(
    "raw",
    seed,
    { name: "HMAC", hash: "SHA-512" },
    false,
    ["sign"],
  );
  seed.fill(0);
  return seedKey;
}

async function saveSeed(seed, passphrase) {
  const backup = await sealSeed(seed, passphrase);
  const locked = { backup, created: Date.now(), backupSaved: false };
  await store.put("wallet", locked);
  return { ...locked, seedKey: await seedKeyOf(seed) };
}

/** The wallet unlocked with ``passphrase`` (its seed key in memory); throws "wrong
 * passphrase" otherwise. */
export async function unlockWallet(wallet, passphrase) {
  const seed = await openBackup(JSON.stringify(wallet.backup), passphrase);
  return { ...wallet, seedKey: await seedKeyOf(seed) };
}

/** Whether this browser can lock with a passkey: a platform authenticator that
 * verifies the user, and (where the browser says) the PRF extension. */
export async function passkeyAvailable() {
  if (!window.PublicKeyCredential || !window.isSecureContext) return false;
  if (PublicKeyCredential.getClientCapabilities) {
    const capabilities = await PublicKeyCredential.getClientCapabilities();
    if (capabilities["extension:prf"] === false) return false;
  }
  return PublicKeyCredential.isUserVerifyingPlatformAuthenticatorAvailable();
}

async function passkeyOutput(credential, prfSalt) {
  const assertion = await navigator.credentials.get({
    publicKey: {
      challenge: randomBytes(32),
      allowCredentials: [{ type: "public-key", id: credential }],
      userVerification: "required",
      extensions: { prf: { eval: { first: prfSalt } } },
    },
  });
  const prf = assertion && assertion.getClientExtensionResults().prf;
  if (!prf || !prf.results || !prf.results.first) {
    throw new Error("this passkey cannot unlock the wallet: use your passphrase");
  }
  return new Uint8Array(prf.results.first);
}

async function passkeyKey(output, hkdfSalt, usage) {
  const material = await crypto.subtle.importKey("raw", output, "HKDF", false, ["deriveKey"]);
  output.fill(0);
  return crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: hkdfSalt, info: PASSKEY_DOMAIN },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    [usage],
  );
}

/** Lock the wallet with a new passkey as well (the passphrase opens the seed to seal);
 * returns the wallet, still unlocked. Throws a sentence if the passkey has no PRF. */
export async function addPasskey(wallet, passphrase) {
  const seed = await openBackup(JSON.stringify(wallet.backup), passphrase);
  try {
    const passkey = await sealWithNewPasskey(seed);
    const { seedKey, ...locked } = wallet;
    await store.put("wallet", { ...locked, passkey });
    return { ...locked, passkey, seedKey };
  } finally {
    seed.fill(0);
  }
}

async function sealWithNewPasskey(seed) {
  const prfSalt = randomBytes(32);
  const created = await navigator.credentials.create({
    publicKey: {
      rp: { name: "ImageShare wallet" },
      user: { id: randomBytes(16), name: "ImageShare wallet", displayName: "ImageShare wallet" },
      challenge: randomBytes(32),
      pubKeyCredParams: [
        { type: "public-key", alg: -8 },
        { type: "public-key", alg: -7 },
        { type: "public-key", alg: -257 },
      ],
      authenticatorSelection: { authenticatorAttachment: "platform", userVerification: "required" },
      extensions: { prf: { eval: { first: prfSalt } } },
    },
  });
  const prf = created && created.getClientExtensionResults().prf;
  if (!prf || !(prf.enabled || prf.results)) {
    throw new Error("this phone's passkeys cannot lock the wallet: keep using your passphrase");
  }
  const credential = new Uint8Array(created.rawId);
  // Some authenticators give the PRF output only when the passkey is used: ask once more.
  const output = prf.results && prf.results.first
    ? new Uint8Array(prf.results.first)
    : await passkeyOutput(credential, prfSalt);
  const hkdfSalt = randomBytes(16);
  const iv = randomBytes(12);
  const key = await passkeyKey(output, hkdfSalt, "encrypt");
  const box = await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: PASSKEY_DOMAIN }, key, seed);
  return {
    credential: toB64url(credential),
    prfSalt: toBase64(prfSalt),
    hkdfSalt: toBase64(hkdfSalt),
    iv: toBase64(iv),
    box: toBase64(new Uint8Array(box)),
  };
}

/** The wallet unlocked with its passkey; throws a sentence (use the passphrase) else. */
export async function unlockWithPasskey(wallet) {
  const { credential, prfSalt, hkdfSalt, iv, box } = wallet.passkey;
  const output = await passkeyOutput(fromB64url(credential), fromBase64(prfSalt));
  const key = await passkeyKey(output, fromBase64(hkdfSalt), "decrypt");
  let seed;
  try {
    seed = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: fromBase64(iv), additionalData: PASSKEY_DOMAIN },
      key,
      fromBase64(box),
    );
  } catch {
    throw new Error("this passkey does not open this wallet: use your passphrase");
  }
  return { ...wallet, seedKey: await seedKeyOf(seedOfLength(new Uint8Array(seed))) };
}

/** Note that the patient has saved the backup (ends the reminder). */
export async function markBackupSaved(wallet) {
  const { seedKey: _memoryOnly, ...locked } = wallet;
  await store.put("wallet", { ...locked, backupSaved: true });
  return { ...wallet, backupSaved: true };
}

/** My public key at ``origin`` as last derived here (shown while locked), or undefined. */
export function publicKeyText(origin) {
  return store.get("public:" + origin);
}

function checkPassphrase(passphrase) {
  if (typeof passphrase !== "string" || passphrase.length < MIN_PASSPHRASE) {
    throw new Error(`choose a passphrase of at least ${MIN_PASSPHRASE} characters`);
  }
}

/** A new wallet: a fresh seed, sealed into a backup with ``passphrase``. */
export async function createWallet(passphrase) {
  checkPassphrase(passphrase);
  return saveSeed(randomBytes(32), passphrase);
}

async function backupKey(passphrase, salt, iterations, usage) {
  const material = await crypto.subtle.importKey("raw", utf8(passphrase), "PBKDF2", false, [
    "deriveKey",
  ]);
  return crypto.subtle.deriveKey(
    { name: "PBKDF2", hash: "SHA-256", salt, iterations },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    [usage],
  );
}

async function sealSeed(seed, passphrase) {
  const salt = randomBytes(16);
  const iv = randomBytes(12);
  const key = await backupKey(passphrase, salt, PBKDF2_ITERATIONS, "encrypt");
  const box = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: BACKUP_AAD },
    key,
    seed,
  );
  return {
    format: BACKUP_FORMAT,
    version: 1,
    kdf: "PBKDF2-SHA256",
    iterations: PBKDF2_ITERATIONS,
    salt: toBase64(salt),
    cipher: "AES-256-GCM",
    iv: toBase64(iv),
    box: toBase64(new Uint8Array(box)),
  };
}

/** The seed in a backup file's text; throws a sentence the patient can act on. */
export async function openBackup(text, passphrase) {
  let doc;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new Error("that file is not a wallet backup");
  }
  if (doc && doc.version === 1 && doc.encryption === "none" && typeof doc.seed === "string") {
    return seedOfLength(fromBase64(doc.seed));
  }
  if (doc && doc.encryption === "argon2id-secretbox") {
    throw new Error("a passphrase-sealed command-line wallet cannot be opened in the browser");
  }
  if (
    !doc ||
    doc.format !== BACKUP_FORMAT ||
    doc.version !== 1 ||
    doc.kdf !== "PBKDF2-SHA256" ||
    doc.cipher !== "AES-256-GCM" ||
    !Number.isSafeInteger(doc.iterations) ||
    doc.iterations < 100000 ||
    doc.iterations > 10000000
  ) {
    throw new Error("that file is not a wallet backup");
  }
  const key = await backupKey(passphrase, fromBase64(doc.salt), doc.iterations, "decrypt");
  let seed;
  try {
    seed = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: fromBase64(doc.iv), additionalData: BACKUP_AAD },
      key,
      fromBase64(doc.box),
    );
  } catch {
    throw new Error("wrong passphrase, or the backup was altered");
  }
  return seedOfLength(new Uint8Array(seed));
}

function seedOfLength(seed) {
  if (seed.length !== 32) throw new Error("a wallet seed is 32 bytes");
  return seed;
}

/** Replace this browser's wallet by the one in a backup; re-sealed with ``passphrase``. */
export async function restoreWallet(text, passphrase) {
  checkPassphrase(passphrase);
  const seed = await openBackup(text, passphrase);
  await store.forgetWallet();
  return saveSeed(seed, passphrase);
}

/** My key for one custodian origin, from an unlocked wallet: {origin, publicKey
 * (bytes), publicText, signKey}, kept in memory only. */
export async function keyFor(wallet, origin) {
  if (!wallet.seedKey) throw new Error("unlock the wallet first");
  const mac = await crypto.subtle.sign("HMAC", wallet.seedKey, utf8(DERIVATION_DOMAIN + origin));
  const seed = new Uint8Array(mac).slice(0, 32);
  const pkcs8 = concat(PKCS8_ED25519_PREFIX, seed);
  // Imported once as extractable only to read the public half; the kept key is not.
  const open = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, true, ["sign"]);
  const publicKey = fromB64url((await crypto.subtle.exportKey("jwk", open)).x);
  const signKey = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, [
    "sign",
  ]);
  seed.fill(0);
  pkcs8.fill(0);
  const key = { origin, publicKey, publicText: toB64url(publicKey), signKey };
  await store.put("public:" + origin, key.publicText);
  return key;
}

export async function sign(key, message) {
  return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key.signKey, message));
}

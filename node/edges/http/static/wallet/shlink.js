// Share links (SMART Health Links), made in the browser as node/services/wallet.py makes
// them (docs/share-links.md): a grant to "link:" + base64url(SHA-256(access token)), the
// manifest's files encrypted here under a fresh link key (compact JWE, alg dir,
// enc A256GCM, the protected header as additional data), and the link
// "shlink:/" + base64url(JSON {url, key, exp, flag, label, v}). The key never leaves the
// page except inside the link the patient hands over.

import { randomBytes, sha256, toB64url, utf8 } from "./bytes.js";

export const FHIR_JSON = "application/fhir+json";
export const ACCESS_CREDENTIAL = "application/smart-api-access";

/** A compact JWE of ``content`` (JSON) under the 32-byte link key. */
export async function encryptFile(linkKey, contentType, content) {
  const header = toB64url(utf8(JSON.stringify({ alg: "dir", enc: "A256GCM", cty: contentType })));
  const iv = randomBytes(12);
  const key = await crypto.subtle.importKey("raw", linkKey, "AES-GCM", false, ["encrypt"]);
  const sealed = new Uint8Array(
    await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: utf8(header), tagLength: 128 },
      key,
      utf8(JSON.stringify(content)),
    ),
  );
  const ciphertext = sealed.subarray(0, sealed.length - 16);
  const tag = sealed.subarray(sealed.length - 16);
  return [header, "", toB64url(iv), toB64url(ciphertext), toB64url(tag)].join(".");
}

/** The grantee a link's grant names: "link:" + base64url of its access token's SHA-256. */
export async function linkGrantee(accessToken) {
  return "link:" + toB64url(await sha256(utf8(accessToken)));
}

export async function secretDigest(secret) {
  return toB64url(await sha256(utf8(secret)));
}

/** The custodian's ImagingStudy with its WADO-RS Endpoint pointed at the link's root. */
export function withEndpoint(study, root) {
  const endpoints = (study.contained || []).filter(
    (c) => c.resourceType === "Endpoint" && c.id === "wado",
  );
  if (endpoints.length !== 1) throw new Error("the study description has no WADO-RS endpoint");
  endpoints[0].address = root;
  return study;
}

export function accessCredential(accessToken, root, lifetime) {
  return {
    access_token: accessToken,
    token_type: "bearer",
    expires_in: lifetime,
    scope: "dicomweb.read",
    aud: root,
  };
}

export function encodeShlink({ url, key, exp, passcode, label }) {
  const payload = { url, key: toB64url(key), exp };
  if (passcode) payload.flag = "P";
  if (label) payload.label = label;
  payload.v = 1;
  return "shlink:/" + toB64url(utf8(JSON.stringify(payload)));
}

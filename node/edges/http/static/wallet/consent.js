// Grant and revocation tokens, byte for byte as node/core/consent.py makes them:
//   grant      = [1, patient_key, custodian, grantee, scope|nil, not_before, expires,
//                 nonce(16), signature]   signed over "imageshare/grant/v1\n" + fields
//   a link's grant with permissions is version 3: [3, ...the same..., nonce, permissions,
//                 signature], permissions sorted and distinct (e.g. ["opinions"])
//   revocation = [1, patient_key, token_id, revoked_at, signature]
//                                          signed over "imageshare/revoke/v1\n" + fields
// Token id = SHA-256 of the signed token; text = base64url; URL = imageshare:grant?t=...

import { concat, randomBytes, sha256, toB64url, utf8 } from "./bytes.js";
import { sign } from "./keys.js";
import { encode } from "./msgpack.js";

const GRANT_DOMAIN = utf8("imageshare/grant/v1\n");
const REVOKE_DOMAIN = utf8("imageshare/revoke/v1\n");
export const URL_PREFIX = "imageshare:grant?t=";

export const OPINIONS = "opinions"; // a link's holder may return an opinion

/**
 * Signed grant bytes; ``scope`` is null (all my studies there) or study references;
 * ``permissions`` (a link's only) what its holder may do besides reading.
 */
export async function makeGrant(key, custodian, grantee, scope, notBefore, expires, permissions = []) {
  const version = permissions.length ? 3 : 1;
  const fields = [version, key.publicKey, custodian, grantee, scope, notBefore, expires, randomBytes(16)];
  if (permissions.length) fields.push([...new Set(permissions)].sort());
  const signature = await sign(key, concat(GRANT_DOMAIN, encode(fields)));
  return encode([...fields, signature]);
}

export async function makeRevocation(key, tokenId, revokedAt) {
  const fields = [1, key.publicKey, tokenId, revokedAt];
  const signature = await sign(key, concat(REVOKE_DOMAIN, encode(fields)));
  return encode([...fields, signature]);
}

export function tokenId(tokenBytes) {
  return sha256(tokenBytes);
}

export function tokenUrl(tokenBytes) {
  return URL_PREFIX + toB64url(tokenBytes);
}

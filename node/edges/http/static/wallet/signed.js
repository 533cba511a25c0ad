// Signed requests to the node's /patient endpoints (node/core/signed_requests.py): the
// patient's key signs the custodian's origin (the audience: good at no other node),
// method, path, sorted query, body digest, time and a fresh nonce.

import { randomBytes, sha256, toB64url, toHex, utf8 } from "./bytes.js";
import { sign } from "./keys.js";

export class RequestFailed extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function canonicalQuery(query) {
  return query
    .split("&")
    .filter((part) => part)
    .sort()
    .join("&");
}

/** The signature headers for ``method pathAndQuery`` with ``body``, addressed to the
 * custodian the key is for (``key.origin``, the origin this wallet pinned). */
export async function signatureHeaders(key, method, pathAndQuery, body) {
  const [path, query = ""] = pathAndQuery.split(/\?(.*)/s);
  const signer = "patient:" + key.publicText;
  const timestamp = String(Math.floor(Date.now() / 1000));
  const nonce = toB64url(randomBytes(16));
  const audience = key.origin;
  const message = [
    "imageshare-request/v2",
    audience,
    method.toUpperCase(),
    path,
    canonicalQuery(query),
    toHex(await sha256(body)),
    timestamp,
    nonce,
    signer,
  ].join("\n");
  return {
    "Signature-Signer": signer,
    "Signature-Audience": audience,
    "Signature-Timestamp": timestamp,
    "Signature-Nonce": nonce,
    Signature: toB64url(await sign(key, utf8(message))),
  };
}

/** A signed request to this node; returns the Response, throws RequestFailed on 4xx/5xx. */
export async function signedFetch(key, method, pathAndQuery, body = new Uint8Array()) {
  const headers = await signatureHeaders(key, method, pathAndQuery, body);
  if (method === "POST") headers["Content-Type"] = "application/octet-stream";
  const response = await fetch(pathAndQuery, {
    method,
    headers,
    body: method === "POST" ? body : undefined,
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) {
    let message = `the node answered ${response.status}`;
    try {
      message = (await response.json()).error || message;
    } catch {
      // not JSON: keep the status line
    }
    throw new RequestFailed(response.status, message);
  }
  return response;
}

export async function signedJson(key, method, pathAndQuery, body) {
  return (await signedFetch(key, method, pathAndQuery, body)).json();
}

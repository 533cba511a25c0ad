// Canonical msgpack, the node's one encoding (node/core/encoding.py): nil, bool, int,
// str, bin, array and map (string keys); the smallest header that fits; map keys sorted
// by their encoded bytes; at most 32 levels deep. decode() accepts only the canonical
// encoding of a value (it re-encodes what it read and compares), so one value has one
// byte string and one hash. Integers are JavaScript numbers: safe integers only.

import { concat, equal, fromUtf8, utf8 } from "./bytes.js";

const MAX_DEPTH = 32;

function header(length, fix, tag8, tag16, tag32) {
  if (fix !== null && length <= fix[1]) return [fix[0] | length];
  if (tag8 !== null && length <= 0xff) return [tag8, length];
  if (length <= 0xffff) return [tag16, length >> 8, length & 0xff];
  if (length <= 0xffffffff) return [tag32, ...be(length, 4)];
  throw new Error("value too long for msgpack");
}

function be(value, size) {
  const out = [];
  for (let i = size - 1; i >= 0; i--) out.push(Math.floor(value / 2 ** (8 * i)) & 0xff);
  return out;
}

function encodeInt(value) {
  if (!Number.isSafeInteger(value)) throw new Error("only safe integers are encoded");
  if (value >= 0) {
    if (value <= 0x7f) return [value];
    if (value <= 0xff) return [0xcc, value];
    if (value <= 0xffff) return [0xcd, ...be(value, 2)];
    if (value <= 0xffffffff) return [0xce, ...be(value, 4)];
    return [0xcf, ...be(value, 8)];
  }
  if (value >= -32) return [value & 0xff];
  const twos = (size) => be(2 ** (8 * size) + value, size);
  if (value >= -(2 ** 7)) return [0xd0, ...twos(1)];
  if (value >= -(2 ** 15)) return [0xd1, ...twos(2)];
  if (value >= -(2 ** 31)) return [0xd2, ...twos(4)];
  throw new Error("negative integer too large");
}

function encodeInto(value, out, depth) {
  if (depth > MAX_DEPTH) throw new Error("value nested too deep");
  if (value === null || value === undefined) out.push(Uint8Array.of(0xc0));
  else if (value === true) out.push(Uint8Array.of(0xc3));
  else if (value === false) out.push(Uint8Array.of(0xc2));
  else if (typeof value === "number") out.push(Uint8Array.from(encodeInt(value)));
  else if (typeof value === "string") {
    const raw = utf8(value);
    out.push(Uint8Array.from(header(raw.length, [0xa0, 31], 0xd9, 0xda, 0xdb)), raw);
  } else if (value instanceof Uint8Array) {
    out.push(Uint8Array.from(header(value.length, null, 0xc4, 0xc5, 0xc6)), value);
  } else if (Array.isArray(value)) {
    out.push(Uint8Array.from(header(value.length, [0x90, 15], null, 0xdc, 0xdd)));
    for (const item of value) encodeInto(item, out, depth + 1);
  } else if (typeof value === "object") {
    const items = Object.keys(value).map((key) => [encode(key), value[key]]);
    items.sort((a, b) => compareBytes(a[0], b[0]));
    out.push(Uint8Array.from(header(items.length, [0x80, 15], null, 0xde, 0xdf)));
    for (const [key, item] of items) {
      out.push(key);
      encodeInto(item, out, depth + 1);
    }
  } else throw new Error(`canonical msgpack cannot hold a ${typeof value}`);
}

function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

export function encode(value) {
  const out = [];
  encodeInto(value, out, 0);
  return concat(...out);
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.pos = 0;
  }
  take(n) {
    if (this.pos + n > this.bytes.length) throw new Error("truncated msgpack");
    const part = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return part;
  }
  uint(n) {
    let value = 0;
    for (const b of this.take(n)) value = value * 256 + b;
    if (!Number.isSafeInteger(value)) throw new Error("integer beyond 2^53");
    return value;
  }
  int(n) {
    const value = this.uint(n);
    return value >= 2 ** (8 * n - 1) ? value - 2 ** (8 * n) : value;
  }
}

function read(r, depth) {
  if (depth > MAX_DEPTH) throw new Error("msgpack nested too deep");
  const tag = r.uint(1);
  if (tag <= 0x7f) return tag;
  if (tag >= 0xe0) return tag - 0x100;
  if ((tag & 0xe0) === 0xa0) return fromUtf8(r.take(tag & 0x1f));
  if ((tag & 0xf0) === 0x90) return readArray(r, tag & 0x0f, depth);
  if ((tag & 0xf0) === 0x80) return readMap(r, tag & 0x0f, depth);
  switch (tag) {
    case 0xc0:
      return null;
    case 0xc2:
      return false;
    case 0xc3:
      return true;
    case 0xc4:
      return r.take(r.uint(1)).slice();
    case 0xc5:
      return r.take(r.uint(2)).slice();
    case 0xc6:
      return r.take(r.uint(4)).slice();
    case 0xcc:
      return r.uint(1);
    case 0xcd:
      return r.uint(2);
    case 0xce:
      return r.uint(4);
    case 0xcf:
      return r.uint(8);
    case 0xd0:
      return r.int(1);
    case 0xd1:
      return r.int(2);
    case 0xd2:
      return r.int(4);
    case 0xd9:
      return fromUtf8(r.take(r.uint(1)));
    case 0xda:
      return fromUtf8(r.take(r.uint(2)));
    case 0xdb:
      return fromUtf8(r.take(r.uint(4)));
    case 0xdc:
      return readArray(r, r.uint(2), depth);
    case 0xdd:
      return readArray(r, r.uint(4), depth);
    case 0xde:
      return readMap(r, r.uint(2), depth);
    case 0xdf:
      return readMap(r, r.uint(4), depth);
    default:
      throw new Error(`msgpack type 0x${tag.toString(16)} is not allowed`);
  }
}

function readArray(r, length, depth) {
  if (length > r.bytes.length - r.pos) throw new Error("truncated msgpack");
  const items = [];
  for (let i = 0; i < length; i++) items.push(read(r, depth + 1));
  return items;
}

function readMap(r, length, depth) {
  if (length > r.bytes.length - r.pos) throw new Error("truncated msgpack");
  const map = Object.create(null);
  for (let i = 0; i < length; i++) {
    const key = read(r, depth + 1);
    if (typeof key !== "string") throw new Error("map keys must be strings");
    map[key] = read(r, depth + 1);
  }
  return map;
}

/** Decode canonical msgpack; throws on anything that is not exactly one canonical value. */
export function decode(bytes) {
  const r = new Reader(bytes);
  const value = read(r, 0);
  if (r.pos !== bytes.length) throw new Error("trailing bytes after the msgpack value");
  if (!equal(encode(value), bytes)) throw new Error("msgpack is not in canonical form");
  return value;
}

// The wallet's service worker: the app shell (its own files only; a new screen module is
// added to SHELL) is kept for use with no network. A kept file is answered at once and
// refreshed in the background, so an updated node's wallet shows from the next start;
// /patient and /ledger requests are never touched or cached here.

const CACHE = "imageshare-wallet-v9";
const SHELL = [
  "./",
  "app.js",
  "shell.js",
  "session.js",
  "screen-setup.js",
  "screen-key.js",
  "screen-studies.js",
  "screen-share.js",
  "screen-tokens.js",
  "screen-activity.js",
  "app.css",
  "bytes.js",
  "msgpack.js",
  "keys.js",
  "signed.js",
  "consent.js",
  "shlink.js",
  "ledger.js",
  "roster.js",
  "proof.js",
  "qr.js",
  "reports.js",
  "reports.css",
  "safety.js",
  "manifest.webmanifest",
  "icon.svg",
];

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(SHELL))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (!url.pathname.startsWith("/wallet/")) return;
  event.respondWith(
    caches.open(CACHE).then(async (cache) => {
      // Module scripts are requested with an Origin header, and the node's CORS answer
      // varies by Origin: the kept copy is the same file whatever the Origin.
      const cached = await cache.match(event.request, { ignoreVary: true });
      const fresh = fetch(event.request).then((response) => {
        if (response.ok) cache.put(event.request, response.clone());
        return response;
      });
      if (!cached) return fresh;
      fresh.catch(() => {}); // offline: the kept copy is the answer
      return cached;
    }),
  );
});

// Node.js stand-in for the EdgeWorkers `crypto` module, which exports `crypto` (Web Crypto:
// getRandomValues, randomUUID, subtle). Node 20 has the same object as `globalThis.crypto`.

export const crypto = globalThis.crypto;

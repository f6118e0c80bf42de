// Node.js stand-in for the EdgeWorkers `http-request` module: `httpRequest(url, options)`
// with the options EdgeWorkers takes (method, headers as name -> string | string[], body as a
// string, timeout in milliseconds) and a response shaped like EdgeWorkers' one: `status`,
// `ok`, `getHeader(name)` (an array of values, or undefined), `getHeaders()`, `text()`,
// `json()`. Built on node:https so NODE_EXTRA_CA_CERTS (a test CA) is honoured.

import https from 'node:https';
import http from 'node:http';

// EdgeWorkers' own default when no timeout is given is the sub-request wall-time limit.
const DEFAULT_TIMEOUT_MS = 4000;

class Response {
  constructor(status, headers, body) {
    this.status = status;
    this.ok = status >= 200 && status < 300;
    this._headers = headers;
    this._body = body;
  }

  getHeader(name) {
    const v = this._headers[String(name).toLowerCase()];
    if (v === undefined) return undefined;
    return Array.isArray(v) ? v.slice() : [String(v)];
  }

  getHeaders() {
    const out = {};
    for (const [k, v] of Object.entries(this._headers)) out[k] = Array.isArray(v) ? v : [String(v)];
    return out;
  }

  async text() {
    return this._body.toString('utf8');
  }

  async json() {
    return JSON.parse(this._body.toString('utf8'));
  }
}

export function httpRequest(url, options = {}) {
  const target = new URL(url);
  const client = target.protocol === 'https:' ? https : http;
  const headers = {};
  for (const [k, v] of Object.entries(options.headers ?? {})) headers[k] = v;
  const body = options.body === undefined ? undefined : Buffer.from(String(options.body));
  if (body !== undefined) headers['Content-Length'] = String(body.length);
  const timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    const req = client.request(target, { method: options.method ?? 'GET', headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        clearTimeout(timer);
        resolve(new Response(res.statusCode, res.headers, Buffer.concat(chunks)));
      });
      res.on('error', reject);
    });
    // One deadline for the whole exchange, as EdgeWorkers applies it.
    const timer = setTimeout(() => {
      req.destroy(new Error(`sub-request timed out after ${timeout} ms`));
    }, timeout);
    req.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    req.end(body);
  });
}

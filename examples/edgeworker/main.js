// edgerelay EdgeWorker: publishes one small JSON event per client request to an edgerelay
// relay (`POST https://<relay>/v1/publish/<subject>`), then lets the request go on untouched.
//
// Property variables (Property Manager, user-defined, names must be exactly these):
//   PMUSER_EDGERELAY_HOST            relay hostname served through Akamai (HTTPS), e.g.
//                                    relay-fra1.example.com
//   PMUSER_EDGERELAY_TOKEN           bearer token (mark the variable "sensitive")
//   PMUSER_EDGERELAY_SUBJECT_PREFIX  subject prefix, e.g. edge.web (default "edge.ew")
//   PMUSER_EDGERELAY_REQUEST_ID      optional: the request's Global Request Number (behavior
//                                    "Global Request Number", option "Assign to a variable");
//                                    used as the Idempotency-Key so a re-run is deduplicated
//   PMUSER_EDGERELAY_TIMEOUT_MS      optional: per-attempt timeout (default 1000)
//   PMUSER_EDGERELAY_BUDGET_MS       optional: total time this handler may spend (default 2500)
// Output variable (for logging in the property, and for the Node.js test runner):
//   PMUSER_EDGERELAY_RESULT          {"status":202,"attempts":1,"duplicate":false,"seq":7}
//
// Limits this stays inside (DESIGN.md "Known pitfalls", Akamai's resource tier limits):
// at most 2 sub-requests per handler (one attempt and at most one retry), each with a timeout,
// the whole handler within a wall-time budget, a body well under 1 KiB, and a failure never
// breaks the client's request: it is logged and the request continues.

import { httpRequest } from 'http-request';
import { logger } from 'log';
import { crypto } from 'crypto';

const DEFAULT_PREFIX = 'edge.ew';
const DEFAULT_TIMEOUT_MS = 1000;
const DEFAULT_BUDGET_MS = 2500;
const MAX_TOKEN_LEN = 64;
const MAX_PATH_LEN = 256;
const MAX_KEY_LEN = 128;
// The relay's retryable refusals: rate limited, queue full / NATS unreachable, ack timeout.
const RETRYABLE = new Set([429, 503, 504]);

/** One NATS subject token: only [A-Za-z0-9_-], bounded, never empty. */
export function sanitizeToken(s) {
  const t = String(s ?? '').replace(/[^A-Za-z0-9_-]/g, '_').slice(0, MAX_TOKEN_LEN);
  return t === '' ? '_' : t;
}

/** A subject prefix: each dot-separated token sanitized, empty tokens dropped. */
export function sanitizeSubject(s) {
  const tokens = String(s ?? '').split('.').filter((t) => t !== '').map(sanitizeToken);
  return tokens.length ? tokens.join('.') : DEFAULT_PREFIX;
}

function variable(request, name) {
  try {
    const v = request.getVariable(name);
    return v === undefined || v === null || v === '' ? undefined : String(v);
  } catch (e) {
    return undefined;
  }
}

function positiveInt(s, fallback) {
  const n = Number.parseInt(s ?? '', 10);
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

/** The Idempotency-Key: the request's Global Request Number if the property passes one in,
 *  else a random one (which still makes our own single retry idempotent). */
function idempotencyKey(request) {
  const rid = variable(request, 'PMUSER_EDGERELAY_REQUEST_ID');
  if (rid !== undefined) {
    // Printable ASCII only, bounded: the relay refuses anything else with a 400.
    const clean = rid.replace(/[^\x21-\x7e]/g, '_').slice(0, MAX_KEY_LEN);
    if (clean !== '') return clean;
  }
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return 'ew-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Seconds of a Retry-After header (delta-seconds form only), or undefined. */
function retryAfterMs(response) {
  const values = response.getHeader('Retry-After');
  const v = Array.isArray(values) ? values[0] : values;
  const n = Number.parseInt(v ?? '', 10);
  return Number.isFinite(n) && n >= 0 ? n * 1000 : undefined;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function record(request, result) {
  try {
    request.setVariable('PMUSER_EDGERELAY_RESULT', JSON.stringify(result));
  } catch (e) {
    // The variable is optional in the property; not having it is not an error.
  }
}

/** Publishes one event for `request`; never throws. Returns what the relay answered. */
export async function publishRequestEvent(request) {
  const started = Date.now();
  const host = variable(request, 'PMUSER_EDGERELAY_HOST');
  const token = variable(request, 'PMUSER_EDGERELAY_TOKEN');
  if (host === undefined || token === undefined) {
    logger.log('edgerelay: PMUSER_EDGERELAY_HOST or PMUSER_EDGERELAY_TOKEN not set; skipped');
    return { status: 0, attempts: 0, error: 'not_configured' };
  }
  const timeoutMs = positiveInt(variable(request, 'PMUSER_EDGERELAY_TIMEOUT_MS'), DEFAULT_TIMEOUT_MS);
  const budgetMs = positiveInt(variable(request, 'PMUSER_EDGERELAY_BUDGET_MS'), DEFAULT_BUDGET_MS);
  const prefix = sanitizeSubject(variable(request, 'PMUSER_EDGERELAY_SUBJECT_PREFIX') ?? DEFAULT_PREFIX);
  const subject = `${prefix}.${sanitizeToken(request.host)}`;
  const event = {
    method: request.method,
    path: String(request.path ?? '').slice(0, MAX_PATH_LEN),
    country: request.userLocation?.country ?? '',
    edge_ts: started,
  };
  const options = {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${token}`,
      'Content-Type': 'application/json',
      'Idempotency-Key': idempotencyKey(request),
      'Edge-Timestamp': String(started),
    },
    body: JSON.stringify(event),
    timeout: timeoutMs,
  };
  const url = `https://${host}/v1/publish/${subject}`;

  let result = { status: 0, attempts: 0 };
  for (let attempt = 1; attempt <= 2; attempt++) {
    result = { status: 0, attempts: attempt };
    let wait = 0;
    try {
      const response = await httpRequest(url, options);
      result.status = response.status;
      let body;
      try {
        body = await response.json();
      } catch (e) {
        body = undefined;
      }
      if (response.status === 202) {
        result.duplicate = body?.duplicate === true;
        result.seq = body?.seq;
        return result;
      }
      result.error = body?.error?.code ?? `http_${response.status}`;
      if (!RETRYABLE.has(response.status)) break;
      wait = retryAfterMs(response) ?? 0;
    } catch (e) {
      // Timeout or connection failure: the event may or may not be stored; a retry with the
      // same Idempotency-Key is safe.
      result.error = String(e?.message ?? e).slice(0, 120);
    }
    const left = budgetMs - (Date.now() - started);
    if (attempt === 2 || wait + timeoutMs > left) break;
    if (wait > 0) {
      if (typeof setTimeout !== 'function') break;
      await sleep(wait);
    }
  }
  logger.log(`edgerelay: publish to ${subject} failed: ${result.status} ${result.error} after ${result.attempts} attempt(s)`);
  return result;
}

/** Runs before the cache lookup for every client request. Publishing here (not in
 *  responseProvider) leaves content delivery to the property; see README.md. */
export async function onClientRequest(request) {
  try {
    record(request, await publishRequestEvent(request));
  } catch (e) {
    // Never let the relay break the client's request.
    logger.log(`edgerelay: unexpected error: ${e}`);
  }
}

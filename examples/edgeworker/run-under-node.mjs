// Runs main.js's onClientRequest under Node.js with the shim of the EdgeWorkers modules:
//
//   node --import ./shim/register.mjs run-under-node.mjs
//
// Environment (the property variables of a real deployment):
//   EDGERELAY_HOST            host[:port] of the relay (required)
//   EDGERELAY_TOKEN           bearer token (required)
//   EDGERELAY_SUBJECT_PREFIX  subject prefix (default: main.js's)
//   EDGERELAY_TIMEOUT_MS, EDGERELAY_BUDGET_MS   optional, as PMUSER_EDGERELAY_*
//   EW_CALLS                  how many requests to simulate (default 1)
//   EW_REQUEST_ID_PREFIX      request i gets PMUSER_EDGERELAY_REQUEST_ID = prefix + i;
//                             unset: no request id (main.js picks a random key)
//   EW_HOST, EW_PATH, EW_METHOD, EW_COUNTRY   the simulated client request
// Set NODE_EXTRA_CA_CERTS to the relay's CA when it uses a private one.
//
// Prints one JSON line per call: {"call","request_id","result","threw","ms"} where `result`
// is what the handler stored in PMUSER_EDGERELAY_RESULT (what the relay answered).

import { onClientRequest } from './main.js';

const env = process.env;
for (const name of ['EDGERELAY_HOST', 'EDGERELAY_TOKEN']) {
  if (!env[name]) {
    process.stderr.write(`run-under-node: ${name} is required\n`);
    process.exit(64);
  }
}
const calls = Number.parseInt(env.EW_CALLS ?? '1', 10);

/** A fake EdgeWorkers Request object with the members main.js uses. */
function fakeRequest(i) {
  const vars = {
    PMUSER_EDGERELAY_HOST: env.EDGERELAY_HOST,
    PMUSER_EDGERELAY_TOKEN: env.EDGERELAY_TOKEN,
    PMUSER_EDGERELAY_SUBJECT_PREFIX: env.EDGERELAY_SUBJECT_PREFIX,
    PMUSER_EDGERELAY_TIMEOUT_MS: env.EDGERELAY_TIMEOUT_MS,
    PMUSER_EDGERELAY_BUDGET_MS: env.EDGERELAY_BUDGET_MS,
    PMUSER_EDGERELAY_REQUEST_ID:
      env.EW_REQUEST_ID_PREFIX === undefined ? undefined : `${env.EW_REQUEST_ID_PREFIX}${i}`,
  };
  const host = env.EW_HOST ?? 'www.example.com';
  const path = env.EW_PATH ?? `/index.html`;
  const headers = { host: [host], 'user-agent': ['run-under-node'] };
  return {
    host,
    method: env.EW_METHOD ?? 'GET',
    path,
    query: '',
    scheme: 'https',
    url: `${path}`,
    clientIp: '192.0.2.1',
    userLocation: { country: env.EW_COUNTRY ?? 'DE', continent: 'EU', city: 'FRANKFURT' },
    getVariable: (name) => vars[name],
    setVariable: (name, value) => {
      if (!name.startsWith('PMUSER_')) throw new Error(`setVariable: ${name} is not PMUSER_`);
      vars[name] = String(value);
    },
    getHeader: (name) => headers[String(name).toLowerCase()],
    getHeaders: () => headers,
    vars,
  };
}

for (let i = 0; i < calls; i++) {
  const request = fakeRequest(i);
  const started = Date.now();
  let threw = null;
  try {
    await onClientRequest(request);
  } catch (e) {
    threw = String(e?.stack ?? e);
  }
  const raw = request.vars.PMUSER_EDGERELAY_RESULT;
  process.stdout.write(
    JSON.stringify({
      call: i,
      request_id: request.vars.PMUSER_EDGERELAY_REQUEST_ID ?? null,
      result: raw === undefined ? null : JSON.parse(raw),
      threw,
      ms: Date.now() - started,
    }) + '\n',
  );
}

// Node.js stand-in for the EdgeWorkers `create-response` module: `createResponse(status,
// headers, body, denyReason)` (or the one-object form) returns a plain object the runner can
// inspect. The example's onClientRequest does not answer the client itself; this is here for
// a responseProvider variant and for tests of other handlers.

export function createResponse(status, headers, body, denyReason) {
  if (typeof status === 'object' && status !== null) {
    return { status: 200, headers: {}, body: '', ...status };
  }
  return { status, headers: headers ?? {}, body: body ?? '', denyReason };
}

// Module resolve hook: maps the EdgeWorkers built-in module names to the files of this shim,
// for imports from the example (not from Node itself or from the shim).

const SHIM = {
  'http-request': 'http-request.js',
  'create-response': 'create-response.js',
  log: 'log.js',
  crypto: 'crypto.js',
};
const shimDir = new URL('./', import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  const parent = context.parentURL ?? '';
  if (Object.hasOwn(SHIM, specifier) && parent.startsWith('file:') && !parent.startsWith(shimDir)) {
    return { url: new URL(SHIM[specifier], import.meta.url).href, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}

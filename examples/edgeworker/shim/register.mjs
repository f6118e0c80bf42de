// `node --import ./shim/register.mjs …`: installs the resolve hook (Node ≥ 20.6, no npm
// dependencies) so `import { httpRequest } from 'http-request'` loads shim/http-request.js.

import { register } from 'node:module';

register('./hooks.mjs', import.meta.url);

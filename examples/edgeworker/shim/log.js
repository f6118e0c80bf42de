// Node.js stand-in for the EdgeWorkers `log` module: `logger.log(...)` and friends write to
// stderr (the runner keeps stdout for its JSON lines).

function write(level, args) {
  process.stderr.write(`[ew ${level}] ${args.map(String).join(' ')}\n`);
}

export const logger = {
  log: (...args) => write('log', args),
  trace: (...args) => write('trace', args),
  debug: (...args) => write('debug', args),
  info: (...args) => write('info', args),
  warn: (...args) => write('warn', args),
  error: (...args) => write('error', args),
};

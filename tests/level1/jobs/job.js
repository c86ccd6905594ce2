'use strict';
// The command a test script runs: what it does is fixed by its kind, its run number and how many
// times this run has tried (a counter file per run under $JOB_STATE), so a log is reproducible.
const fs = require('fs');
const path = require('path');

const [kind, run] = process.argv.slice(2);
const r = Number(run);
const counter = path.join(process.env.JOB_STATE, `${kind}-${run}`);
const attempt = (fs.existsSync(counter) ? Number(fs.readFileSync(counter, 'utf8')) : 0) + 1;
fs.writeFileSync(counter, String(attempt));

function fail(status, message) {
  process.stderr.write(message + '\n');
  process.exit(status);
}

function succeed(ms) {
  setTimeout(() => process.stdout.write(`${kind} run ${run} ok\n`), ms);
}

if (kind === 'flaky') {
  // An API that often answers with an error (a non-zero exit: never retried), sometimes says
  // "timeout" (retried by the wrapper's rule), and once times out on every attempt.
  if (r % 5 === 0) fail(1, 'Error: the API answered HTTP 500');
  else if (r === 13 || (r % 7 === 3 && attempt === 1)) fail(1, 'Error: read timeout after 2000 ms');
  else succeed(20);
} else if (kind === 'slow') {
  // A slow job: one run in five hangs at its first attempt (killed by the 10 s timeout, then
  // retried), and one in eleven fails for good.
  if (r % 11 === 4) fail(2, 'Error: disk quota exceeded');
  else if (r % 5 === 1 && attempt === 1) setTimeout(() => {}, 60000);
  else succeed(100 + (r % 4) * 50);
} else {
  fail(64, `unknown kind ${kind}`);
}

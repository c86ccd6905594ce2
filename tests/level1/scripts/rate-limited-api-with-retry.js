#!/usr/bin/env node
/**
 * Quote fetcher with Auto-Retry (a test script in the style of the user's wrapper scripts):
 * an HTTP API that throttles, reported to the wrapper with the status as `statusCode`.
 */

const { executeWithNotifications } = require('../lib/auto-retry');
const http = require('http');

const CONFIG = {
  API: process.env.QUOTE_API,

  // Retry settings
  MAX_RETRIES: 3,
  BACKOFF: 'exponential',
};

async function fetchQuote() {
  return new Promise((resolve, reject) => {
    const url = `${CONFIG.API}/quote?run=${process.argv[2]}`;
    const request = http.get(url, { timeout: 10000 }, (response) => {
      let body = '';
      response.on('data', (chunk) => { body += chunk; });
      response.on('end', () => {
        if (response.statusCode !== 200) {
          const error = new Error(`HTTP ${response.statusCode}`);
          error.statusCode = response.statusCode;
          reject(error);
        } else {
          resolve({ output: body });
        }
      });
    });
    request.on('timeout', () => request.destroy(Object.assign(new Error('socket timeout'), { code: 'ETIMEDOUT' })));
    request.on('error', reject);
  });
}

executeWithNotifications(fetchQuote, {
  maxRetries: CONFIG.MAX_RETRIES,
  backoff: CONFIG.BACKOFF,
  taskName: 'quote API',
  context: { cron: 'quote API', schedule: '*/5 * * * *' },
}).then(() => process.exit(0), () => process.exit(1));

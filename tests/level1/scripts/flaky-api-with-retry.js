#!/usr/bin/env node
/**
 * Flaky API check with Auto-Retry (a test script in the style of the user's wrapper scripts)
 */

const { executeWithNotifications } = require('../lib/auto-retry');
const { exec } = require('child_process');
const path = require('path');

const CONFIG = {
  JOB: path.join(__dirname, '..', 'jobs', 'job.js'),

  // Retry settings
  MAX_RETRIES: 3,
  BACKOFF: 'exponential',
};

async function checkApi() {
  return new Promise((resolve, reject) => {
    const startTime = Date.now();

    exec(`node ${CONFIG.JOB} flaky ${process.argv[2]}`, {
      timeout: 10000,  // 10초 타임아웃
      maxBuffer: 10 * 1024 * 1024  // 10MB
    }, (error, stdout, stderr) => {
      if (error) {
        if (error.killed || error.signal === 'SIGTERM') {
          error.code = 'ETIMEDOUT';
        }
        reject(error);
      } else {
        resolve({ output: stdout, stderr: stderr, duration: Date.now() - startTime });
      }
    });
  });
}

executeWithNotifications(checkApi, {
  maxRetries: CONFIG.MAX_RETRIES,
  backoff: CONFIG.BACKOFF,
  taskName: 'flaky API',
  context: { cron: 'flaky API', schedule: '*/10 * * * *' },
}).then(() => process.exit(0), () => process.exit(1));

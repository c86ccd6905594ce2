'use strict';
/**
 * A stand-in for the user's Level 1 wrapper (`lib/auto-retry.js`, public repository
 * Ramsbaby/openclaw-self-healing, tag v2.0.0), written for tunerd's tests from the facts of its
 * behaviour (SPEC section 2): what it retries, when it gives up, what it logs, and where.
 *
 * - `maxRetries` is the number of attempts in all (`0` falls back to 3); exponential backoff
 *   waits `baseDelay * 2^(k-1)` ms before retry k (linear `* k`, fixed flat).
 * - An error is retryable only for a network code, a transient HTTP status code, or `timeout`
 *   in its message; anything else ends the run at once with `reason: "Non-retryable error"`,
 *   except at the last attempt, where the run ends without a reason, as retries run out.
 * - One line per run, `JSON.stringify` of {timestamp, type, ...data}, appended to
 *   `$HOME/openclaw/logs/auto-retry.jsonl` (no other setting).
 */
const fs = require('fs');
const path = require('path');

const NETWORK_CODES = ['ETIMEDOUT', 'ECONNRESET', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNREFUSED'];
const TRANSIENT_STATUS = [408, 429, 500, 502, 503, 504];
const LOG_DIR = path.join(process.env.HOME, 'openclaw', 'logs');
const LOG_FILE = path.join(LOG_DIR, 'auto-retry.jsonl');

function classify(error) {
  const info = {
    type: error.code || error.name || 'Unknown',
    message: error.message,
    statusCode: error.statusCode || error.status,
    retryable: false,
    category: 'unknown',
    suggestedFix: 'Unknown error',
  };
  if (NETWORK_CODES.includes(error.code)) {
    Object.assign(info, { retryable: true, category: 'network', suggestedFix: 'Retry later' });
  }
  if (TRANSIENT_STATUS.includes(error.statusCode)) {
    Object.assign(info, { retryable: true, category: 'http', suggestedFix: 'Slow down' });
  }
  if (error.message && error.message.includes('timeout')) {
    Object.assign(info, { retryable: true, category: 'timeout', suggestedFix: 'More time' });
  }
  return info;
}

function wait(base, kind, attempt) {
  if (kind === 'exponential') return base * 2 ** (attempt - 1);
  if (kind === 'linear') return base * attempt;
  return base;
}

function append(type, data) {
  fs.mkdirSync(LOG_DIR, { recursive: true });
  fs.appendFileSync(LOG_FILE, JSON.stringify({ timestamp: new Date().toISOString(), type, ...data }) + '\n');
}

async function executeWithRetry(fn, options = {}) {
  const maxRetries = options.maxRetries || 3;
  const backoff = options.backoff || 'exponential';
  const baseDelay = options.baseDelay || 1000;
  const context = options.context || {};
  const started = Date.now();
  const attempts = [];
  for (let attempt = 1; attempt <= maxRetries; attempt++) {
    const attemptStarted = Date.now();
    try {
      const result = await fn();
      attempts.push({ attempt, success: true, duration: Date.now() - attemptStarted });
      append('success', { context, attempts, totalDuration: Date.now() - started, result });
      return { success: true, result, attempts: attempt };
    } catch (error) {
      const info = classify(error);
      attempts.push({ attempt, success: false, duration: Date.now() - attemptStarted, error: info });
      const ended = { context, attempts, totalDuration: Date.now() - started, finalError: info };
      if (attempt === maxRetries) {
        append('failure', ended);
        throw error;
      }
      if (!info.retryable) {
        append('failure', { ...ended, reason: 'Non-retryable error' });
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, wait(baseDelay, backoff, attempt)));
    }
  }
}

// The scripts call this one; without a webhook it notifies nobody (the tests give none).
async function executeWithNotifications(fn, options = {}) {
  return executeWithRetry(fn, options);
}

module.exports = { executeWithRetry, executeWithNotifications };

// The client's reconnection policy: the backoff schedule with an injected random, and the fetch
// transport against a real HTTP server (node:http) that plays scripted event streams.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { BaliZeroStreamClient, backoffDelay, makeTraceparent } from '../../bridge/static/bali-zero-stream-client.mjs';

test('full jitter: every delay lies in [0, min(30 s, 1 s * 2^n))', () => {
  for (let n = 0; n < 12; n++) {
    const ceiling = Math.min(30000, 1000 * 2 ** n);
    assert.equal(backoffDelay(n, { random: () => 0 }), 0);
    assert.equal(backoffDelay(n, { random: () => 0.5 }), Math.floor(ceiling / 2));
    const top = backoffDelay(n, { random: () => 0.999999 });
    assert.ok(top < ceiling && top >= ceiling - 1, `attempt ${n}: ${top} vs ${ceiling}`);
  }
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, { random: () => 0.999999 })),
    [999, 1999, 3999, 7999, 15999, 29999, 29999]);
});

test('custom base and max', () => {
  const d = [0, 1, 2, 3, 4].map((n) => backoffDelay(n, { baseMs: 50, maxMs: 300, random: () => 0.5 }));
  assert.deepEqual(d, [25, 50, 100, 150, 150]);
});

test('traceparent is W3C version 00, sampled, non-zero ids', () => {
  const tp = makeTraceparent();
  assert.match(tp, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
  assert.notEqual(tp.split('-')[1], '0'.repeat(32));
});

/** A real HTTP server answering each request with the next scripted handler. */
async function withServer(handlers, body) {
  const requests = [];
  const server = http.createServer((req, res) => {
    let raw = '';
    req.on('data', (c) => { raw += c; });
    req.on('end', () => {
      requests.push({ method: req.method, url: req.url, headers: req.headers, body: raw });
      const handler = handlers[Math.min(requests.length - 1, handlers.length - 1)];
      handler(req, res, requests.length);
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${server.address().port}/api/v2/bali-zero/chat-stream`;
  try {
    return await body(url, requests);
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
}

const sse = (res, headers = {}) => res.writeHead(200, { 'content-type': 'text/event-stream', ...headers });
const frame = (id, obj) => `id: ${id}\ndata: ${JSON.stringify(obj)}\n\n`;

/** setTimeout that records the requested delays and runs the callback on the next turn. */
function recordingTimers() {
  const delays = [];
  return {
    delays,
    setTimeout: (fn, ms) => {
      if (ms > 1000 * 1000) return setTimeout(fn, ms); // the watchdog: leave it alone
      delays.push(ms);
      return setTimeout(fn, 0);
    },
    clearTimeout: (h) => clearTimeout(h),
  };
}

test('503 is retried with growing backoff, then the client gives up', async () => {
  await withServer([(req, res) => {
    res.writeHead(503, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { code: 'UPSTREAM_UNAVAILABLE', message: 'down' } }));
  }], async (url, requests) => {
    const timers = recordingTimers();
    const errors = [];
    const client = new BaliZeroStreamClient({
      baseUrl: url, random: () => 0.5, backoff: { maxAttempts: 4 }, heartbeatIntervalMs: 1e9, ...timers,
      onError: (e) => errors.push(e),
    });
    await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { code: 'gave_up' });
    assert.equal(requests.length, 5);
    assert.deepEqual(timers.delays, [500, 1000, 2000, 4000]);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].cause.code, 'UPSTREAM_UNAVAILABLE');
  });
});

test('429 surfaces once through onError with Retry-After and is never retried', async () => {
  await withServer([(req, res) => {
    res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '7' });
    res.end(JSON.stringify({ error: { code: 'RATE_LIMITED', message: 'slow down' } }));
  }], async (url, requests) => {
    const errors = [];
    const client = new BaliZeroStreamClient({ baseUrl: url, onError: (e) => errors.push(e) });
    await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { code: 'RATE_LIMITED', status: 429 });
    assert.equal(requests.length, 1);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].retryAfterMs, 7000);
    assert.equal(errors[0].retryable, false);
  });
});

test('a dropped stream resumes with Last-Event-ID and replayed tokens are not shown twice', async () => {
  await withServer([
    (req, res) => {
      sse(res);
      res.write(frame('s1:1', { type: 'metadata', sources: [], stream_id: 's1', request_id: 'r' }));
      res.write(frame('s1:2', { type: 'token', index: 0, text: 'Hel' }));
      res.write(frame('s1:3', { type: 'token', index: 1, text: 'lo' }), () => res.destroy());
    },
    (req, res) => {
      sse(res);
      res.write(frame('s1:3', { type: 'token', index: 1, text: 'lo' })); // replay overlap
      res.write(frame('s1:4', { type: 'token', index: 2, text: ', world' }));
      res.end(frame('s1:5', { type: 'done', finish_reason: 'stop', metrics: { tokens: 3 } }));
    },
  ], async (url, requests) => {
    const timers = recordingTimers();
    const tokens = [];
    const client = new BaliZeroStreamClient({
      baseUrl: url, random: () => 0.25, heartbeatIntervalMs: 1e9, ...timers, onToken: (t) => tokens.push(t),
    });
    const result = await client.stream({ query: 'q', method: 'POST', user_email: 'a@b.c' });
    assert.equal(result.text, 'Hello, world');
    assert.deepEqual(tokens, ['Hel', 'lo', ', world']);
    assert.equal(result.metrics.reconnects, 1);
    assert.equal(result.metrics.tokens, 3);
    assert.deepEqual(timers.delays, [250]);
    assert.equal(requests[0].headers['last-event-id'], undefined);
    assert.equal(requests[1].headers['last-event-id'], 's1:3');
    assert.deepEqual(JSON.parse(requests[1].body), { query: 'q', user_email: 'a@b.c' });
    assert.match(requests[0].headers.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
    // one trace for the whole answer, a new parent span per attempt
    assert.equal(requests[0].headers.traceparent.split('-')[1], requests[1].headers.traceparent.split('-')[1]);
    assert.notEqual(requests[0].headers.traceparent, requests[1].headers.traceparent);
  });
});

test('a non-retryable error frame rejects without reconnecting', async () => {
  await withServer([(req, res) => {
    sse(res);
    res.end(frame('s:1', { type: 'error', code: 'INVALID_ARGUMENT', message: 'no', retryable: false }));
  }], async (url, requests) => {
    const client = new BaliZeroStreamClient({ baseUrl: url });
    await assert.rejects(client.stream({ query: 'q', method: 'GET' }), { code: 'INVALID_ARGUMENT' });
    assert.equal(requests.length, 1);
    assert.equal(new URL(requests[0].url, url).searchParams.get('query'), 'q');
  });
});

test('the heartbeat watchdog reconnects a silent stream (interval from x-heartbeat-interval)', async () => {
  await withServer([
    (req, res) => { sse(res, { 'x-heartbeat-interval': '0.04' }); res.write(': open\n\n'); },
    (req, res) => {
      sse(res, { 'x-heartbeat-interval': '0.04' });
      res.end(frame('s:1', { type: 'done', finish_reason: 'stop', metrics: {} }));
    },
  ], async (url, requests) => {
    const reconnects = [];
    const client = new BaliZeroStreamClient({
      baseUrl: url, random: () => 0, onReconnect: (r) => reconnects.push(r.error.code),
    });
    const result = await client.stream({ query: 'q', method: 'POST' });
    assert.equal(result.text, '');
    assert.deepEqual(reconnects, ['heartbeat_timeout']);
    assert.equal(requests.length, 2);
  });
});

test('abort() rejects with AbortError and closes the connection', async () => {
  let closed;
  const gone = new Promise((r) => { closed = r; });
  await withServer([(req, res) => { sse(res); res.write(': hi\n\n'); req.socket.on('close', closed); }],
    async (url) => {
      const client = new BaliZeroStreamClient({ baseUrl: url, onStateChange: (s) => { if (s === 'streaming') client.abort(); } });
      await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { name: 'AbortError' });
      await gone;
    });
});

// Clients outside the rollout: on 404 STREAMING_DISABLED the client answers through
// POST /api/v2/bali-zero/chat and reports it through the stream's callbacks, against a real
// node:http server playing the bridge.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { BaliZeroStreamClient } from '../../bridge/static/bali-zero-stream-client.mjs';

/** A real HTTP server; `routes` maps "METHOD path" to a handler, every request is recorded. */
async function withBridge(routes, body) {
  const requests = [];
  const server = http.createServer((req, res) => {
    let raw = '';
    req.on('data', (c) => { raw += c; });
    req.on('end', () => {
      const path = new URL(req.url, 'http://x').pathname;
      requests.push({ method: req.method, path, headers: req.headers, body: raw });
      const handler = routes[`${req.method} ${path}`];
      if (handler) handler(req, res, requests.length);
      else json(res, 404, { error: { code: 'NOT_FOUND', message: 'no such endpoint' } });
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${server.address().port}`;
  try {
    return await body(base, requests);
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
}

const json = (res, status, obj, headers = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(obj));
};
const disabled = (req, res) => json(res, 404, {
  error: { code: 'STREAMING_DISABLED', message: 'streaming is not yet enabled for this user' },
});
const ANSWER = {
  answer: 'Bali needs a visa on arrival.', model: 'stub', request_id: 'rid-1', finish_reason: 'stop',
  sources: [{ title: 'Immigration', uri: 'https://example.test/visa', score: 0.9 }],
  metrics: { tokens: 6, duration_ms: 12.5 },
};

function recorder(extra = {}) {
  const log = { metadata: [], tokens: [], complete: [], errors: [], states: [] };
  return {
    log,
    options: {
      onMetadata: (m) => log.metadata.push(m),
      onToken: (t, meta, frame) => log.tokens.push({ t, frame }),
      onComplete: (r) => log.complete.push(r),
      onError: (e) => log.errors.push(e),
      onStateChange: (s) => log.states.push(s),
      heartbeatIntervalMs: 1e9,
      ...extra,
    },
  };
}

for (const method of ['GET', 'POST']) {
  test(`${method}: 404 STREAMING_DISABLED falls back to POST /chat through the same callbacks`, async () => {
    await withBridge({
      [`${method} /api/v2/bali-zero/chat-stream`]: disabled,
      'POST /api/v2/bali-zero/chat': (req, res) => json(res, 200, ANSWER),
    }, async (base, requests) => {
      const { log, options } = recorder({ headers: { Authorization: 'Bearer t' } });
      const client = new BaliZeroStreamClient({
        ...options, baseUrl: `${base}/api/v2/bali-zero/chat-stream`, chatUrl: `${base}/api/v2/bali-zero/chat`,
      });
      const result = await client.stream({ query: 'visa?', method, user_email: 'a@b.c' });
      assert.equal(result.fallback, true);
      assert.equal(result.text, ANSWER.answer);
      assert.equal(result.finishReason, 'stop');
      assert.deepEqual(result.metrics.server, ANSWER.metrics);
      assert.equal(result.metrics.tokens, 1);
      assert.deepEqual(log.metadata.map((m) => [m.fallback, m.sources, m.request_id]),
        [[true, ANSWER.sources, 'rid-1']]);
      assert.deepEqual(log.tokens.map((x) => x.t), [ANSWER.answer]); // one call, the whole answer
      assert.equal(log.complete.length, 1);
      assert.equal(log.complete[0].fallback, true);
      assert.deepEqual(log.errors, []);
      const chat = requests.find((r) => r.path === '/api/v2/bali-zero/chat');
      assert.deepEqual(JSON.parse(chat.body), { query: 'visa?', user_email: 'a@b.c' });
      assert.equal(chat.headers.authorization, 'Bearer t');
      assert.equal(chat.headers['content-type'], 'application/json');
      assert.deepEqual(requests.map((r) => `${r.method} ${r.path}`),
        [`${method} /api/v2/bali-zero/chat-stream`, 'POST /api/v2/bali-zero/chat']);
    });
  });
}

test('fallback: false surfaces STREAMING_DISABLED as an error and never calls /chat', async () => {
  await withBridge({ 'POST /api/v2/bali-zero/chat-stream': disabled }, async (base, requests) => {
    const { log, options } = recorder();
    const client = new BaliZeroStreamClient({ ...options, baseUrl: `${base}/api/v2/bali-zero/chat-stream`,
      chatUrl: `${base}/api/v2/bali-zero/chat`, fallback: false });
    await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { code: 'STREAMING_DISABLED', status: 404 });
    assert.equal(requests.length, 1);
    assert.equal(log.errors.length, 1);
  });
});

test('any other 404 is an error, not a fallback', async () => {
  await withBridge({}, async (base, requests) => {
    const client = new BaliZeroStreamClient({ baseUrl: `${base}/nowhere`, chatUrl: `${base}/api/v2/bali-zero/chat` });
    await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { code: 'NOT_FOUND' });
    assert.equal(requests.length, 1);
  });
});

test('a 503 from /chat is retried with backoff on /chat, a 429 from /chat is final', async () => {
  let chatCalls = 0;
  await withBridge({
    'POST /api/v2/bali-zero/chat-stream': disabled,
    'POST /api/v2/bali-zero/chat': (req, res) => {
      chatCalls += 1;
      if (chatCalls === 1) json(res, 503, { error: { code: 'UPSTREAM_UNAVAILABLE', message: 'down' } });
      else if (chatCalls === 2) json(res, 200, ANSWER);
      else json(res, 429, { error: { code: 'RATE_LIMITED', message: 'slow' } }, { 'retry-after': '3' });
    },
  }, async (base, requests) => {
    const delays = [];
    const { log, options } = recorder({
      random: () => 0.5,
      setTimeout: (fn, ms) => { if (ms < 1e8) delays.push(ms); return setTimeout(fn, ms < 1e8 ? 0 : ms); },
      clearTimeout: (h) => clearTimeout(h),
    });
    const client = new BaliZeroStreamClient({ ...options, baseUrl: `${base}/api/v2/bali-zero/chat-stream`,
      chatUrl: `${base}/api/v2/bali-zero/chat` });
    const result = await client.stream({ query: 'q', method: 'POST' });
    assert.equal(result.text, ANSWER.answer);
    assert.equal(result.metrics.reconnects, 1);
    assert.deepEqual(delays, [500]);
    // the retry went to /chat again, not back to the stream endpoint
    assert.deepEqual(requests.map((r) => r.path), ['/api/v2/bali-zero/chat-stream', '/api/v2/bali-zero/chat',
      '/api/v2/bali-zero/chat']);
    await assert.rejects(client.stream({ query: 'q', method: 'POST' }), { code: 'RATE_LIMITED', retryAfterMs: 3000 });
    assert.equal(log.errors.length, 1);
  });
});

test('a streamed answer reports fallback: false', async () => {
  await withBridge({
    'POST /api/v2/bali-zero/chat-stream': (req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end('id: s:1\ndata: {"type":"token","index":0,"text":"hi"}\n\nid: s:2\ndata: {"type":"done"}\n\n');
    },
  }, async (base) => {
    const client = new BaliZeroStreamClient({ baseUrl: `${base}/api/v2/bali-zero/chat-stream`, heartbeatIntervalMs: 1e9 });
    const result = await client.stream({ query: 'q', method: 'POST' });
    assert.equal(result.fallback, false);
    assert.equal(result.text, 'hi');
  });
});

test('hostile /chat answer that is not a JSON object fails the stream with bad_response, never hangs', async () => {
  // `null` (or a bare string) is valid JSON: reading answer.request_id threw outside any handler,
  // the stream() promise never settled and the page waited forever.
  for (const hostile of ['null', '"just a string"', '[1,2]', '42']) {
    await withBridge({
      'POST /api/v2/bali-zero/chat-stream': disabled,
      'POST /api/v2/bali-zero/chat': (req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(hostile);
      },
    }, async (base) => {
      const { log, options } = recorder();
      const client = new BaliZeroStreamClient({ ...options, baseUrl: `${base}/api/v2/bali-zero/chat-stream`,
        chatUrl: `${base}/api/v2/bali-zero/chat` });
      const settled = client.stream({ query: 'q', method: 'POST' });
      const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error(`hung on ${hostile}`)), 3000));
      await assert.rejects(Promise.race([settled, timeout]), { code: 'bad_response' });
      assert.equal(log.errors.length, 1, hostile);
      assert.equal(log.metadata.length, 0, 'nothing from the hostile answer reached the page');
      assert.equal(log.tokens.length, 0);
    });
  }
});

test('hostile /chat answer with non-string fields gives the page only well-typed values', async () => {
  await withBridge({
    'POST /api/v2/bali-zero/chat-stream': disabled,
    'POST /api/v2/bali-zero/chat': (req, res) => json(res, 200, {
      answer: { toString: 'x' }, sources: 'not a list', request_id: ['r'], model: 5, finish_reason: 'stop',
    }),
  }, async (base) => {
    const { log, options } = recorder();
    const client = new BaliZeroStreamClient({ ...options, baseUrl: `${base}/api/v2/bali-zero/chat-stream`,
      chatUrl: `${base}/api/v2/bali-zero/chat` });
    const result = await client.stream({ query: 'q', method: 'POST' });
    assert.equal(result.text, '');
    assert.deepEqual(log.metadata[0].sources, []);
  });
});

// k6 load test of the chat stream: `k6 run load-tests/chat-stream-load.js`, as the deployment
// guide (ORIGINAL-DESIGN) names it. `make loadtest` starts the stub, Redis and a bridge of
// WORKERS workers and runs the long profile; tests/e2e/test_loadtest.py runs the short one in `make test`.
//
// Environment: BASE_URL (http://127.0.0.1:8000), JWT_SECRET (the bridge's HS256 secret),
// PROFILE (short | long), QUERY_WORDS (tokens per answer with the echo stub).
//
// Scenarios:
//   streams_get, streams_post  ramping arrival of stream users; each VU signs its own JWT, so the
//                              per-user rate limit (20/min) and stream cap apply per VU; each VU
//                              paces itself under 20 requests a minute
//   burst                      one user asks 25 times at once: past 20 it must get 429 + Retry-After
//   disconnects                clients that hang up mid-answer (request timeout shorter than the answer)
// Checks: status 200, an event stream, a `done` frame last, tokens counted (as many as `done` says),
// no 5xx anywhere. Thresholds: the guide's targets (first token < 100 ms; inter-token < 50 ms) at
// p95 (and p99 in the long profile), time to first byte, error and check rates; `k6 run` exits
// non-zero (99) when one is missed.

import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const JWT_SECRET = __ENV.JWT_SECRET || '';
const PROFILE = __ENV.PROFILE || 'long';
const STREAM_PATH = '/api/v2/bali-zero/chat-stream';
const CHAT_PATH = '/api/v2/bali-zero/chat';
const STATS_PATH = '/api/v2/bali-zero/stream-stats';
const RATE_LIMIT_PER_MINUTE = 20;
// One request per this many seconds keeps a VU under its own rate limit (20/min).
const USER_PERIOD_S = 60 / RATE_LIMIT_PER_MINUTE + 0.1;

// rate: new streams per second in each of the GET and POST scenarios at the plateau; words: tokens
// per answer with the echo stub (at its 20 ms pacing, 100 words is a 2 s answer).
const PROFILES = {
  short: { rate: 3, rampS: 4, holdS: 6, vus: 40, words: 20, burst: 25, disconnects: 6 },
  long: { rate: 12, rampS: 30, holdS: 90, vus: 200, words: 100, burst: 25, disconnects: 60 },
};
const P = PROFILES[PROFILE];
if (!P) {
  throw new Error(`PROFILE must be one of ${Object.keys(PROFILES).join(', ')}`);
}
const QUERY_WORDS = parseInt(__ENV.QUERY_WORDS || String(P.words), 10);

const streamErrors = new Rate('stream_errors');
const serverErrors = new Rate('server_errors');
const tokensCounted = new Counter('tokens_counted');
const firstTokenMs = new Trend('first_token_ms', true);
const interTokenMs = new Trend('inter_token_ms', true);
const rateLimited = new Counter('rate_limited_with_retry_after');
const disconnected = new Counter('disconnected_mid_answer');
const serverFirstToken = {
  p95: new Trend('server_first_token_p95_ms', true),
  p99: new Trend('server_first_token_p99_ms', true),
};
const serverInterToken = {
  p95: new Trend('server_inter_token_p95_ms', true),
  p99: new Trend('server_inter_token_p99_ms', true),
};

function ramp(exec, method) {
  return {
    executor: 'ramping-arrival-rate',
    exec,
    startRate: 0,
    timeUnit: '1s',
    preAllocatedVUs: Math.ceil(P.vus / 2),
    maxVUs: P.vus,
    stages: [
      { target: P.rate, duration: `${P.rampS}s` },
      { target: P.rate, duration: `${P.holdS}s` },
      { target: 0, duration: `${Math.max(1, Math.round(P.rampS / 4))}s` },
    ],
    tags: { kind: 'stream', method },
  };
}

export const options = {
  scenarios: {
    streams_get: ramp('streamGet', 'GET'),
    streams_post: ramp('streamPost', 'POST'),
    burst: {
      executor: 'per-vu-iterations',
      exec: 'burst',
      vus: 1,
      iterations: 1,
      startTime: `${Math.round(P.rampS / 2)}s`,
      tags: { kind: 'burst' },
    },
    disconnects: {
      executor: 'shared-iterations',
      exec: 'disconnect',
      vus: Math.min(10, P.disconnects),
      iterations: P.disconnects,
      startTime: `${P.rampS}s`,
      tags: { kind: 'disconnect' },
    },
  },
  // The targets of the deployment guide (ORIGINAL-DESIGN, "Performance Targets"): first token
  // under 100 ms and inter-token latency under 50 ms, measured three ways: time to first byte (the
  // status line leaves with the first frames), each stream's own figures from its `done` frame,
  // and the whole server's from the stats endpoint at the end (every worker's samples). The guide
  // names no percentile: both profiles hold p95 to the targets; the long one, with enough samples
  // for a tail, p99 too.
  thresholds: thresholds(),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function thresholds() {
  const t = {
    'http_req_waiting{kind:stream}': ['p(95)<100'],
    first_token_ms: ['p(95)<100'],
    inter_token_ms: ['p(95)<50'],
    server_first_token_p95_ms: ['max<100'],
    server_inter_token_p95_ms: ['max<50'],
    stream_errors: ['rate<0.01'],
    server_errors: ['rate==0'],
    checks: ['rate>0.99'],
    rate_limited_with_retry_after: ['count>0'],
    tokens_counted: ['count>0'],
  };
  if (PROFILE === 'long') {
    t.first_token_ms.push('p(99)<100');
    t.inter_token_ms.push('p(99)<50');
    t.server_first_token_p99_ms = ['max<100'];
    t.server_inter_token_p99_ms = ['max<50'];
  }
  return t;
}

function b64url(text) {
  return encoding.b64encode(text, 'rawurl');
}

// An HS256 JWT for `sub`, valid for an hour: the bridge verifies it with JWT_SECRET.
export function signToken(sub) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + 3600 }));
  const signature = crypto.hmac('sha256', JWT_SECRET, `${head}.${body}`, 'base64rawurl');
  return `${head}.${body}.${signature}`;
}

const tokens = {};
function tokenFor(sub) {
  if (!tokens[sub]) {
    tokens[sub] = signToken(sub);
  }
  return tokens[sub];
}

function query(words, tag) {
  const out = [];
  for (let i = 0; i < words; i++) {
    out.push(`${tag}${i}`);
  }
  return out.join(' ');
}

// The message frames of an event stream body, parsed (heartbeats and comments skipped).
export function frames(body) {
  const out = [];
  for (const block of (body || '').split('\n\n')) {
    const data = block
      .split('\n')
      .filter((line) => line.startsWith('data:'))
      .map((line) => line.slice(5).replace(/^ /, ''));
    const isMessage = !block.split('\n').some((line) => line.startsWith('event:') && !line.includes('message'));
    if (data.length && isMessage) {
      try {
        out.push(JSON.parse(data.join('\n')));
      } catch (e) {
        out.push({ type: 'unparsable' });
      }
    }
  }
  return out;
}

function recordStream(res) {
  serverErrors.add(res.status >= 500);
  const got = frames(res.body);
  const last = got.length ? got[got.length - 1] : {};
  const counted = got.filter((f) => f.type === 'token').length;
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    'is an event stream': (r) => (r.headers['Content-Type'] || '').startsWith('text/event-stream'),
    'ends with a done frame': () => last.type === 'done',
    'tokens counted match done': () => counted > 0 && last.metrics && last.metrics.tokens === counted,
    'no 5xx': (r) => r.status < 500,
  });
  streamErrors.add(!ok);
  tokensCounted.add(counted);
  if (last.type === 'done' && last.metrics) {
    const m = last.metrics;
    if (typeof m.first_token_ms === 'number') {
      firstTokenMs.add(m.first_token_ms);
      if (counted > 1) {
        interTokenMs.add((m.duration_ms - m.first_token_ms) / (counted - 1));
      }
    }
  }
}

function userParams(kind) {
  const sub = `k6-${kind}-vu${__VU}`;
  return {
    headers: { Authorization: `Bearer ${tokenFor(sub)}` },
    timeout: '60s',
  };
}

function paced(started) {
  const left = USER_PERIOD_S - (Date.now() - started) / 1000;
  if (left > 0) {
    sleep(left); // this user's think time: under its 20 requests a minute
  }
}

export function streamGet() {
  const started = Date.now();
  const params = userParams('get');
  const res = http.get(`${BASE_URL}${STREAM_PATH}?query=${encodeURIComponent(query(QUERY_WORDS, 'g'))}`, params);
  recordStream(res);
  paced(started);
}

export function streamPost() {
  const started = Date.now();
  const params = userParams('post');
  params.headers['Content-Type'] = 'application/json';
  const res = http.post(`${BASE_URL}${STREAM_PATH}`, JSON.stringify({ query: query(QUERY_WORDS, 'p') }), params);
  recordStream(res);
  paced(started);
}

export function burst() {
  const params = userParams('burst');
  params.headers['Content-Type'] = 'application/json';
  params.responseCallback = http.expectedStatuses(200, 429);
  const body = JSON.stringify({ query: 'burst' });
  const requests = [];
  for (let i = 0; i < P.burst; i++) {
    requests.push(['POST', `${BASE_URL}${CHAT_PATH}`, body, params]);
  }
  const answers = http.batch(requests);
  const allowed = answers.filter((r) => r.status === 200).length;
  const limited = answers.filter((r) => r.status === 429 && Number(r.headers['Retry-After']) > 0);
  for (const r of answers) {
    serverErrors.add(r.status >= 500);
  }
  rateLimited.add(limited.length);
  check(answers, {
    'burst: 20 allowed': () => allowed === RATE_LIMIT_PER_MINUTE,
    'burst: the rest 429 with Retry-After': () => limited.length === P.burst - RATE_LIMIT_PER_MINUTE,
  });
}

export function disconnect() {
  const params = userParams('disconnect');
  params.timeout = '300ms'; // an answer of 200 tokens takes seconds: k6 hangs up mid-answer
  params.responseCallback = http.expectedStatuses(200);
  const res = http.get(`${BASE_URL}${STREAM_PATH}?query=${encodeURIComponent(query(200, 'd'))}`, params);
  serverErrors.add(res.status >= 500);
  disconnected.add(res.error_code === 1050 ? 1 : 0); // 1050: request timeout
  paced(Date.now() - 300);
}

// After the load: the whole server's p99s from the stats endpoint (every worker's samples).
export function teardown() {
  const res = http.get(`${BASE_URL}${STATS_PATH}`, { tags: { kind: 'stats' } });
  if (res.status !== 200) {
    serverErrors.add(res.status >= 500);
    return;
  }
  const stats = res.json();
  for (const q of ['p95', 'p99']) {
    if (stats.first_token_ms && stats.first_token_ms[q] !== null) {
      serverFirstToken[q].add(stats.first_token_ms[q]);
    }
    if (stats.inter_token_ms && stats.inter_token_ms[q] !== null) {
      serverInterToken[q].add(stats.inter_token_ms[q]);
    }
  }
  console.log(`server stats: ${JSON.stringify({ workers: stats.workers, opened: stats.streams_opened, outcomes: stats.outcomes, first_token_ms: stats.first_token_ms, inter_token_ms: stats.inter_token_ms })}`);
}

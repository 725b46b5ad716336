/*
 * bali-zero-stream-client.js: browser client of /api/v2/bali-zero/chat-stream.
 *
 * One dependency-free file that works three ways:
 *   - classic <script src=".../bali-zero-stream-client.js">: sets globalThis.BaliZeroStreamClient
 *     (and globalThis.BaliZeroSSE with the parser and helpers);
 *   - ES module: `import { BaliZeroStreamClient } from '.../bali-zero-stream-client.mjs'`
 *     (a two-line re-export of this file);
 *   - CommonJS / node: require() returns the same names (used by the node tests).
 *
 * GET streams through EventSource, POST through fetch + a WHATWG event-stream parser. Both resume
 * with the last event id after a drop, with exponential backoff and full jitter.
 *
 * A user outside the rollout (404 STREAMING_DISABLED) gets the answer from POST /api/v2/bali-zero/chat
 * instead, through the same callbacks: onMetadata (sources), ONE onToken with the whole answer,
 * onComplete with `fallback: true`. `fallback: false` turns that off (the 404 is then an error).
 */
(function (root) {
  'use strict';

  // ------------------------------------------------------------------------------------------
  // Event-stream parser (HTML standard, "Interpreting an event stream")
  // ------------------------------------------------------------------------------------------

  const LF = 10;
  const CR = 13;

  /**
   * Incremental parser. feed() takes Uint8Array chunks (decoded as UTF-8, bad bytes become
   * U+FFFD, a character split across chunks is kept whole) or already-decoded strings, and
   * returns the events a browser's EventSource would dispatch: {type, data, id}.
   */
  class EventStreamParser {
    constructor() {
      this._decoder = new TextDecoder('utf-8', { ignoreBOM: true });
      this._pending = '';
      this._bomChecked = false;
      this._skipLF = false;
      this._data = null; // null = no data field seen since the last dispatch
      this._type = '';
      this._idBuffer = '';
      this.lastEventId = '';
      this.retry = null;
    }

    feed(chunk) {
      let text = typeof chunk === 'string' ? chunk : this._decoder.decode(chunk, { stream: true });
      if (!this._bomChecked && text.length > 0) {
        this._bomChecked = true;
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      }
      return this._lines(text);
    }

    /** End of stream: an unterminated line or an event without its blank line is discarded. */
    close() {
      this._decoder.decode();
      this._pending = '';
      this._data = null;
      this._type = '';
      return [];
    }

    _lines(text) {
      const events = [];
      let start = 0;
      if (this._skipLF && text.length > 0) {
        // The previous chunk ended with CR: a LF opening this one is the rest of that CRLF.
        this._skipLF = false;
        if (text.charCodeAt(0) === LF) start = 1;
      }
      const n = text.length;
      for (let i = start; i < n; i++) {
        const c = text.charCodeAt(i);
        if (c !== LF && c !== CR) continue;
        // A CR ends its line at once (as browsers do), so an event ended by CR is not held back.
        const event = this._line(this._pending + text.slice(start, i));
        this._pending = '';
        if (event) events.push(event);
        if (c === CR) {
          if (i + 1 < n) {
            if (text.charCodeAt(i + 1) === LF) i++;
          } else {
            this._skipLF = true;
          }
        }
        start = i + 1;
      }
      this._pending += text.slice(start);
      return events;
    }

    _line(line) {
      if (line === '') return this._dispatch();
      if (line.charCodeAt(0) === 58 /* : */) return null; // comment
      const colon = line.indexOf(':');
      let name = line;
      let value = '';
      if (colon !== -1) {
        name = line.slice(0, colon);
        value = line.slice(colon + 1);
        if (value.charCodeAt(0) === 32) value = value.slice(1);
      }
      switch (name) {
        case 'data':
          this._data = this._data === null ? value : this._data + '\n' + value;
          break;
        case 'event':
          this._type = value;
          break;
        case 'id':
          if (value.indexOf('\u0000') === -1) this._idBuffer = value;
          break;
        case 'retry':
          if (/^[0-9]+$/.test(value)) this.retry = parseInt(value, 10);
          break;
        default:
          break; // unknown fields are ignored
      }
      return null;
    }

    _dispatch() {
      this.lastEventId = this._idBuffer;
      if (this._data === null) {
        this._type = '';
        return null;
      }
      const event = { type: this._type || 'message', data: this._data, id: this.lastEventId };
      this._data = null;
      this._type = '';
      return event;
    }
  }

  /** All events of a whole stream given as a list of chunks (strings or bytes). */
  function parseEventStream(chunks) {
    const parser = new EventStreamParser();
    const events = [];
    for (const chunk of chunks) {
      const bytes = Array.isArray(chunk) ? Uint8Array.from(chunk) : chunk;
      events.push(...parser.feed(bytes));
    }
    parser.close();
    return { events, lastEventId: parser.lastEventId, retry: parser.retry };
  }

  // ------------------------------------------------------------------------------------------
  // Helpers
  // ------------------------------------------------------------------------------------------

  /** Full-jitter exponential backoff: uniform in [0, min(maxMs, baseMs * 2^attempt)). */
  function backoffDelay(attempt, { baseMs = 1000, maxMs = 30000, random = Math.random } = {}) {
    const ceiling = Math.min(maxMs, baseMs * Math.pow(2, Math.max(0, attempt)));
    return Math.floor(random() * ceiling);
  }

  function randomHex(bytes) {
    const buf = new Uint8Array(bytes);
    const c = root.crypto;
    if (c && typeof c.getRandomValues === 'function') c.getRandomValues(buf);
    else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
    let hex = '';
    for (const b of buf) hex += b.toString(16).padStart(2, '0');
    return /^0+$/.test(hex) ? randomHex(bytes) : hex; // all-zero ids are invalid
  }

  /** A W3C trace-context `traceparent` (version 00, sampled). */
  function makeTraceparent(traceId = randomHex(16), spanId = randomHex(8)) {
    return `00-${traceId}-${spanId}-01`;
  }

  function percentile(sorted, p) {
    if (sorted.length === 0) return null;
    const rank = Math.ceil((p / 100) * sorted.length) - 1;
    return sorted[Math.min(sorted.length - 1, Math.max(0, rank))];
  }

  function parseRetryAfter(value, nowMs) {
    if (!value) return null;
    if (/^\s*\d+\s*$/.test(value)) return parseInt(value, 10) * 1000;
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, date - nowMs);
  }

  /** Error given to onError and used to reject stream(). */
  class StreamError extends Error {
    constructor(code, message, { retryable = false, status = null, retryAfterMs = null, cause } = {}) {
      super(message);
      this.name = code === 'aborted' ? 'AbortError' : 'StreamError';
      this.code = code;
      this.retryable = retryable;
      this.status = status;
      this.retryAfterMs = retryAfterMs;
      if (cause !== undefined) this.cause = cause;
    }
  }

  const RETRYABLE_STATUS = new Set([502, 503, 504]);

  // ------------------------------------------------------------------------------------------
  // The client
  // ------------------------------------------------------------------------------------------

  const DEFAULTS = {
    baseUrl: '/api/v2/bali-zero/chat-stream',
    method: 'GET',
    transport: 'auto', // GET: 'auto' = EventSource when available, else fetch; 'fetch' forces fetch
    headers: {},
    backoff: { baseMs: 1000, maxMs: 30000, maxAttempts: 8 },
    heartbeatIntervalMs: 30000, // replaced by the x-heartbeat-interval header when fetch can see it
    watchdogFactor: 2.5,
    honorRetryAfter: true, // 503 + Retry-After: wait that long (capped at backoff.maxMs) before the retry
    random: Math.random,
    setTimeout: (fn, ms) => root.setTimeout(fn, ms),
    clearTimeout: (handle) => root.clearTimeout(handle),
    now: () => (root.performance && root.performance.now ? root.performance.now() : Date.now()),
    fetch: null,
    EventSource: null,
    traceparent: true,
    restartWhenExpired: true, // STREAM_EXPIRED on resume: start the answer over once (onReset is called)
    fallback: true, // 404 STREAMING_DISABLED: answer through chatUrl (non-streaming), same callbacks
    chatUrl: '/api/v2/bali-zero/chat',
  };

  const noop = () => {};

  class BaliZeroStreamClient {
    constructor(options = {}) {
      this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
      const o = this.options;
      this.onToken = o.onToken || noop;
      this.onComplete = o.onComplete || noop;
      this.onError = o.onError || noop;
      this.onMetadata = o.onMetadata || noop;
      this.onStateChange = o.onStateChange || noop;
      this.onReconnect = o.onReconnect || noop;
      this.onHeartbeat = o.onHeartbeat || noop;
      this.onReset = o.onReset || noop;
      this.state = 'idle';
      this._run = null;
    }

    /**
     * Stream one answer. Resolves on the `done` frame with {text, metadata, metrics, finishReason,
     * streamId, fallback}; rejects with a StreamError on an `error` frame, a fatal HTTP status, giving up
     * after backoff.maxAttempts, or abort() (code 'aborted').
     */
    stream(request = {}) {
      if (this._run) this.abort();
      const run = new StreamRun(this, request);
      this._run = run;
      return run.promise.finally(() => {
        if (this._run === run) this._run = null;
      });
    }

    /** Close the connection now (the bridge then cancels the upstream call). */
    abort() {
      if (this._run) this._run.abort();
    }

    _setState(state, detail) {
      if (this.state === state) return;
      this.state = state;
      this.onStateChange(state, detail);
    }
  }

  /** One call of stream(): its connection attempts, watchdog, resume position and metrics. */
  class StreamRun {
    constructor(client, request) {
      this.client = client;
      this.o = client.options;
      this.request = request;
      this.method = String(request.method || this.o.method || 'GET').toUpperCase();
      this.traceId = randomHex(16);
      this.startedAt = this.o.now();
      this.firstTokenAt = null;
      this.lastTokenAt = null;
      this.gaps = [];
      this.pieces = [];
      this.nextIndex = 0;
      this.metadata = null;
      this.streamId = null;
      this.lastEventId = request.lastEventId || '';
      this.attempt = 0; // consecutive failed attempts; reset by any data frame
      this.reconnects = 0;
      this.heartbeatMs = this.o.heartbeatIntervalMs;
      this.finished = false;
      this.restarted = false;
      this.fallback = false; // true once the bridge said streaming is off for this user
      this.conn = null;
      this.timer = null;
      this.watchdog = null;
      this.promise = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      this.connect();
    }

    // -- connections -------------------------------------------------------------------------

    connect() {
      if (this.finished) return;
      this.client._setState(this.reconnects > 0 ? 'reconnecting' : 'connecting');
      if (this.fallback) {
        this.connectChat();
        return;
      }
      const useEventSource =
        this.method === 'GET' && this.o.transport !== 'fetch' && this.eventSourceCtor() !== null;
      if (useEventSource) this.connectEventSource();
      else this.connectFetch();
    }

    eventSourceCtor() {
      return this.o.EventSource || root.EventSource || null;
    }

    fetchFn() {
      const f = this.o.fetch || root.fetch;
      return f.bind ? f.bind(root) : f;
    }

    traceparent() {
      if (!this.o.traceparent) return null;
      return typeof this.o.traceparent === 'function' ? this.o.traceparent() : makeTraceparent(this.traceId);
    }

    getUrl(extra) {
      const base = new URL(this.o.baseUrl, root.location ? root.location.href : 'http://localhost/');
      const r = this.request;
      for (const key of ['query', 'user_email', 'user_role']) {
        if (r[key] !== undefined && r[key] !== null) base.searchParams.set(key, String(r[key]));
      }
      if (r.conversation_history !== undefined) {
        const h = r.conversation_history;
        base.searchParams.set('conversation_history', typeof h === 'string' ? h : JSON.stringify(h));
      }
      for (const [k, v] of Object.entries(extra || {})) if (v) base.searchParams.set(k, v);
      return base.toString();
    }

    body() {
      const r = this.request;
      const body = { query: r.query };
      if (r.user_email !== undefined) body.user_email = r.user_email;
      if (r.user_role !== undefined) body.user_role = r.user_role;
      if (r.conversation_history !== undefined) {
        const h = r.conversation_history;
        body.conversation_history = typeof h === 'string' ? JSON.parse(h) : h;
      }
      return JSON.stringify(body);
    }

    connectEventSource() {
      const ES = this.eventSourceCtor();
      // EventSource cannot send headers: trace context and resume position go in the query.
      const url = this.getUrl({ traceparent: this.traceparent(), last_event_id: this.lastEventId });
      const es = new ES(url, { withCredentials: !!this.o.withCredentials });
      let opened = false;
      const conn = {
        close: () => es.close(),
      };
      this.conn = conn;
      es.addEventListener('open', () => {
        if (this.conn !== conn) return;
        opened = true;
        this.armWatchdog();
        this.client._setState('streaming');
      });
      es.addEventListener('message', (ev) => {
        if (this.conn === conn) this.handleEvent({ type: 'message', data: ev.data, id: ev.lastEventId });
      });
      es.addEventListener('heartbeat', (ev) => {
        if (this.conn === conn) this.handleEvent({ type: 'heartbeat', data: ev.data, id: ev.lastEventId });
      });
      es.addEventListener('error', () => {
        if (this.conn !== conn) return;
        es.close(); // never let EventSource reconnect on its own: we own backoff and resume
        if (this.finished) return;
        if (!opened) {
          // EventSource hides the HTTP status. Repeat this attempt over fetch, which sees it:
          // a 4xx becomes a typed fatal error, a 200 is simply consumed as the stream.
          this.connectFetch('GET');
        } else {
          this.dropped(new StreamError('connection_lost', 'the event stream connection was lost', { retryable: true }));
        }
      });
    }

    async connectFetch(forceMethod) {
      const method = forceMethod || this.method;
      const controller = new AbortController();
      const conn = { close: () => controller.abort() };
      this.conn = conn;
      const headers = { Accept: 'text/event-stream', ...(this.o.headers || {}) };
      const tp = this.traceparent();
      if (tp) headers.traceparent = tp;
      if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
      const init = { method, headers, signal: controller.signal, cache: 'no-store' };
      if (this.o.withCredentials) init.credentials = 'include';
      let url;
      if (method === 'POST') {
        url = this.o.baseUrl;
        headers['Content-Type'] = 'application/json';
        init.body = this.body();
      } else {
        url = this.getUrl({ traceparent: tp });
      }
      let response;
      try {
        response = await this.fetchFn()(url, init);
      } catch (err) {
        if (this.conn !== conn || this.finished) return;
        this.dropped(new StreamError('network_error', `could not reach the bridge: ${err && err.message}`, {
          retryable: true, cause: err,
        }));
        return;
      }
      if (this.conn !== conn || this.finished) {
        controller.abort();
        return;
      }
      if (!response.ok) {
        await this.httpError(response);
        return;
      }
      if (response.status === 204) {
        // The bridge says there is nothing left to send (204 also stops EventSource for good).
        controller.abort();
        this.complete({ finish_reason: 'stop', metrics: null });
        return;
      }
      const type = response.headers.get('content-type') || '';
      if (!/^text\/event-stream/i.test(type)) {
        controller.abort();
        this.fail(new StreamError('bad_content_type', `expected text/event-stream, got ${type || 'nothing'}`, {
          status: response.status,
        }));
        return;
      }
      const hb = parseFloat(response.headers.get('x-heartbeat-interval') || '');
      if (hb > 0) this.heartbeatMs = hb * 1000;
      this.armWatchdog();
      this.client._setState('streaming');
      if (this.conn !== conn || this.finished) return; // aborted from onStateChange
      const parser = new EventStreamParser();
      const reader = response.body.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (this.conn !== conn || this.finished) return;
          if (done) break;
          for (const event of parser.feed(value)) {
            this.handleEvent(event);
            if (this.conn !== conn || this.finished) return;
          }
        }
      } catch (err) {
        if (this.conn !== conn || this.finished) return;
        this.dropped(new StreamError('connection_lost', `the stream broke: ${err && err.message}`, {
          retryable: true, cause: err,
        }));
        return;
      } finally {
        if (this.conn !== conn || this.finished) controller.abort();
      }
      parser.close();
      this.dropped(new StreamError('connection_lost', 'the stream ended without a done frame', { retryable: true }));
    }

    async httpError(response) {
      let code = `http_${response.status}`;
      let message = response.statusText || `HTTP ${response.status}`;
      try {
        const body = await response.json();
        if (body && body.error) {
          code = body.error.code || code;
          message = body.error.message || message;
        }
      } catch (_) {
        /* not JSON: keep the status line */
      }
      const status = response.status;
      if (status === 404 && code === 'STREAMING_DISABLED' && this.o.fallback && !this.fallback) {
        // Streaming is off here or this user is outside SSE_ROLLOUT_PERCENT: the page still works.
        this.fallback = true;
        this.connectChat();
        return;
      }
      const retryAfterMs = parseRetryAfter(response.headers.get('retry-after'), Date.now());
      const retryable = RETRYABLE_STATUS.has(status);
      const error = new StreamError(code, message, { status, retryable, retryAfterMs });
      if (retryable) this.dropped(error, retryAfterMs);
      else this.fail(error); // 4xx (429 included) never loops; the caller sees retryAfterMs
    }

    /**
     * The non-streaming answer, delivered as if streamed: a metadata frame, one token frame with
     * the whole text, a done frame. Failures take the same paths as the stream's (503 backs off
     * and retries here, 4xx is final), so a page needs no second code path.
     */
    async connectChat() {
      const controller = new AbortController();
      const conn = { close: () => controller.abort() };
      this.conn = conn;
      const headers = { Accept: 'application/json', 'Content-Type': 'application/json', ...(this.o.headers || {}) };
      const tp = this.traceparent();
      if (tp) headers.traceparent = tp;
      const init = { method: 'POST', headers, body: this.body(), signal: controller.signal, cache: 'no-store' };
      if (this.o.withCredentials) init.credentials = 'include';
      let response;
      let answer;
      try {
        response = await this.fetchFn()(this.o.chatUrl, init);
        if (this.conn !== conn || this.finished) return;
        if (!response.ok) {
          await this.httpError(response);
          return;
        }
        answer = await response.json();
      } catch (err) {
        if (this.conn !== conn || this.finished) return;
        this.dropped(new StreamError('network_error', `could not reach the bridge: ${err && err.message}`, {
          retryable: true, cause: err,
        }));
        return;
      }
      if (this.conn !== conn || this.finished) return;
      this.conn = null;
      if (answer === null || typeof answer !== 'object' || Array.isArray(answer)) {
        // `null` is valid JSON: reading its fields threw where nothing caught it, and the
        // stream's promise never settled. A malformed answer is final, like a bad frame.
        this.fail(new StreamError('bad_response', 'the answer was not a JSON object', { status: response.status }));
        return;
      }
      this.attempt = 0;
      this.client._setState('streaming', { fallback: true });
      if (this.finished) return; // aborted from onStateChange
      this.onMetadata({
        type: 'metadata', stream_id: null, request_id: answer.request_id, model: answer.model,
        sources: Array.isArray(answer.sources) ? answer.sources : [], fallback: true,
      });
      if (this.finished) return;
      const text = typeof answer.answer === 'string' ? answer.answer : '';
      this.onTokenFrame({ type: 'token', index: 0, text, fallback: true });
      if (this.finished) return;
      this.complete({ type: 'done', finish_reason: answer.finish_reason, metrics: answer.metrics || null });
    }

    // -- frames ------------------------------------------------------------------------------

    handleEvent(event) {
      this.armWatchdog();
      if (event.id) this.lastEventId = event.id;
      if (event.type === 'heartbeat') {
        this.client.onHeartbeat(event);
        return;
      }
      if (event.type !== 'message') return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        this.fail(new StreamError('bad_frame', 'a frame was not JSON', { cause: err }));
        return;
      }
      this.attempt = 0; // data flows again: the next drop starts the backoff from the bottom
      switch (frame.type) {
        case 'metadata':
          this.onMetadata(frame);
          break;
        case 'token':
          this.onTokenFrame(frame);
          break;
        case 'done':
          this.complete(frame);
          break;
        case 'error':
          this.onErrorFrame(frame);
          break;
        default:
          break; // unknown frame types are ignored (forward compatible)
      }
    }

    onMetadata(frame) {
      const sid = frame.stream_id || null;
      if (this.streamId && sid && sid !== this.streamId && this.pieces.length > 0) {
        // The bridge could not resume and started the answer over: drop what we showed.
        this.pieces = [];
        this.nextIndex = 0;
        this.client.onReset(frame);
      }
      this.streamId = sid || this.streamId;
      this.metadata = frame;
      this.client.onMetadata(frame);
    }

    onTokenFrame(frame) {
      const index = typeof frame.index === 'number' ? frame.index : this.nextIndex;
      if (index < this.nextIndex) return; // replayed after a resume: already shown
      const now = this.o.now();
      if (this.firstTokenAt === null) this.firstTokenAt = now;
      else this.gaps.push(now - this.lastTokenAt);
      this.lastTokenAt = now;
      this.nextIndex = index + 1;
      const text = typeof frame.text === 'string' ? frame.text : '';
      this.pieces.push(text);
      this.client.onToken(text, this.metadata, frame);
    }

    onErrorFrame(frame) {
      const error = new StreamError(frame.code || 'error', frame.message || 'the stream failed', {
        retryable: !!frame.retryable,
      });
      if (error.retryable) {
        this.dropped(error);
      } else if (error.code === 'STREAM_EXPIRED' && this.o.restartWhenExpired && !this.restarted) {
        // The bridge lost the stream (restart, or the resume window passed): ask again, once.
        this.restarted = true;
        this.lastEventId = '';
        this.streamId = null;
        this.pieces = [];
        this.nextIndex = 0;
        this.client.onReset(frame);
        this.dropped(error);
      } else {
        this.fail(error);
      }
    }

    metrics(serverMetrics) {
      const gaps = this.gaps.slice().sort((a, b) => a - b);
      const round = (x) => (x === null ? null : Math.round(x * 10) / 10);
      const duration = this.o.now() - this.startedAt;
      const tokens = this.pieces.length;
      return {
        timeToFirstTokenMs: this.firstTokenAt === null ? null : round(this.firstTokenAt - this.startedAt),
        interTokenMs: { p50: round(percentile(gaps, 50)), max: round(gaps.length ? gaps[gaps.length - 1] : null) },
        tokens,
        tokensPerSecond: duration > 0 ? round((tokens * 1000) / duration) : null,
        reconnects: this.reconnects,
        durationMs: round(duration),
        server: serverMetrics || null,
      };
    }

    complete(frame) {
      const result = {
        text: this.pieces.join(''),
        metadata: this.metadata,
        finishReason: frame.finish_reason || 'stop',
        streamId: this.streamId,
        metrics: this.metrics(frame.metrics),
        fallback: this.fallback,
      };
      this.finish();
      this.client._setState('done', result);
      this.client.onComplete(result);
      this._resolve(result);
    }

    // -- failure, backoff, watchdog ------------------------------------------------------------

    armWatchdog() {
      if (this.watchdog !== null) this.o.clearTimeout(this.watchdog);
      this.watchdog = null;
      if (this.finished) return;
      const limit = Math.min(2147483647, this.heartbeatMs * this.o.watchdogFactor); // setTimeout is 32-bit
      this.watchdog = this.o.setTimeout(() => {
        this.watchdog = null;
        if (this.finished) return;
        this.dropped(new StreamError('heartbeat_timeout', `no frame or heartbeat for ${Math.round(limit)} ms`, {
          retryable: true,
        }));
      }, limit);
    }

    /** A retryable failure: close, then reconnect after backoff (resuming), or give up. */
    dropped(error, retryAfterMs = null) {
      if (this.finished) return;
      this.closeConnection();
      const { baseMs, maxMs, maxAttempts } = this.o.backoff;
      if (this.attempt >= maxAttempts) {
        this.fail(new StreamError('gave_up', `gave up after ${this.attempt} reconnection attempts: ${error.message}`, {
          retryable: false, status: error.status, cause: error,
        }));
        return;
      }
      let delay = backoffDelay(this.attempt, { baseMs, maxMs, random: this.o.random });
      if (retryAfterMs !== null && this.o.honorRetryAfter) delay = Math.min(maxMs, Math.max(delay, retryAfterMs));
      this.attempt += 1;
      this.reconnects += 1;
      this.client._setState('reconnecting', { error, delayMs: delay, attempt: this.attempt });
      this.client.onReconnect({ attempt: this.attempt, delayMs: delay, error, lastEventId: this.lastEventId });
      this.timer = this.o.setTimeout(() => {
        this.timer = null;
        this.connect();
      }, delay);
    }

    fail(error) {
      if (this.finished) return;
      this.finish();
      this.client._setState('error', error);
      this.client.onError(error);
      this._reject(error);
    }

    abort() {
      if (this.finished) return;
      this.finish();
      this.client._setState('aborted');
      this._reject(new StreamError('aborted', 'the stream was aborted'));
    }

    closeConnection() {
      if (this.watchdog !== null) this.o.clearTimeout(this.watchdog);
      this.watchdog = null;
      const conn = this.conn;
      this.conn = null;
      if (conn) conn.close();
    }

    finish() {
      this.finished = true;
      if (this.timer !== null) this.o.clearTimeout(this.timer);
      this.timer = null;
      this.closeConnection();
    }
  }

  const api = {
    BaliZeroStreamClient,
    EventStreamParser,
    StreamError,
    parseEventStream,
    backoffDelay,
    makeTraceparent,
  };
  root.BaliZeroStreamClient = BaliZeroStreamClient;
  root.BaliZeroSSE = api;
  if (typeof module === 'object' && module && module.exports) module.exports = api;
})(globalThis);

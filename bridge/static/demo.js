// The demo page: one question at a time, the answer rendered as it streams (text nodes only,
// never HTML from tokens), sources from the metadata frame, live latency and connection state.
import { BaliZeroStreamClient } from './bali-zero-stream-client.mjs';

const $ = (id) => document.getElementById(id);
const form = $('ask-form');
const queryBox = $('query');
const askButton = $('ask');
const stopButton = $('stop');
const answer = $('answer');
const stateBadge = $('state');
const errorBox = $('error');
const placeholder = $('placeholder');
const stoppedNote = $('stopped');
const sourcesList = $('sources');
const modelLine = $('model');
const stats = { ttft: $('stat-ttft'), rate: $('stat-rate'), tokens: $('stat-tokens'), reconnects: $('stat-reconnects') };

const STATE_LABELS = {
  idle: 'idle', connecting: 'connecting…', streaming: 'streaming', reconnecting: 'reconnecting…',
  done: 'done', error: 'error', aborted: 'stopped',
};

// Exposed for the browser tests (and for curious people in the console).
const demo = { requestId: null, streamId: null, result: null, error: null, states: [] };
window.baliZeroDemo = demo;

let started = 0;
let firstTokenAt = null;
let tokenCount = 0;
let reconnects = 0;
let paintQueued = false;

function setState(state) {
  demo.states.push(state);
  stateBadge.dataset.state = state;
  stateBadge.textContent = STATE_LABELS[state] || state;
  const busy = state === 'connecting' || state === 'streaming' || state === 'reconnecting';
  answer.setAttribute('aria-busy', String(busy));
  stoppedNote.hidden = state !== 'aborted'; // a stopped answer must not read as a complete one
  askButton.disabled = busy;
  stopButton.disabled = !busy;
}

function paintStats() {
  paintQueued = false;
  const now = performance.now();
  stats.ttft.textContent = firstTokenAt === null ? '–' : `${Math.round(firstTokenAt - started)} ms`;
  const seconds = firstTokenAt === null ? 0 : (now - firstTokenAt) / 1000;
  stats.rate.textContent = seconds > 0.05 ? (tokenCount / seconds).toFixed(1) : '–';
  stats.tokens.textContent = String(tokenCount);
  stats.reconnects.textContent = String(reconnects);
}

function queuePaint() {
  if (!paintQueued) {
    paintQueued = true;
    requestAnimationFrame(paintStats);
  }
}

function renderSources(sources) {
  sourcesList.replaceChildren();
  // Scores are relevance values, not percentages: draw each relative to the best source.
  const best = Math.max(0, ...(sources || []).map((s) => Number(s.score || 0)));
  for (const [index, source] of (sources || []).entries()) {
    const item = document.createElement('li');
    item.id = `source-${index + 1}`;
    // The answer cites sources as [1], [2]…, in the order of the metadata frame.
    const number = document.createElement('span');
    number.className = 'number';
    number.textContent = `[${index + 1}]`;
    const title = document.createElement('span');
    title.className = 'title';
    title.textContent = source.title || source.uri || 'Untitled';
    const uri = document.createElement('span');
    uri.className = 'uri';
    uri.textContent = source.uri || '';
    const bar = document.createElement('div');
    bar.className = 'score';
    bar.title = `relevance ${Number(source.score || 0).toFixed(2)}`;
    const fill = document.createElement('span');
    const share = best > 0 ? Number(source.score || 0) / best : 0;
    fill.style.width = `${Math.max(4, Math.min(100, share * 100))}%`;
    bar.append(fill);
    item.append(number, title, uri, bar);
    sourcesList.append(item);
  }
}

const client = new BaliZeroStreamClient({
  baseUrl: '/api/v2/bali-zero/chat-stream',
  onStateChange: setState,
  onMetadata: (meta) => {
    demo.requestId = meta.request_id || null;
    demo.streamId = meta.stream_id || null;
    renderSources(meta.sources);
    modelLine.textContent = meta.model ? `model ${meta.model}` : '';
  },
  onToken: (token) => {
    if (firstTokenAt === null) firstTokenAt = performance.now();
    tokenCount += 1;
    answer.append(token); // a text node: markup in a token stays text
    queuePaint();
  },
  onReset: () => {
    answer.replaceChildren();
    tokenCount = 0;
  },
  onReconnect: () => {
    reconnects += 1;
    queuePaint();
  },
  onComplete: (result) => {
    demo.result = result;
    paintStats();
  },
  onError: (error) => {
    demo.error = { code: error.code, message: error.message, status: error.status, retryAfterMs: error.retryAfterMs };
    let text = error.message;
    const wait = error.retryAfterMs === null ? '' : ` Try again in ${Math.ceil(error.retryAfterMs / 1000)} s.`;
    if (error.code === 'RATE_LIMITED') {
      text = `Too many questions per minute.${wait}`;
    } else if (error.code === 'TOO_MANY_STREAMS') {
      text = `Too many answers streaming at once: wait for one to finish or stop it.${wait}`;
    }
    errorBox.textContent = text;
    errorBox.hidden = false;
    placeholder.hidden = true; // "Ask something…" under an error reads as if nothing happened
  },
});
demo.client = client;

async function ask(query) {
  const method = form.elements.method.value;
  answer.replaceChildren();
  errorBox.hidden = true;
  placeholder.hidden = false;
  Object.assign(demo, { requestId: null, streamId: null, result: null, error: null });
  started = performance.now();
  firstTokenAt = null;
  tokenCount = 0;
  reconnects = 0;
  renderSources([]);
  paintStats();
  try {
    await client.stream({ query, method });
  } catch (error) {
    if (error.name !== 'AbortError') console.warn('stream failed', error);
  }
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const query = queryBox.value.trim();
  if (query) ask(query);
});
queryBox.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.metaKey || event.ctrlKey)) form.requestSubmit();
});
stopButton.addEventListener('click', () => client.abort());
for (const chip of document.querySelectorAll('#suggestions .chip')) {
  chip.addEventListener('click', () => {
    queryBox.value = chip.textContent;
    queryBox.focus();
  });
}
setState('idle');
document.documentElement.dataset.ready = 'true';

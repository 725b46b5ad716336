// The shared SSE vectors (tests/vectors/sse_vectors.json) against the browser client's parser.
// Run: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { EventStreamParser, parseEventStream } from '../../bridge/static/bali-zero-stream-client.mjs';

const { vectors } = JSON.parse(readFileSync(new URL('../vectors/sse_vectors.json', import.meta.url), 'utf8'));
const encoder = new TextEncoder();
const toBytes = (chunk) => (typeof chunk === 'string' ? encoder.encode(chunk) : Uint8Array.from(chunk));

test('the vector file covers every rule of SSE-EDGE-CASES', () => {
  const rules = new Set(vectors.map((v) => v.rule));
  assert.ok(vectors.length >= 60, `only ${vectors.length} vectors`);
  for (const needle of ['line ends', 'join with LF', 'one space', 'not dispatched', 'NUL', 'retry', 'BOM', 'comments',
    'error', 'heartbeat', 'bridge token frames']) {
    assert.ok([...rules].some((r) => r.includes(needle)), `no vector for ${needle}`);
  }
});

for (const vector of vectors) {
  test(`vector: ${vector.name}`, () => {
    const result = parseEventStream(vector.chunks);
    assert.deepEqual(result.events, vector.events);
    if ('retry' in vector) assert.equal(result.retry, vector.retry);
    if ('token_text' in vector) {
      for (const event of result.events) assert.equal(JSON.parse(event.data).text, vector.token_text);
    }
  });

  test(`vector, whole stream re-chunked one byte at a time: ${vector.name}`, () => {
    const all = vector.chunks.flatMap((c) => Array.from(toBytes(c)));
    const parser = new EventStreamParser();
    const events = [];
    for (const byte of all) events.push(...parser.feed(Uint8Array.of(byte)));
    parser.close();
    assert.deepEqual(events, vector.events);
    if ('retry' in vector) assert.equal(parser.retry, vector.retry);
  });
}

test('10 000 one-character token frames in arbitrary chunks', () => {
  const parser = new EventStreamParser();
  let wire = '';
  const chars = [];
  for (let i = 0; i < 10000; i++) {
    const ch = String.fromCodePoint(0x41 + (i % 26), ...(i % 7 === 0 ? [0x1f600] : []));
    chars.push(ch);
    wire += `id: s:${i + 1}\ndata: ${JSON.stringify({ type: 'token', index: i, text: ch })}\n\n`;
  }
  const bytes = encoder.encode(wire);
  const events = [];
  for (let at = 0, step = 1; at < bytes.length; at += step, step = (step * 7 + 3) % 97 + 1) {
    events.push(...parser.feed(bytes.subarray(at, at + step)));
  }
  assert.equal(events.length, 10000);
  assert.equal(events.map((e) => JSON.parse(e.data).text).join(''), chars.join(''));
  assert.equal(parser.lastEventId, 's:10000');
});

test('a 64 KiB token in one data line survives 1 KiB chunks', () => {
  const text = 'é\r\n👩‍👩‍👧'.repeat(6000).slice(0, 65536);
  const bytes = encoder.encode(`id: s:1\ndata: ${JSON.stringify({ type: 'token', index: 0, text })}\n\n`);
  const parser = new EventStreamParser();
  const events = [];
  for (let at = 0; at < bytes.length; at += 1024) events.push(...parser.feed(bytes.subarray(at, at + 1024)));
  assert.equal(events.length, 1);
  assert.equal(JSON.parse(events[0].data).text, text);
});

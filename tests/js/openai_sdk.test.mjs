// The official `openai` npm package against a running bridge's OpenAI-compatible API.
// tests/e2e/test_openai_clients.py starts the stub and the bridge and runs this file with BRIDGE_URL
// (and CANCEL_REQUEST_ID, whose upstream call it then finds cancelled in the stub's log); a plain
// `node --test tests/js/` has no bridge and skips it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const bridgeUrl = process.env.BRIDGE_URL;
const skip = bridgeUrl ? false : 'needs BRIDGE_URL (run by tests/e2e/test_openai_clients.py)';
const client = bridgeUrl ? new OpenAI({ baseURL: `${bridgeUrl}/v1`, apiKey: 'unused', maxRetries: 0 }) : null;
const question = [{ role: 'user', content: 'What is the B211A visa?' }];

test('a streamed answer: role first, the sources in bali_zero, finish_reason last, usage', { skip }, async () => {
  const stream = await client.chat.completions.create({
    model: 'bali-zero', messages: question, stream: true, stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const [first] = chunks;
  assert.equal(first.object, 'chat.completion.chunk');
  assert.equal(first.choices[0].delta.role, 'assistant');
  assert.equal(first.bali_zero.sources[0].title, 'B211A visit visa');
  const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
  assert.match(text, /B211A/);
  assert.match(text, /\[1\]/);
  const usage = chunks.at(-1);
  assert.deepEqual(usage.choices, []);
  assert.equal(usage.usage.completion_tokens, chunks.filter((c) => c.choices[0]?.delta?.content).length);
  assert.equal(chunks.at(-2).choices[0].finish_reason, 'stop');
});

test('the whole answer (stream: false) carries the same text and sources', { skip }, async () => {
  const completion = await client.chat.completions.create({ model: 'bali-zero', messages: question });
  assert.equal(completion.object, 'chat.completion');
  assert.match(completion.choices[0].message.content, /B211A/);
  assert.equal(completion.bali_zero.sources[0].uri, 'corpus://bali-zero/b211a-visit-visa');
});

test('aborting the stream mid-answer closes the connection (the driver checks the upstream cancel)', { skip }, async () => {
  const stream = await client.chat.completions.create(
    { model: 'bali-zero', messages: question, stream: true },
    { headers: { 'x-request-id': process.env.CANCEL_REQUEST_ID } },
  );
  let seen = 0;
  for await (const chunk of stream) {
    if (chunk.choices[0]?.delta?.content) seen += 1;
    if (seen === 3) {
      stream.controller.abort();
      break;
    }
  }
  assert.equal(seen, 3);
});

test('an error before the stream is the SDK error of its status, in OpenAI shape', { skip }, async () => {
  await assert.rejects(
    client.chat.completions.create({ model: 'bali-zero', messages: question, stream: true, tools: [] }),
    (error) => error instanceof OpenAI.BadRequestError && error.param === 'tools' && error.code === 'UNSUPPORTED_PARAMETER',
  );
  await assert.rejects(
    client.chat.completions.create({ model: 'gpt-4o', messages: question, stream: true }),
    (error) => error instanceof OpenAI.NotFoundError && error.code === 'MODEL_NOT_FOUND',
  );
});

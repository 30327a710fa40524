#!/usr/bin/env node
// Closed-loop gRPC load on 127.0.0.1 for benchmarks/server_load.py: N clients, each its own
// connection, each sending its next request when the last is answered. Requests are pre-serialized
// (bytes in, bytes out), so the generator spends as little CPU per request as Node and grpc-js allow
// (for InferStream about half of what Python's grpc.aio client spends; for unary calls more, which
// is why server_load.py drives unary calls from Python).
//
//   node loadgen.js        (jobs on stdin, one JSON object per line; one JSON answer per line)
//
// A job: {"target": "127.0.0.1:PORT", "kind": "unary" | "stream", "clients": N, "offset": I,
// "window_s": S, "warmup_s": W, "timeout_ms": T, "requests": FILE}. FILE holds the requests, each a
// 4-byte little-endian length then the message (InferRequest bytes for unary, StreamRequest bytes
// for stream). Connections and streams stay open from job to job, as a device's would. The answer:
// {"latencies": [seconds...], "codes": {"OK": n, ...}} for requests sent and answered inside the
// window; a stream broken or still unanswered at the end of a job is counted and reopened.
'use strict';

const fs = require('fs');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');

const UNARY = '/splitinfer.v1.SplitInference/Infer';
const STREAM = '/splitinfer.v1.SplitInference/InferStream';
const identity = (x) => x;
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const clients = new Map(); // `${target}/${index}` -> {client, stream}
const requestFiles = new Map();

function readRequests(file) {
  if (!requestFiles.has(file)) {
    const data = fs.readFileSync(file);
    const out = [];
    for (let at = 0; at < data.length;) {
      const n = data.readUInt32LE(at);
      out.push(data.subarray(at + 4, at + 4 + n));
      at += 4 + n;
    }
    if (!out.length) throw new Error(`${file} holds no requests`);
    requestFiles.set(file, out);
  }
  return requestFiles.get(file);
}

// "OK" when a StreamResponse holds a response (field 2) after its request_id (field 1); else the
// error's code name. Mirrors server_load.py _stream_answer_code.
function streamAnswerCode(buf) {
  if (buf[0] === 0x0a && buf[1] < 0x80 && buf[2 + buf[1]] === 0x12) return 'OK';
  let at = buf[0] === 0x0a ? 2 + buf[1] : 0;
  if (buf[at] === 0x1a && buf[at + 2] === 0x08) return CODE_NAMES[buf[at + 3]] || String(buf[at + 3]);
  return 'MALFORMED';
}

const now = () => Number(process.hrtime.bigint()) / 1e9;

function clientFor(target, index) {
  const key = `${target}/${index}`;
  if (!clients.has(key)) {
    clients.set(key, { client: new grpc.Client(target, grpc.credentials.createInsecure(),
      { 'grpc.use_local_subchannel_pool': 1 }), stream: null, onAnswer: null });
  }
  return clients.get(key);
}

function openStream(entry) {
  const call = entry.client.makeBidiStreamRequest(STREAM, identity, identity);
  call.on('data', (answer) => { if (entry.onAnswer) entry.onAnswer(streamAnswerCode(answer)); });
  call.on('error', (err) => {
    if (entry.stream === call) entry.stream = null;
    if (entry.onAnswer) entry.onAnswer(CODE_NAMES[err.code] || String(err.code));
  });
  entry.stream = call;
  return call;
}

function runJob(job) {
  if (!String(job.target).startsWith('127.0.0.1:')) throw new Error(`only 127.0.0.1 is targeted, got ${job.target}`);
  if (!['unary', 'stream'].includes(job.kind)) throw new Error(`kind must be unary or stream, got ${job.kind}`);
  const requests = readRequests(job.requests);
  const latencies = [];
  const codes = {};
  const start = now();
  const measureFrom = start + job.warmup_s, stopAt = start + job.warmup_s + job.window_s;
  const timeoutS = job.timeout_ms / 1e3;
  const record = (sent, code) => {
    const done = now();
    if (done - sent > timeoutS && code === 'OK') code = 'DEADLINE_EXCEEDED';
    if (sent >= measureFrom && done <= stopAt) {
      latencies.push(done - sent);
      codes[code] = (codes[code] || 0) + 1;
    }
  };
  const runs = [];
  const pending = [];
  for (let c = 0; c < job.clients; c += 1) {
    const entry = clientFor(job.target, job.offset + c);
    let k = (job.offset + c) * 7919 + Math.floor(start * 1000);
    if (job.kind === 'unary') {
      runs.push(new Promise((resolve) => {
        const next = () => {
          const sent = now();
          if (sent >= stopAt) return resolve();
          const request = requests[k % requests.length]; k += 1;
          entry.client.makeUnaryRequest(UNARY, identity, identity, request, { deadline: Date.now() + job.timeout_ms },
            (err) => { record(sent, err ? (CODE_NAMES[err.code] || String(err.code)) : 'OK'); next(); });
        };
        next();
      }));
    } else {
      runs.push(new Promise((resolve) => {
        let sent = 0;
        const next = () => {
          sent = now();
          if (sent >= stopAt) { entry.onAnswer = null; return resolve(); }
          const call = entry.stream || openStream(entry);
          call.write(requests[k % requests.length]); k += 1;
        };
        entry.onAnswer = (code) => { record(sent, code); next(); };
        pending.push(entry);
        next();
      }));
    }
  }
  let timer;
  const bound = new Promise((resolve) => { timer = setTimeout(() => resolve('late'), (job.warmup_s + job.window_s) * 1e3 + 2 * job.timeout_ms); });
  return Promise.race([Promise.all(runs), bound]).then((outcome) => {
    clearTimeout(timer);
    if (outcome === 'late') { // a stream the server never answered: cancel it, reopen it next job
      for (const entry of pending) {
        if (entry.onAnswer && entry.stream) { entry.onAnswer = null; entry.stream.cancel(); entry.stream = null; }
      }
      codes.DEADLINE_EXCEEDED = (codes.DEADLINE_EXCEEDED || 0) + 1;
    }
    return { latencies, codes };
  });
}

const lines = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
lines.on('line', (line) => {
  queue = queue.then(() => runJob(JSON.parse(line)))
    .then((result) => new Promise((resolve) => process.stdout.write(JSON.stringify(result) + '\n', resolve)))
    .catch((err) => new Promise((resolve) => process.stdout.write(JSON.stringify({ error: String(err.stack || err) }) + '\n', resolve)));
});
lines.on('close', () => queue.then(() => { for (const { client } of clients.values()) client.close(); process.exit(0); }));

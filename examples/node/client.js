#!/usr/bin/env node
// One request to splitinfer-serve from Node.js: a token packet built by hand, as protos/codec.py
// defines it, sent with @grpc/grpc-js on the project's own protos/splitinfer.proto.
//
//   npm install
//   node client.js --target 127.0.0.1:50051 --model NAME --sha256 HEX --dim D [--tokens 5]
//
// --sha256 is the sha256 of the model folder's manifest.json bytes (`sha256sum model/manifest.json`),
// --dim the model's token dimension. The packet (fp32, uncompressed):
//   num_tokens K, dim D, encoding ENCODING_FP32, compression COMPRESSION_NONE, no scales,
//   positions 0, 2, 4, ... (CLS first, strictly increasing), payload K*D float32 little-endian
//   row-major, uncompressed_size = K*D*4. Token j of row i is ((7i + 3j) mod 17 - 8) / 8.
// Prints the answer as one JSON object; a failed call prints "CODE: details" on stderr and exits 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = {
    proto: path.join(__dirname, '..', '..', 'protos', 'splitinfer.proto'),
    tokens: '5', timeout: '5', 'request-id': 'node-client',
  };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`expected --name value pairs, got ${argv[i]}`);
    }
    args[argv[i].slice(2)] = argv[i + 1];
  }
  for (const name of ['target', 'model', 'sha256', 'dim']) {
    if (!args[name]) throw new Error(`--${name} is required`);
  }
  return args;
}

function tokenValue(row, col) {
  return (((7 * row + 3 * col) % 17) - 8) / 8; // exact in float32
}

function buildPacket(numTokens, dim) {
  const payload = Buffer.alloc(numTokens * dim * 4);
  for (let i = 0; i < numTokens; i += 1) {
    for (let j = 0; j < dim; j += 1) {
      payload.writeFloatLE(tokenValue(i, j), 4 * (i * dim + j));
    }
  }
  return {
    num_tokens: numTokens,
    dim,
    encoding: 'ENCODING_FP32',
    compression: 'COMPRESSION_NONE',
    scales: Buffer.alloc(0),
    positions: Array.from({ length: numTokens }, (_, i) => 2 * i),
    payload,
    uncompressed_size: payload.length,
    group_size: 0,
    scales_encoding: 'ENCODING_UNSPECIFIED',
  };
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(`splitinfer node client: ${err.message}`);
    process.exit(2);
  }
  const definition = protoLoader.loadSync(args.proto, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const { SplitInference } = grpc.loadPackageDefinition(definition).splitinfer.v1;
  const client = new SplitInference(args.target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': 4 * 1024 * 1024,
    'grpc.max_receive_message_length': 4 * 1024 * 1024,
  });
  const request = {
    model: args.model,
    manifest_sha256: args.sha256,
    request_id: args['request-id'],
    packet: buildPacket(Number(args.tokens), Number(args.dim)),
  };
  const deadline = new Date(Date.now() + 1000 * Number(args.timeout));
  client.Infer(request, { deadline }, (err, response) => {
    client.close();
    if (err) {
      console.error(`${grpc.status[err.code]}: ${err.details}`);
      process.exit(1);
    }
    console.log(JSON.stringify({
      request_id: response.request_id,
      label: response.label,
      probabilities: response.probabilities,
      model_version: response.model_version,
      timings: response.timings,
    }));
  });
}

main();

#!/usr/bin/env node
// A gradmesh worker client in Node.js, written from protos/gradmesh/v1/*.proto alone.
//
//   node client.js [host:port]        (default: $GRADMESH_WORKER, else 127.0.0.1:50051)
//
// 1. Capabilities, then RegisterGraph of a linear layer + MSE loss built here as a Graph
//    message (its id is checked against SHA-256 of the graph's canonical bytes, computed
//    here too).
//    A second graph spells out defaults: its id is computed here by graph.proto's steps,
//    with the defaults from Capabilities.op_schemas.
// 2. ComputeGradients with tensors as raw little-endian bytes; the gradients are checked
//    against the closed form computed in plain JS.
// 3. ComputeGradientsStream with a wide layer (megabytes of parameters and data, sent in
//    Chunk frames), the streamed-back gradient checked the same way.
// 4. A malformed request; the google.rpc.BadRequest in `grpc-status-details-bin` is
//    decoded and its field path printed.
// Prints one line per step and "ALL OK" at the end; exits 1 on any mismatch or error.
'use strict';

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '../../protos');
const TIMEOUT_S = Number(process.env.GRADMESH_TIMEOUT || 60);
const TOLERANCE = 1e-5;

// ------------------------------------------------------------------ protos ------------
// keepCase: field names as in the .proto (tensor_index, not tensorIndex); oneofs: a frame
// says which member it holds in `kind`; int64 as JS numbers (shapes and offsets are far
// below 2^53); bytes as Buffers.
const LOADER = { keepCase: true, longs: Number, enums: String, bytes: Buffer,
  defaults: true, arrays: true, oneofs: true, includeDirs: [PROTOS] };
const pkg = grpc.loadPackageDefinition(
  protoLoader.loadSync('gradmesh/v1/worker.proto', LOADER)).gradmesh.v1;

// The same files through protobufjs directly, for the graph id (the canonical bytes of a
// Graph, see graph.proto) and for the error details (google.rpc.Status, BadRequest).
const root = new protobuf.Root();
root.resolvePath = (origin, target) =>
  (path.isAbsolute(target) || target.startsWith('google/protobuf/')) ? target
    : path.join(PROTOS, target);
root.loadSync(['gradmesh/v1/graph.proto', path.join(__dirname, 'google_rpc.proto')],
  { keepCase: true });
const GraphType = root.lookupType('gradmesh.v1.Graph');
const StatusType = root.lookupType('google.rpc.Status');
const BadRequestType = root.lookupType('google.rpc.BadRequest');

// ------------------------------------------------------------------ tensors -----------
// Tensor.data: little-endian, C order, exactly product(shape) * 4 bytes for FLOAT32.
const BIG_ENDIAN = os.endianness() === 'BE';
const product = (shape) => shape.reduce((a, d) => a * Number(d), 1);

function f32Tensor(values, shape) {
  const a = values instanceof Float32Array ? values : Float32Array.from(values);
  if (a.length !== product(shape)) throw new Error(`${a.length} values for shape [${shape}]`);
  const data = Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  return { dtype: 'FLOAT32', shape, data: BIG_ENDIAN ? Buffer.from(data).swap32() : data };
}

function f32Values(tensor) {
  if (tensor.dtype !== 'FLOAT32') throw new Error(`expected FLOAT32, got ${tensor.dtype}`);
  if (tensor.data.length !== product(tensor.shape) * 4) {
    throw new Error(`${tensor.data.length} bytes for shape [${tensor.shape}]`);
  }
  // A copy into memory of our own: a received Buffer may sit at any offset of a shared
  // ArrayBuffer, and a Float32Array view needs a multiple of 4.
  const values = new Float32Array(tensor.data.length / 4);
  new Uint8Array(values.buffer).set(tensor.data);
  if (BIG_ENDIAN) Buffer.from(values.buffer).swap32();
  return values;
}

const named = (name, tensor) => ({ name, tensor });

// A small deterministic PRNG (mulberry32), so every run sends the same numbers.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ------------------------------------------------------------------ the model ---------
// loss = mse_loss(linear(x, w, b), y): mean over all B*O elements of (x w^T + b - y)^2.
// Values: inputs 0..3 (w, b, x, y), then one per node (4: linear, 5: mse_loss).
// Op names and argument order as the Python SDK's tracer records them; mse_loss's one
// attribute, reduction, defaults to "mean" and is therefore omitted (canonical form).
function linearMseGraph(inFeatures, outFeatures) {
  return {
    version: 1,
    inputs: [
      { name: 'w', role: 'PARAM', dtype: 'FLOAT32', shape: [outFeatures, inFeatures] },
      { name: 'b', role: 'PARAM', dtype: 'FLOAT32', shape: [outFeatures] },
      { name: 'x', role: 'DATA', dtype: 'FLOAT32', shape: [-1, inFeatures] },
      { name: 'y', role: 'DATA', dtype: 'FLOAT32', shape: [-1, outFeatures] },
    ],
    nodes: [
      { op: 'linear', inputs: [2, 0, 1] },     // value 4: x @ w^T + b   (linear(x, w, b))
      { op: 'mse_loss', inputs: [4, 3] },      // value 5: mean((pred - y)^2)
    ],
    outputs: [{ name: 'loss', value: 5 }],
  };
}

// The graph id: lowercase hex SHA-256 of the Graph serialized with fields in number
// order and no default values written. protobufjs writes fields in number order, but it
// also writes a field set to its default (an Output with `value: 0`), which canonical
// bytes omit; leave such fields out (as here), or simply use the id RegisterGraph returns.
function localGraphId(graph) {
  const bytes = GraphType.encode(GraphType.fromObject(graph)).finish();
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

// The id of any graph, by graph.proto's steps ("The graph id"): drop each attribute equal
// to the op's default (Capabilities.op_schemas), sort the others by name, hash the bytes.
const ATTR_FIELDS = ['i', 'f', 'b', 's', 'ints', 'floats', 'dtype', 'none'];
const attrField = (a) => a.value || ATTR_FIELDS.find((k) => a[k] !== undefined);
const doubleBits = (v) => Buffer.from(new Float64Array([v]).buffer).toString('hex');
const sameDouble = (p, q) => (Number.isNaN(p) && Number.isNaN(q)) || doubleBits(p) === doubleBits(q);

function sameAttribute(a, d) {
  const field = attrField(a);
  if (field !== attrField(d)) return false;
  if (field === 'ints' || field === 'floats') {
    const [x, y] = [a[field].values || [], d[field].values || []];
    const same = field === 'ints' ? (p, q) => Number(p) === Number(q) : sameDouble;
    return x.length === y.length && x.every((v, k) => same(v, y[k]));
  }
  if (field === 'f') return sameDouble(a.f, d.f);
  return a[field] === d[field];
}

function canonicalGraphId(graph, schemas) {
  const defaults = Object.fromEntries(schemas.map((s) =>
    [s.name, Object.fromEntries(s.attributes.map((a) => [a.name, a.default]))]));
  const nodes = graph.nodes.map((node) => ({
    ...node,
    attrs: (node.attrs || [])
      .filter((a) => !sameAttribute(a, defaults[node.op][a.name]))
      .sort((p, q) => Buffer.compare(Buffer.from(p.name), Buffer.from(q.name))),
  }));
  return localGraphId({ ...graph, nodes });
}

// Closed form, in float64: r = x w^T + b - y, loss = sum r^2 / (B O),
// dw = 2/(B O) r^T x, db = 2/(B O) sum_b r.
function closedForm(w, b, x, y, batch, inF, outF) {
  const scale = 2 / (batch * outF);
  const dw = new Float64Array(outF * inF);
  const db = new Float64Array(outF);
  let loss = 0;
  for (let n = 0; n < batch; n++) {
    for (let o = 0; o < outF; o++) {
      let pred = b[o];
      for (let i = 0; i < inF; i++) pred += x[n * inF + i] * w[o * inF + i];
      const r = pred - y[n * outF + o];
      loss += r * r;
      db[o] += scale * r;
      for (let i = 0; i < inF; i++) dw[o * inF + i] += scale * r * x[n * inF + i];
    }
  }
  return { loss: loss / (batch * outF), w: dw, b: db };
}

// Largest |got - want| relative to max(1, |want|).
function maxError(got, want) {
  let worst = 0;
  for (let k = 0; k < want.length; k++) {
    worst = Math.max(worst, Math.abs(got[k] - want[k]) / Math.max(1, Math.abs(want[k])));
  }
  return worst;
}

// ------------------------------------------------------------------ calls -------------
const callOptions = () => ({ deadline: Date.now() + TIMEOUT_S * 1000 });

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.GRADMESH_TOKEN) md.set('authorization', `Bearer ${process.env.GRADMESH_TOKEN}`);
  return md;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), callOptions(),
      (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// ComputeGradientsStream: one StreamFrame{request} whose tensors have dtype and shape but
// no data, then StreamFrame{chunk} with the bytes of every tensor in header order (all
// `parameters`, then all `data`), each cut into pieces of at most chunkBytes with their
// byte offset within the tensor; then the send side is closed. The reply: a `response`
// frame (tensors without data), then the chunks of loss, outputs..., gradients... in that
// order; a later `response` frame, if any, carries only timings.
async function computeGradientsStream(client, request, chunkBytes) {
  const buffers = [];
  const strip = (list) => list.map(({ name, tensor }) => {
    buffers.push(tensor.data);
    return { name, tensor: { dtype: tensor.dtype, shape: tensor.shape } };
  });
  const header = { ...request, parameters: strip(request.parameters), data: strip(request.data) };

  const call = client.ComputeGradientsStream(metadata(), callOptions());
  const received = new Promise((resolve, reject) => {
    let response = null;
    let slots = [];
    let chunksIn = 0;
    call.on('data', (frame) => {
      if (frame.kind === 'response' && response === null) {
        response = frame.response;
        const tensors = [response.loss, ...response.outputs.map((o) => o.tensor),
          ...response.gradients.map((g) => g.tensor)];
        slots = tensors.map((t) => ({ t, buf: Buffer.alloc(product(t.shape) * 4), filled: 0 }));
      } else if (frame.kind === 'response') {
        response.timings = frame.response.timings;          // trailing frame: timings only
      } else if (frame.kind === 'chunk') {
        const { tensor_index: index, offset, data } = frame.chunk;
        const slot = slots[index];
        if (!slot || offset !== slot.filled || offset + data.length > slot.buf.length) {
          call.cancel();
          reject(new Error(`unexpected chunk: tensor ${index} offset ${offset}`));
          return;
        }
        data.copy(slot.buf, offset);
        slot.filled += data.length;
        chunksIn += 1;
      }
    });
    call.on('error', reject);
    call.on('end', () => {
      const short = slots.findIndex((s) => s.filled !== s.buf.length);
      if (response === null || short >= 0) {
        reject(new Error(`stream ended early (tensor ${short})`));
        return;
      }
      for (const s of slots) s.t.data = s.buf;
      resolve({ response, chunksIn });
    });
  });

  let chunksOut = 0;
  const send = async () => {
    const write = async (frame) => { if (!call.write(frame)) await once(call, 'drain'); };
    await write({ request: header });
    for (const [index, buf] of buffers.entries()) {
      for (let offset = 0; offset < buf.length; offset += chunkBytes) {
        await write({ chunk: { tensor_index: index, offset,
          data: buf.subarray(offset, offset + chunkBytes) } });
        chunksOut += 1;
      }
    }
    call.end();
  };
  send().catch(() => {});                  // a failed call is reported by `received`
  const result = await received;
  return { ...result, chunksOut };
}

// The error details: grpc-status-details-bin holds a google.rpc.Status whose details are
// Any messages; a google.rpc.BadRequest among them names the offending fields.
function errorDetails(err) {
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  const violations = [];
  if (raw.length) {
    const status = StatusType.decode(raw[0]);
    for (const any of status.details) {
      if (any.type_url.endsWith('/google.rpc.BadRequest')) {
        violations.push(...BadRequestType.decode(any.value).field_violations);
      }
    }
  }
  return { code, message: err.details, violations };
}

// ------------------------------------------------------------------ main --------------
async function main() {
  const address = process.argv[2] || process.env.GRADMESH_WORKER || '127.0.0.1:50051';
  const client = new pkg.Worker(address, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': 80 * 1024 * 1024,
    'grpc.max_send_message_length': 80 * 1024 * 1024,
  });
  let failures = 0;
  const check = (ok, line) => { console.log(`${line} ${ok ? 'OK' : 'FAILED'}`); if (!ok) failures++; };

  // 1. What the worker offers, then register the graph.
  const caps = await unary(client, 'Capabilities', {});
  const missing = ['linear', 'mse_loss'].filter((op) => !caps.ops.includes(op));
  const chunkBytes = Math.min(4 << 20, Math.max(1 << 20, caps.limits.chunk_bytes || (1 << 20)));
  console.log(`capabilities: backend=${caps.backend} ops=${caps.ops.length} ` +
    `chunk_bytes=${caps.limits.chunk_bytes} max_message_bytes=${caps.limits.max_message_bytes} ` +
    `gradmesh=${caps.versions.gradmesh || '?'}`);
  if (missing.length) throw new Error(`the worker lacks the ops ${missing}`);

  const [inF, outF, batch] = [3, 2, 4];
  const graph = linearMseGraph(inF, outF);
  const { graph_id: graphId } = await unary(client, 'RegisterGraph', { graph });
  check(graphId === localGraphId(graph), `register: graph_id=${graphId} equals local SHA-256`);

  // The same model with defaults spelled out and attributes unsorted, plus one that is not
  // a default: the worker's id is that of the canonical form, computed here as well.
  const spelled = linearMseGraph(inF, outF);
  spelled.nodes.splice(1, 0, { op: 'leaky_relu', inputs: [4],
    attrs: [{ name: 'negative_slope', f: 0.01 }] });
  spelled.nodes[2] = { op: 'mse_loss', inputs: [5, 3], attrs: [{ name: 'reduction', s: 'sum' }] };
  spelled.nodes[0].attrs = [];
  spelled.outputs = [{ name: 'loss', value: 6 }];
  const { graph_id: spelledId } = await unary(client, 'RegisterGraph', { graph: spelled });
  check(spelledId === canonicalGraphId(spelled, caps.op_schemas) &&
    spelledId !== localGraphId(spelled) && caps.op_schemas.length === caps.ops.length,
  `canonical: graph_id=${spelledId} computed from op_schemas (${caps.op_schemas.length}) equals the worker's`);

  // 2. Gradients over raw bytes, checked against the closed form.
  const rand = rng(7);
  const uniform = (n) => Float32Array.from({ length: n }, () => rand() * 2 - 1);
  const [w, b, x, y] = [uniform(outF * inF), uniform(outF), uniform(batch * inF), uniform(batch * outF)];
  const res = await unary(client, 'ComputeGradients', {
    graph_id: graphId,
    parameters: [named('w', f32Tensor(w, [outF, inF])), named('b', f32Tensor(b, [outF]))],
    data: [named('x', f32Tensor(x, [batch, inF])), named('y', f32Tensor(y, [batch, outF]))],
  });
  const want = closedForm(w, b, x, y, batch, inF, outF);
  const grads = Object.fromEntries(res.gradients.map((g) => [g.name, f32Values(g.tensor)]));
  const errs = [maxError(f32Values(res.loss), [want.loss]), maxError(grads.w, want.w),
    maxError(grads.b, want.b)];
  check(Math.max(...errs) <= TOLERANCE && res.gradients.map((g) => g.name).join() === 'w,b',
    `gradients: loss=${f32Values(res.loss)[0].toFixed(6)} max error ` +
    `loss=${errs[0].toExponential(1)} w=${errs[1].toExponential(1)} ` +
    `b=${errs[2].toExponential(1)} (tolerance ${TOLERANCE}) matched`);

  // 3. A wide layer through the stream: w and x of 4 MiB each go up in chunks, dw (4 MiB)
  // comes back in chunks. Values are multiples of 1/16 and small integers, so every sum
  // is exact in float32 whatever the summation order, and the check is bit for bit.
  const [wideIn, wideOut, wideBatch] = [1 << 18, 4, 4];
  const wideGraph = linearMseGraph(wideIn, wideOut);
  const step = (n, f) => Float32Array.from({ length: n }, f);
  const ww = step(wideOut * wideIn, () => Math.floor(rand() * 17 - 8) / 16);
  const wb = step(wideOut, () => Math.floor(rand() * 17 - 8) / 16);
  const wx = step(wideBatch * wideIn, () => Math.floor(rand() * 5) - 2);
  const wy = step(wideBatch * wideOut, () => Math.floor(rand() * 5) - 2);
  const started = Date.now();
  const streamed = await computeGradientsStream(client, {
    graph: wideGraph,                      // inline: registered as a side effect
    parameters: [named('w', f32Tensor(ww, [wideOut, wideIn])), named('b', f32Tensor(wb, [wideOut]))],
    data: [named('x', f32Tensor(wx, [wideBatch, wideIn])), named('y', f32Tensor(wy, [wideBatch, wideOut]))],
    gradients: ['w'],
  }, chunkBytes);
  const wideWant = closedForm(ww, wb, wx, wy, wideBatch, wideIn, wideOut);
  const dw = streamed.response.gradients.find((g) => g.name === 'w');
  const dwValues = dw ? f32Values(dw.tensor) : new Float32Array(0);
  const exact = dw !== undefined && dwValues.length === wideWant.w.length &&
    dwValues.every((v, k) => v === Math.fround(wideWant.w[k]));
  const wideErr = dw ? maxError(dwValues, wideWant.w) : Infinity;
  const sentBytes = (ww.length + wb.length + wx.length + wy.length) * 4;
  check(wideErr <= TOLERANCE, `stream: sent ${sentBytes} bytes in ${streamed.chunksOut} chunks, ` +
    `received loss and dw [${dw ? dw.tensor.shape : "?"}] in ${streamed.chunksIn} chunks ` +
    `(${Date.now() - started} ms), max error ${wideErr.toExponential(1)}, ` +
    `${exact ? 'bitwise equal' : 'not bitwise equal'}; round trip`);

  // 4. A bad request: w declared [2, 3] (24 bytes) but carrying 5 floats (20 bytes).
  try {
    const short = { ...f32Tensor(w.subarray(0, 5), [5]), shape: [outF, inF] };
    await unary(client, 'ComputeGradients', {
      graph_id: graphId,
      parameters: [named('w', short), named('b', f32Tensor(b, [outF]))],
      data: [named('x', f32Tensor(x, [batch, inF])), named('y', f32Tensor(y, [batch, outF]))],
    });
    check(false, 'error: the malformed request was accepted');
  } catch (err) {
    const { code, message, violations } = errorDetails(err);
    const fields = violations.map((v) => v.field);
    console.log(`error: ${code}: ${message}`);
    check(code === 'INVALID_ARGUMENT' && fields.length > 0,
      `error: field path ${fields.join(', ') || '(none)'}`);
  }

  client.close();
  if (failures) throw new Error(`${failures} check(s) failed`);
  console.log('ALL OK');
}

main().catch((err) => {
  console.error(`FAILED: ${err.stack || err}`);
  process.exit(1);
});

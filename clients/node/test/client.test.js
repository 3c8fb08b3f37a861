'use strict';
// Tests of the Node.js client against a LIVE loupe cluster with TLS and token auth, started by
// tests/integration/test_node_client.py, which passes (env):
//   LOUPE_TEST_ADDRESS            broker host:port (TLS)
//   LOUPE_TEST_CA_FILE            CA that signed the broker certificate
//   LOUPE_TEST_READ_TOKEN_FILE    file with a read token
//   LOUPE_TEST_WRITE_TOKEN_FILE   file with a write token
//   LOUPE_TEST_IMAGES             JSON: {db: [{id, path, photo}], queries: [{photo, path}], corrupt: path}
//   LOUPE_TEST_PY_CODES           JSON: {case: status name} the Python client got for the bad inputs
// Without LOUPE_TEST_ADDRESS every test is skipped (run them through pytest).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { LoupeClient, status, tokenFromEnv } = require('../src');

const env = process.env;
const live = !!env.LOUPE_TEST_ADDRESS;
const skip = live ? false : 'no live cluster: set LOUPE_TEST_ADDRESS (tests/integration/test_node_client.py does)';
const images = live ? JSON.parse(fs.readFileSync(env.LOUPE_TEST_IMAGES, 'utf8')) : { db: [], queries: [] };
const pyCodes = live ? JSON.parse(env.LOUPE_TEST_PY_CODES) : {};

function client(token, extra = {}) {
  return new LoupeClient(env.LOUPE_TEST_ADDRESS, { token, caFile: env.LOUPE_TEST_CA_FILE, ...extra });
}
const readToken = () => tokenFromEnv(env.LOUPE_TEST_READ_TOKEN_FILE);
const writeToken = () => tokenFromEnv(env.LOUPE_TEST_WRITE_TOKEN_FILE);

async function codeOf(promise) {
  try {
    await promise;
  } catch (err) {
    return status[err.code];
  }
  return 'OK';
}

test('health is open; everything else needs a token', { skip }, async () => {
  const c = client(null);
  try {
    assert.equal(await c.health(), 'SERVING');
    assert.equal(await c.health('loupe.v1.Retrieval'), 'SERVING');
    assert.equal(await codeOf(c.stats()), 'UNAUTHENTICATED');
    assert.equal(await codeOf(c.search({ image: fs.readFileSync(images.queries[0].path), k: 3 })), 'UNAUTHENTICATED');
  } finally {
    c.close();
  }
});

test('a read token cannot add', { skip }, async () => {
  const c = client(readToken());
  try {
    const img = images.db[0];
    assert.equal(await codeOf(c.addImages([{ id: img.id, image: fs.readFileSync(img.path) }])), 'PERMISSION_DENIED');
    assert.equal(await codeOf(c.delete([img.id])), 'PERMISSION_DENIED');
  } finally {
    c.close();
  }
});

test('index, search, verify, delete', { skip }, async (t) => {
  const w = client(writeToken());
  const r = client(readToken());
  t.after(() => { w.close(); r.close(); });
  const db = images.db.map((x) => ({ id: x.id, image: fs.readFileSync(x.path), metadata: { photo: x.photo } }));
  const added = await w.addImages(db, { batchSize: 3 });
  assert.equal(added.added, db.length);
  assert.ok(added.seconds > 0);
  const stats = await r.stats();
  assert.equal(stats.images, db.length);
  assert.equal(stats.shards.length, 2);
  assert.ok(stats.dim > 0 && stats.extractors.length === 1);

  for (const q of images.queries) {
    const resp = await r.searchFile(q.path, { k: 4 });
    assert.equal(resp.partial, false);
    assert.equal(resp.results.length, 4);
    const top = resp.results[0];
    assert.equal(top.metadata.photo, q.photo, `query ${q.photo}: got ${resp.results.map((x) => x.id)}`);
    assert.ok(top.id.startsWith(q.photo + '/'));
    assert.equal(typeof top.score, 'number');
    assert.ok(Number.isInteger(top.shard_id) && top.shard_id >= 0 && top.shard_id < 2);
    const scores = resp.results.map((x) => x.score);
    assert.deepEqual(scores, [...scores].sort((a, b) => b - a));
    assert.ok(Math.abs(top.stages.global - top.score) < 1e-5, 'without rerank the score is the global similarity');
    assert.ok(resp.timings.some((x) => x.stage === 'total' && x.seconds > 0));
  }

  // geometric verification: an exact copy of an indexed image verifies with many inliers
  const exact = images.db[0];
  const ver = await r.searchFile(exact.path, { k: 3, rerank: { verify: { enabled: true } }, returnMatches: true });
  const best = ver.results[0];
  assert.equal(best.id, exact.id);
  assert.equal(best.verified, true);
  assert.ok(best.stages.inliers >= 10, `inliers ${best.stages.inliers}`);
  assert.ok(best.confidence > 0 && best.confidence <= 1);
  assert.ok(ver.query_confidence > 0 && ver.query_confidence <= 1);
  assert.equal(best.matches.query_points.dtype, 'DTYPE_FLOAT32');
  assert.deepEqual(best.matches.query_points.shape, [best.stages.inliers, 2]);

  // paging
  const full = (await r.searchFile(images.queries[0].path, { k: 5 })).results.map((x) => x.id);
  const page = (await r.searchFile(images.queries[0].path, { k: 2, offset: 2 })).results.map((x) => x.id);
  assert.deepEqual(page, full.slice(2, 4));

  // issue 13: get by id, list with a filter, search by stored id, a batch with one bad query
  const got = await r.getImages([db[0].id, 'no-such-id'], { withVector: true });
  assert.deepEqual(got.images.map((x) => x.id), [db[0].id]);
  assert.deepEqual(got.missing, ['no-such-id']);
  assert.equal(got.images[0].vector.dtype, 'DTYPE_FLOAT32');
  const listed = await r.listImages({ pageSize: 100, filter: { all: [{ key: 'photo', equals: db[0].metadata.photo }] } });
  assert.ok(listed.images.length >= 1 && listed.images.every((x) => x.metadata.photo === db[0].metadata.photo));
  const like = await r.search({ id: db[0].id, k: 2 });
  assert.ok(!like.results.some((x) => x.id === db[0].id));
  const batch = await r.searchBatch([{ id: db[0].id, k: 2 }, { image: Buffer.from('not an image'), k: 2 }]);
  assert.deepEqual(batch.results.map((x) => x.status.code), [0, 3]);

  // issue 27: the learned whitening from pairs of images that show the same object
  const same = db.filter((x) => x.metadata.photo === db[0].metadata.photo).map((x) => x.id);
  const fit = await w.fitWhitening({ pairs: [[same[0], same[1]]], dim: 3 });
  assert.equal(fit.pairs, 1);
  assert.equal(fit.dim, 3);
  assert.equal((await r.stats()).whitened, true);
  assert.equal(await codeOf(w.fitWhitening({ pairs: [[same[0], 'no-such-id']] })), 'NOT_FOUND');
  await w.fitWhitening({ remove: true });
  assert.equal((await r.stats()).whitened, false);

  const del = await w.delete([db[db.length - 1].id, 'no-such-id']);
  assert.deepEqual(del.deleted, [db[db.length - 1].id]);
  assert.deepEqual(del.missing, ['no-such-id']);
  assert.equal((await r.stats()).images, db.length - 1);
});

test('bad input gets the same status codes as the Python client', { skip }, async (t) => {
  const w = client(writeToken());
  t.after(() => w.close());
  const dim = (await w.stats()).dim;
  const query = fs.readFileSync(images.queries[0].path);
  const cases = {
    k_zero: () => w.search({ image: query, k: 0 }),
    k_too_large: () => w.search({ image: query, k: 1001 }),
    no_query: () => w.search({ k: 3 }),
    corrupt_image: () => w.search({ image: fs.readFileSync(images.corrupt), k: 3 }),
    wrong_vector_dim: () => w.search({ vector: new Float32Array(dim + 1), k: 3 }),
    bad_verify_model: () => w.search({ image: query, k: 3, rerank: { verify: { enabled: true, model: 'nonsense' } } }),
    delete_empty: () => w.delete([]),
    delete_unknown: () => w.delete(['never-added']),
    add_empty_id: () => w.addImages([{ id: '', image: query }]),
  };
  assert.deepEqual(Object.keys(cases).sort(), Object.keys(pyCodes).sort());
  for (const [name, call] of Object.entries(cases)) {
    assert.equal(await codeOf(call()), pyCodes[name], name);
  }
});

test('a deadline gives DEADLINE_EXCEEDED', { skip }, async () => {
  const c = client(readToken());
  try {
    await c.waitReady();
    const query = fs.readFileSync(images.queries[0].path);
    assert.equal(await codeOf(c.search({ image: query, k: 3, deadlineMs: 1 })), 'DEADLINE_EXCEEDED');
  } finally {
    c.close();
  }
});

test('TLS: the CA file is required; plaintext is refused', { skip }, async () => {
  const systemRoots = new LoupeClient(env.LOUPE_TEST_ADDRESS, { token: readToken(), tls: true });
  const plain = new LoupeClient(env.LOUPE_TEST_ADDRESS, { token: readToken() });
  try {
    assert.equal(await codeOf(systemRoots.stats({ deadlineMs: 5000 })), 'UNAVAILABLE');
    assert.equal(await codeOf(plain.stats({ deadlineMs: 5000 })), 'UNAVAILABLE');
  } finally {
    systemRoots.close();
    plain.close();
  }
});

test('the example script runs', { skip }, async () => {
  const script = path.join(__dirname, '..', 'examples', 'search.js');
  const out = await new Promise((resolve, reject) => {
    execFile(process.execPath, [script, env.LOUPE_TEST_ADDRESS, images.queries[0].path, '3', '--verify'], {
      env: { ...env, LOUPE_TOKEN: '', LOUPE_TOKEN_FILE: env.LOUPE_TEST_READ_TOKEN_FILE, LOUPE_TLS_CA_FILE: env.LOUPE_TEST_CA_FILE },
      timeout: 60000,
    }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
  });
  assert.match(out, new RegExp(`^\\s+1 .* ${images.queries[0].photo}/`, 'm'));
  assert.match(out, /timings \(ms\): /);
});

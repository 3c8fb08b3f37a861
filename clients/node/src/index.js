'use strict';
/**
 * Node.js client of loupe's public gRPC API (`loupe.v1.Retrieval`).
 *
 * The service definition is loaded at run time with @grpc/proto-loader from the .proto files the
 * package ships in `protos/` (copies of the repository's top-level protos/, the single source,
 * written by `make protos`; `npm pack` refuses stale copies). Field names are kept as in the .proto
 * (`return_matches`, `missing_shards`), enums are strings (`"DTYPE_FLOAT32"`), bytes are
 * Buffers, int64 values are JavaScript numbers.
 *
 * Authentication: a bearer token sent as `authorization: Bearer <token>` metadata on every
 * call. TLS: a CA file (PEM) that signed the broker's certificate.
 */
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const MiB = 1024 * 1024;
const DEFAULT_PROTOS_DIR = path.resolve(__dirname, '..', 'protos');
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

/** gRPC health checking (grpc.health.v1), declared inline: it is not part of loupe's protos. */
const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
    },
    Health: { methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } } },
  } } } } } } },
};

/**
 * Load the `loupe.v1` package definition.
 * @param {string} [protosDir] directory holding `loupe/v1/*.proto` (default: the package's protos/;
 *   env LOUPE_PROTOS_DIR overrides, e.g. to load a newer loupe.v1 than the package ships)
 */
function loadProtos(protosDir) {
  const dir = protosDir || process.env.LOUPE_PROTOS_DIR || DEFAULT_PROTOS_DIR;
  const file = path.join(dir, 'loupe', 'v1', 'retrieval.proto');
  if (!fs.existsSync(file)) {
    throw new Error(`protosDir: ${file} not found (set protosDir or LOUPE_PROTOS_DIR to loupe's protos/ directory)`);
  }
  const def = protoLoader.loadSync(file, { ...LOADER_OPTIONS, includeDirs: [dir] });
  return grpc.loadPackageDefinition(def).loupe.v1;
}

/**
 * Token from the environment: LOUPE_TOKEN, else the file named by LOUPE_TOKEN_FILE; null if none.
 * @param {string} [tokenFile] explicit token file, read first
 * @returns {string|null}
 */
function tokenFromEnv(tokenFile) {
  const file = tokenFile || '';
  if (!file && (process.env.LOUPE_TOKEN || '').trim()) return process.env.LOUPE_TOKEN.trim();
  const p = file || process.env.LOUPE_TOKEN_FILE || '';
  if (!p) return null;
  const token = fs.readFileSync(p, 'utf8').trim();
  if (!token) throw new Error(`token file ${p}: empty`);
  return token;
}

/** A Tensor message holding a float32 vector. */
function float32Tensor(values) {
  const arr = values instanceof Float32Array ? values : Float32Array.from(values);
  return { shape: [arr.length], dtype: 'DTYPE_FLOAT32', data: Buffer.from(arr.buffer, arr.byteOffset, arr.byteLength) };
}

/** Float32Array view of a Tensor message's data (DTYPE_FLOAT32 only). */
function tensorToFloat32(tensor) {
  if (tensor.dtype !== 'DTYPE_FLOAT32') throw new Error(`tensor: dtype ${tensor.dtype} is not DTYPE_FLOAT32`);
  const copy = Buffer.from(tensor.data);
  return new Float32Array(copy.buffer, copy.byteOffset, copy.byteLength / 4);
}

class LoupeClient {
  /**
   * @param {string} address host:port of a loupe broker
   * @param {import('./index').ClientOptions} [options]
   */
  constructor(address, options = {}) {
    this.address = address;
    const maxBytes = options.maxMessageBytes || 64 * MiB;
    let creds;
    if (options.caFile || options.ca || options.tls) {
      const ca = options.ca || (options.caFile ? fs.readFileSync(options.caFile) : null);
      creds = grpc.credentials.createSsl(ca);
    } else {
      creds = grpc.credentials.createInsecure();
    }
    const channelOptions = {
      'grpc.max_send_message_length': maxBytes,
      'grpc.max_receive_message_length': maxBytes,
      ...(options.channelOptions || {}),
    };
    const pkg = loadProtos(options.protosDir);
    this._token = options.token || null;
    this._defaultDeadlineMs = options.deadlineMs || 30000;
    this._stub = new pkg.Retrieval(address, creds, channelOptions);
    const health = grpc.loadPackageDefinition(protoLoader.fromJSON(HEALTH_JSON, LOADER_OPTIONS)).grpc.health.v1;
    this._health = new health.Health(address, creds, { ...channelOptions, channelOverride: this._stub.getChannel() });
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    return md;
  }

  _deadline(ms) {
    return new Date(Date.now() + (ms === undefined ? this._defaultDeadlineMs : ms));
  }

  _unary(method, request, deadlineMs, stub = this._stub) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(), { deadline: this._deadline(deadlineMs) }, (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }

  /**
   * Search by encoded image bytes (JPEG/PNG/WebP) or by a raw global descriptor.
   * @param {import('./index').SearchOptions} opts
   * @returns {Promise<import('./index').SearchResponse>}
   */
  search(opts) {
    const req = { k: opts.k === undefined ? 10 : opts.k, offset: opts.offset || 0, return_matches: !!opts.returnMatches };
    if (opts.image !== undefined) req.image = opts.image;
    if (opts.vector !== undefined) req.vector = float32Tensor(opts.vector);
    if (opts.crop) req.crop = { x1: opts.crop[0], y1: opts.crop[1], x2: opts.crop[2], y2: opts.crop[3] };
    if (opts.rerank) req.rerank = opts.rerank;
    if (opts.id !== undefined) req.id = opts.id;
    if (opts.includeQuery) req.include_query = true;
    if (opts.filter) req.filter = opts.filter;
    return this._unary('Search', req, opts.deadlineMs);
  }

  /**
   * Many searches in one call; answers in order, each with its own status (code 0 = OK).
   * @param {import('./index').SearchOptions[]} queries
   */
  searchBatch(queries, opts = {}) {
    const reqs = queries.map((q) => {
      const req = { k: q.k === undefined ? 10 : q.k, offset: q.offset || 0, return_matches: !!q.returnMatches };
      if (q.image !== undefined) req.image = q.image;
      if (q.vector !== undefined) req.vector = float32Tensor(q.vector);
      if (q.id !== undefined) req.id = q.id;
      if (q.includeQuery) req.include_query = true;
      if (q.rerank) req.rerank = q.rerank;
      if (q.filter) req.filter = q.filter;
      return req;
    });
    return this._unary('SearchBatch', { queries: reqs }, opts.deadlineMs);
  }

  /** Stored records of ids (metadata, size, shard; the global vector with withVector); unknown ids in `missing`. */
  getImages(ids, opts = {}) {
    return this._unary('GetImages', { ids, with_vector: !!opts.withVector }, opts.deadlineMs);
  }

  /** One page of the collection in id order; pass next_cursor back ("" = done). */
  listImages(opts = {}) {
    const req = { page_size: opts.pageSize || 0, cursor: opts.cursor || '' };
    if (opts.filter) req.filter = opts.filter;
    return this._unary('ListImages', req, opts.deadlineMs);
  }

  /** Search with the image stored in a file. */
  searchFile(file, opts = {}) {
    return this.search({ ...opts, image: fs.readFileSync(file) });
  }

  /**
   * Add (or replace) images, streamed in batches; resolves once all are stored.
   * @param {Iterable<import('./index').ImageToAdd>} images
   * @param {{batchSize?: number, deadlineMs?: number}} [opts]
   * @returns {Promise<{added: number, seconds: number}>}
   */
  addImages(images, opts = {}) {
    const batchSize = opts.batchSize || 16;
    return new Promise((resolve, reject) => {
      const call = this._stub.AddImages(this._metadata(), { deadline: this._deadline(opts.deadlineMs === undefined ? 600000 : opts.deadlineMs) },
        (err, resp) => (err ? reject(err) : resolve(resp)));
      let batch = [];
      for (const img of images) {
        batch.push({ id: img.id, image: img.image, metadata: img.metadata || {} });
        if (batch.length >= batchSize) {
          call.write({ images: batch });
          batch = [];
        }
      }
      if (batch.length) call.write({ images: batch });
      call.end();
    });
  }

  /** Delete ids; rejects with NOT_FOUND when none exists. */
  delete(ids, opts = {}) {
    return this._unary('Delete', { ids }, opts.deadlineMs);
  }

  /** Collection and cluster statistics. */
  stats(opts = {}) {
    return this._unary('GetStats', {}, opts.deadlineMs);
  }

  /** Build (or remove) the collection's kNN graphs used by diffusion. */
  buildGraph(opts = {}) {
    return this._unary('BuildGraph', { k: opts.k || 0, remove: !!opts.remove }, opts.deadlineMs === undefined ? 600000 : opts.deadlineMs);
  }

  /**
   * Learn and install (or remove) the collection's whitening: PCA-whitening, or with
   * `opts.pairs` ([[idA, idB], ...] of images that show the same object) the learned whitening.
   */
  fitWhitening(opts = {}) {
    const pairs = (opts.pairs || []).map(([a, b]) => ({ a, b }));
    return this._unary('FitWhitening', { max_vectors: opts.maxVectors || 0, dim: opts.dim || 0, remove: !!opts.remove, pairs },
      opts.deadlineMs === undefined ? 300000 : opts.deadlineMs);
  }

  /**
   * Back the collection up to `url` (an absolute directory path on the broker's machine, or
   * s3://bucket/prefix); incremental unless `opts.full`. Write role. No deadline by default.
   */
  backup(url, opts = {}) {
    return this._unary('Backup', { url, full: !!opts.full }, opts.deadlineMs === undefined ? 24 * 3600000 : opts.deadlineMs);
  }

  /** The backups at `url`, oldest first. Write role. */
  listBackups(url, opts = {}) {
    return this._unary('ListBackups', { url }, opts.deadlineMs === undefined ? 120000 : opts.deadlineMs);
  }

  /** Restore backup `opts.backupId` ("" = the newest) at `url` into this empty cluster. Write role. */
  restore(url, opts = {}) {
    return this._unary('Restore', { url, backup_id: opts.backupId || '' }, opts.deadlineMs === undefined ? 24 * 3600000 : opts.deadlineMs);
  }

  /**
   * Move the collection to `shards` shards while it serves (records move between shards, nothing
   * is re-extracted). Write role. No deadline by default.
   */
  reshard(shards, opts = {}) {
    return this._unary('Reshard', { shards }, opts.deadlineMs === undefined ? 24 * 3600000 : opts.deadlineMs);
  }

  /**
   * gRPC health status of the broker ("SERVING", ...). Needs no token.
   * @param {string} [service] "" for the server, or "loupe.v1.Retrieval"
   */
  async health(service = '', opts = {}) {
    const resp = await this._unary('Check', { service }, opts.deadlineMs, this._health);
    return resp.status;
  }

  /** Wait until the channel is connected. */
  waitReady(deadlineMs = 30000) {
    return new Promise((resolve, reject) => this._stub.waitForReady(this._deadline(deadlineMs), (err) => (err ? reject(err) : resolve())));
  }

  close() {
    this._stub.close();
  }
}

module.exports = { LoupeClient, loadProtos, tokenFromEnv, float32Tensor, tensorToFloat32, status: grpc.status, Metadata: grpc.Metadata };

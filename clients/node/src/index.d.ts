// Types of the loupe Node.js client (src/index.js). Message shapes follow protos/loupe/v1 with
// proto-loader's options: field names as in the .proto, enums as strings, int64 as number.
/// <reference types="node" />
import type { Metadata, ServiceError, status as grpcStatus } from '@grpc/grpc-js';

export interface ClientOptions {
  /** Bearer token sent with every call (see tokenFromEnv). */
  token?: string | null;
  /** PEM file of the CA that signed the broker's certificate → TLS. */
  caFile?: string;
  /** PEM bytes of that CA (instead of caFile). */
  ca?: Buffer;
  /** TLS with the system roots. */
  tls?: boolean;
  /** Directory holding loupe/v1/*.proto (default: the package's protos/, env LOUPE_PROTOS_DIR). */
  protosDir?: string;
  /** Largest message sent or received (default 64 MiB). */
  maxMessageBytes?: number;
  /** Default deadline of unary calls in ms (default 30000). */
  deadlineMs?: number;
  /** Extra gRPC channel options. */
  channelOptions?: Record<string, string | number>;
}

export interface VerifyOptions { enabled?: boolean; candidates?: number; min_inliers?: number; model?: '' | 'affine' | 'homography' }
export interface DiffusionOptions {
  enabled?: boolean; neighbourhood?: number; k?: number; alpha?: number; gamma?: number; regional?: boolean; online_graph?: boolean;
}
export interface ExpansionOptions { query_expansion?: boolean; database_augmentation?: boolean; n?: number; alpha?: number }
export interface RerankOptions { verify?: VerifyOptions; diffuse?: DiffusionOptions; expand?: ExpansionOptions; diffuse_first?: boolean }

export interface SearchOptions {
  /** Encoded image (JPEG, PNG, WebP). */
  image?: Buffer;
  /** Raw (D,) global descriptor. */
  vector?: Float32Array | number[];
  /** Number of results, 1..1000 (default 10). */
  k?: number;
  offset?: number;
  /** [x1, y1, x2, y2] in the query's pixels. */
  crop?: [number, number, number, number];
  rerank?: RerankOptions;
  returnMatches?: boolean;
  /** Id of an indexed image: search with its stored features ("more like this"). */
  id?: string;
  /** With id: keep the query image in the results. */
  includeQuery?: boolean;
  /** Metadata filter, evaluated in the shards before the top-k. */
  filter?: Filter;
  /** Deadline in ms from now (default: the client's). */
  deadlineMs?: number;
}

export interface Range { min?: string; max?: string; min_exclusive?: boolean; max_exclusive?: boolean }
export interface Condition { key: string; equals?: string; any_of?: { values: string[] }; range?: Range }
export interface Filter { all: Condition[] }
export interface StoredImage { id: string; metadata: Record<string, string>; width: number; height: number; shard_id: number; vector: Tensor | null }

export interface Tensor { shape: number[]; dtype: 'DTYPE_UNSPECIFIED' | 'DTYPE_FLOAT32' | 'DTYPE_FLOAT16' | 'DTYPE_INT8'; data: Buffer; scale: number }
export interface StageScores { global: number; diffusion: number; inliers: number }
export interface SearchResult {
  id: string; score: number; stages: StageScores | null; verified: boolean; confidence: number;
  metadata: Record<string, string>; matches: { query_points: Tensor; result_points: Tensor } | null; shard_id: number;
}
export interface SearchResponse {
  results: SearchResult[]; partial: boolean; missing_shards: number[];
  timings: { stage: string; seconds: number }[]; query_confidence: number;
}
export interface ImageToAdd { id: string; image: Buffer; metadata?: Record<string, string> }
export interface ShardStats {
  shard_id: number; address: string; images: number; feature_bytes: number; healthy: boolean;
  regional_vectors: number; local_features: number; wal_bytes: number;
}
export interface GetStatsResponse {
  images: number; shards: ShardStats[]; extractors: string[]; dim: number; whitened: boolean; model: string;
  graph_images: number; graph_regions: number;
}

export class LoupeClient {
  constructor(address: string, options?: ClientOptions);
  readonly address: string;
  search(opts: SearchOptions): Promise<SearchResponse>;
  searchFile(file: string, opts?: Omit<SearchOptions, 'image' | 'vector'>): Promise<SearchResponse>;
  addImages(images: Iterable<ImageToAdd>, opts?: { batchSize?: number; deadlineMs?: number }): Promise<{ added: number; seconds: number }>;
  delete(ids: string[], opts?: { deadlineMs?: number }): Promise<{ deleted: string[]; missing: string[] }>;
  stats(opts?: { deadlineMs?: number }): Promise<GetStatsResponse>;
  searchBatch(queries: Omit<SearchOptions, 'deadlineMs'>[], opts?: { deadlineMs?: number }): Promise<{
    results: { status: { code: number; message: string }; response: SearchResponse | null }[]; timings: { stage: string; seconds: number }[];
  }>;
  getImages(ids: string[], opts?: { withVector?: boolean; deadlineMs?: number }): Promise<{ images: StoredImage[]; missing: string[]; unavailable: string[] }>;
  listImages(opts?: { pageSize?: number; cursor?: string; filter?: Filter; deadlineMs?: number }): Promise<{ images: StoredImage[]; next_cursor: string }>;
  buildGraph(opts?: { k?: number; remove?: boolean; deadlineMs?: number }): Promise<{ images: number; k: number; bytes: number; seconds: number; regions: number }>;
  backup(url: string, opts?: { full?: boolean; deadlineMs?: number }): Promise<{ backup_id: string; images: number; shards: number; chunks: number; chunks_reused: number; bytes: number; bytes_written: number; seconds: number; started_version: number; incremental_from: string }>;
  listBackups(url: string, opts?: { deadlineMs?: number }): Promise<{ backups: Array<{ backup_id: string; complete: boolean; created: string; images: number; shards: number; bytes: number; seconds: number; incremental_from: string; problem: string }> }>;
  restore(url: string, opts?: { backupId?: string; deadlineMs?: number }): Promise<{ backup_id: string; images: number; source_shards: number; target_shards: number; bytes_read: number; seconds: number; verify_seconds: number; resumed: boolean }>;
  reshard(shards: number, opts?: { deadlineMs?: number }): Promise<{ from_shards: number; to_shards: number; from_placement: string; to_placement: string; records_moved: number; copies_removed: number; seconds: number; copy_seconds: number }>;
  fitWhitening(opts?: { maxVectors?: number; dim?: number; remove?: boolean; pairs?: Array<[string, string]>; deadlineMs?: number }): Promise<{ sample_size: number; dim: number; pairs: number }>;
  health(service?: string, opts?: { deadlineMs?: number }): Promise<'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN'>;
  waitReady(deadlineMs?: number): Promise<void>;
  close(): void;
}

/** Errors reject with a grpc-js ServiceError: `err.code` is a `status` value, `err.details` the message. */
export type LoupeError = ServiceError;
export const status: typeof grpcStatus;
export { Metadata };
export function loadProtos(protosDir?: string): unknown;
export function tokenFromEnv(tokenFile?: string): string | null;
export function float32Tensor(values: Float32Array | number[]): Tensor;
export function tensorToFloat32(tensor: Tensor): Float32Array;

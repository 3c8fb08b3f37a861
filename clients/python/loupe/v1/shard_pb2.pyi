from loupe.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardRecord(_message.Message):
    __slots__ = ("id", "features", "metadata", "version")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    features: _types_pb2.ImageFeatures
    metadata: _containers.ScalarMap[str, str]
    version: int
    def __init__(self, id: _Optional[str] = ..., features: _Optional[_Union[_types_pb2.ImageFeatures, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ...) -> None: ...

class ShardSearchRequest(_message.Message):
    __slots__ = ("shard_id", "query", "top_k", "return_vectors", "timeout_s", "query_transformed", "filter")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    QUERY_TRANSFORMED_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    query: _types_pb2.Tensor
    top_k: int
    return_vectors: bool
    timeout_s: float
    query_transformed: bool
    filter: _types_pb2.Filter
    def __init__(self, shard_id: _Optional[int] = ..., query: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., return_vectors: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., query_transformed: _Optional[bool] = ..., filter: _Optional[_Union[_types_pb2.Filter, _Mapping]] = ...) -> None: ...

class ShardSearchResponse(_message.Message):
    __slots__ = ("ids", "scores", "vectors", "metadata", "seconds")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    vectors: _types_pb2.Tensor
    metadata: _containers.RepeatedCompositeFieldContainer[Metadata]
    seconds: float
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., vectors: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., metadata: _Optional[_Iterable[_Union[Metadata, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardAddRequest(_message.Message):
    __slots__ = ("shard_id", "records")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    records: _containers.RepeatedCompositeFieldContainer[ShardRecord]
    def __init__(self, shard_id: _Optional[int] = ..., records: _Optional[_Iterable[_Union[ShardRecord, _Mapping]]] = ...) -> None: ...

class ShardAddResponse(_message.Message):
    __slots__ = ("stored", "total", "replicas")
    STORED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    stored: int
    total: int
    replicas: int
    def __init__(self, stored: _Optional[int] = ..., total: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class ShardDeleteRequest(_message.Message):
    __slots__ = ("shard_id", "ids", "versions")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shard_id: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardDeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing", "replicas")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ...) -> None: ...

class GetFeaturesRequest(_message.Message):
    __slots__ = ("shard_id", "ids", "want_global", "want_regional", "want_local", "want_raw_global")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WANT_GLOBAL_FIELD_NUMBER: _ClassVar[int]
    WANT_REGIONAL_FIELD_NUMBER: _ClassVar[int]
    WANT_LOCAL_FIELD_NUMBER: _ClassVar[int]
    WANT_RAW_GLOBAL_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    want_global: bool
    want_regional: bool
    want_local: bool
    want_raw_global: bool
    def __init__(self, shard_id: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., want_global: _Optional[bool] = ..., want_regional: _Optional[bool] = ..., want_local: _Optional[bool] = ..., want_raw_global: _Optional[bool] = ...) -> None: ...

class GetFeaturesResponse(_message.Message):
    __slots__ = ("ids", "features", "seconds")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedCompositeFieldContainer[_types_pb2.ImageFeatures]
    seconds: float
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[_Union[_types_pb2.ImageFeatures, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class SampleVectorsRequest(_message.Message):
    __slots__ = ("shard_id", "max_vectors", "seed", "include_regional")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_VECTORS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REGIONAL_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    max_vectors: int
    seed: int
    include_regional: bool
    def __init__(self, shard_id: _Optional[int] = ..., max_vectors: _Optional[int] = ..., seed: _Optional[int] = ..., include_regional: _Optional[bool] = ...) -> None: ...

class SampleVectorsResponse(_message.Message):
    __slots__ = ("vectors", "regional")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_FIELD_NUMBER: _ClassVar[int]
    vectors: _types_pb2.Tensor
    regional: _types_pb2.Tensor
    def __init__(self, vectors: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., regional: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ListVectorsRequest(_message.Message):
    __slots__ = ("shard_id", "cursor", "limit", "include_regional")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REGIONAL_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    cursor: int
    limit: int
    include_regional: bool
    def __init__(self, shard_id: _Optional[int] = ..., cursor: _Optional[int] = ..., limit: _Optional[int] = ..., include_regional: _Optional[bool] = ...) -> None: ...

class ListVectorsResponse(_message.Message):
    __slots__ = ("ids", "vectors", "next_cursor", "done", "regional", "regional_counts")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _types_pb2.Tensor
    next_cursor: int
    done: bool
    regional: _types_pb2.Tensor
    regional_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., next_cursor: _Optional[int] = ..., done: _Optional[bool] = ..., regional: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., regional_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class SetWhiteningRequest(_message.Message):
    __slots__ = ("shard_id", "whitening")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    WHITENING_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    whitening: bytes
    def __init__(self, shard_id: _Optional[int] = ..., whitening: _Optional[bytes] = ...) -> None: ...

class SetWhiteningResponse(_message.Message):
    __slots__ = ("dim",)
    DIM_FIELD_NUMBER: _ClassVar[int]
    dim: int
    def __init__(self, dim: _Optional[int] = ...) -> None: ...

class ShardStatsRequest(_message.Message):
    __slots__ = ("shard_id",)
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    def __init__(self, shard_id: _Optional[int] = ...) -> None: ...

class ShardStatsResponse(_message.Message):
    __slots__ = ("shard_id", "images", "regional_vectors", "local_features", "feature_bytes", "dim", "index", "whitened", "wal_bytes", "store_bytes", "index_bytes", "startup_seconds", "startup_replayed", "sequence", "snapshot_sequence", "oversized_records", "max_version", "digest", "tombstones", "store_id", "whitening_crc")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_VECTORS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WHITENED_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    STARTUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTUP_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OVERSIZED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    WHITENING_CRC_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    images: int
    regional_vectors: int
    local_features: int
    feature_bytes: int
    dim: int
    index: str
    whitened: bool
    wal_bytes: int
    store_bytes: int
    index_bytes: int
    startup_seconds: float
    startup_replayed: int
    sequence: int
    snapshot_sequence: int
    oversized_records: int
    max_version: int
    digest: int
    tombstones: int
    store_id: str
    whitening_crc: int
    def __init__(self, shard_id: _Optional[int] = ..., images: _Optional[int] = ..., regional_vectors: _Optional[int] = ..., local_features: _Optional[int] = ..., feature_bytes: _Optional[int] = ..., dim: _Optional[int] = ..., index: _Optional[str] = ..., whitened: _Optional[bool] = ..., wal_bytes: _Optional[int] = ..., store_bytes: _Optional[int] = ..., index_bytes: _Optional[int] = ..., startup_seconds: _Optional[float] = ..., startup_replayed: _Optional[int] = ..., sequence: _Optional[int] = ..., snapshot_sequence: _Optional[int] = ..., oversized_records: _Optional[int] = ..., max_version: _Optional[int] = ..., digest: _Optional[int] = ..., tombstones: _Optional[int] = ..., store_id: _Optional[str] = ..., whitening_crc: _Optional[int] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("shard_id", "after", "upto", "limit")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    UPTO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    after: str
    upto: str
    limit: int
    def __init__(self, shard_id: _Optional[int] = ..., after: _Optional[str] = ..., upto: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("ids", "versions", "deleted", "done")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.RepeatedScalarFieldContainer[int]
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    done: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., versions: _Optional[_Iterable[int]] = ..., deleted: _Optional[_Iterable[bool]] = ..., done: _Optional[bool] = ...) -> None: ...

class GetRecordsRequest(_message.Message):
    __slots__ = ("shard_id", "ids")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRecordsResponse(_message.Message):
    __slots__ = ("records", "consumed")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ShardRecord]
    consumed: int
    def __init__(self, records: _Optional[_Iterable[_Union[ShardRecord, _Mapping]]] = ..., consumed: _Optional[int] = ...) -> None: ...

class ShardSearchBatchRequest(_message.Message):
    __slots__ = ("shard_id", "queries", "timeout_s")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    queries: _containers.RepeatedCompositeFieldContainer[ShardSearchRequest]
    timeout_s: float
    def __init__(self, shard_id: _Optional[int] = ..., queries: _Optional[_Iterable[_Union[ShardSearchRequest, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ShardSearchBatchResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: ShardSearchResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[ShardSearchResponse, _Mapping]] = ...) -> None: ...

class ShardSearchBatchResponse(_message.Message):
    __slots__ = ("results", "seconds")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ShardSearchBatchResult]
    seconds: float
    def __init__(self, results: _Optional[_Iterable[_Union[ShardSearchBatchResult, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("shard_id", "ids", "want_vector")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WANT_VECTOR_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    want_vector: bool
    def __init__(self, shard_id: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., want_vector: _Optional[bool] = ...) -> None: ...

class ShardImageInfo(_message.Message):
    __slots__ = ("id", "metadata", "width", "height", "vector")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    vector: _types_pb2.Tensor
    def __init__(self, id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., vector: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("images", "missing")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ShardImageInfo]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[ShardImageInfo, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class ListIdsRequest(_message.Message):
    __slots__ = ("shard_id", "after", "limit", "filter", "max_scan")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MAX_SCAN_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    after: str
    limit: int
    filter: _types_pb2.Filter
    max_scan: int
    def __init__(self, shard_id: _Optional[int] = ..., after: _Optional[str] = ..., limit: _Optional[int] = ..., filter: _Optional[_Union[_types_pb2.Filter, _Mapping]] = ..., max_scan: _Optional[int] = ...) -> None: ...

class ListIdsResponse(_message.Message):
    __slots__ = ("images", "done", "scanned_to")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SCANNED_TO_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ShardImageInfo]
    done: bool
    scanned_to: str
    def __init__(self, images: _Optional[_Iterable[_Union[ShardImageInfo, _Mapping]]] = ..., done: _Optional[bool] = ..., scanned_to: _Optional[str] = ...) -> None: ...

class ShardVerifyParams(_message.Message):
    __slots__ = ("matcher", "ratio", "model", "estimator", "residual_px", "max_iters", "confidence", "min_inliers", "max_scale", "max_anisotropy", "max_matches")
    MATCHER_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_ANISOTROPY_FIELD_NUMBER: _ClassVar[int]
    MAX_MATCHES_FIELD_NUMBER: _ClassVar[int]
    matcher: str
    ratio: float
    model: str
    estimator: str
    residual_px: float
    max_iters: int
    confidence: float
    min_inliers: int
    max_scale: float
    max_anisotropy: float
    max_matches: int
    def __init__(self, matcher: _Optional[str] = ..., ratio: _Optional[float] = ..., model: _Optional[str] = ..., estimator: _Optional[str] = ..., residual_px: _Optional[float] = ..., max_iters: _Optional[int] = ..., confidence: _Optional[float] = ..., min_inliers: _Optional[int] = ..., max_scale: _Optional[float] = ..., max_anisotropy: _Optional[float] = ..., max_matches: _Optional[int] = ...) -> None: ...

class ShardVerifyRequest(_message.Message):
    __slots__ = ("shard_id", "query", "ids", "params", "timeout_s")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    query: _types_pb2.LocalFeatures
    ids: _containers.RepeatedScalarFieldContainer[str]
    params: ShardVerifyParams
    timeout_s: float
    def __init__(self, shard_id: _Optional[int] = ..., query: _Optional[_Union[_types_pb2.LocalFeatures, _Mapping]] = ..., ids: _Optional[_Iterable[str]] = ..., params: _Optional[_Union[ShardVerifyParams, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class VerifiedCandidate(_message.Message):
    __slots__ = ("id", "inliers", "model", "query_index", "candidate_index", "candidate_points")
    ID_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_INDEX_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_POINTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    inliers: int
    model: _containers.RepeatedScalarFieldContainer[float]
    query_index: _containers.RepeatedScalarFieldContainer[int]
    candidate_index: _containers.RepeatedScalarFieldContainer[int]
    candidate_points: _types_pb2.Tensor
    def __init__(self, id: _Optional[str] = ..., inliers: _Optional[int] = ..., model: _Optional[_Iterable[float]] = ..., query_index: _Optional[_Iterable[int]] = ..., candidate_index: _Optional[_Iterable[int]] = ..., candidate_points: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ShardVerifyResponse(_message.Message):
    __slots__ = ("results", "unverified", "seconds", "verify_seconds")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifiedCandidate]
    unverified: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    verify_seconds: float
    def __init__(self, results: _Optional[_Iterable[_Union[VerifiedCandidate, _Mapping]]] = ..., unverified: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ...) -> None: ...

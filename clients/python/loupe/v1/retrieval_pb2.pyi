from loupe.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageRecord(_message.Message):
    __slots__ = ("id", "image", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AddImagesRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageRecord]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageRecord, _Mapping]]] = ...) -> None: ...

class AddImagesResponse(_message.Message):
    __slots__ = ("added", "seconds", "replicas_stored")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_STORED_FIELD_NUMBER: _ClassVar[int]
    added: int
    seconds: float
    replicas_stored: int
    def __init__(self, added: _Optional[int] = ..., seconds: _Optional[float] = ..., replicas_stored: _Optional[int] = ...) -> None: ...

class VerifyOptions(_message.Message):
    __slots__ = ("enabled", "candidates", "min_inliers", "model")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    candidates: int
    min_inliers: int
    model: str
    def __init__(self, enabled: _Optional[bool] = ..., candidates: _Optional[int] = ..., min_inliers: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class DiffusionOptions(_message.Message):
    __slots__ = ("enabled", "neighbourhood", "k", "alpha", "gamma", "regional", "online_graph")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURHOOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_FIELD_NUMBER: _ClassVar[int]
    ONLINE_GRAPH_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    neighbourhood: int
    k: int
    alpha: float
    gamma: float
    regional: bool
    online_graph: bool
    def __init__(self, enabled: _Optional[bool] = ..., neighbourhood: _Optional[int] = ..., k: _Optional[int] = ..., alpha: _Optional[float] = ..., gamma: _Optional[float] = ..., regional: _Optional[bool] = ..., online_graph: _Optional[bool] = ...) -> None: ...

class ExpansionOptions(_message.Message):
    __slots__ = ("query_expansion", "database_augmentation", "n", "alpha")
    QUERY_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    DATABASE_AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    query_expansion: bool
    database_augmentation: bool
    n: int
    alpha: float
    def __init__(self, query_expansion: _Optional[bool] = ..., database_augmentation: _Optional[bool] = ..., n: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class RerankOptions(_message.Message):
    __slots__ = ("verify", "diffuse", "expand", "diffuse_first", "verify_global_too", "reseed_after_verify", "expand_verified", "regional_match")
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    DIFFUSE_FIELD_NUMBER: _ClassVar[int]
    EXPAND_FIELD_NUMBER: _ClassVar[int]
    DIFFUSE_FIRST_FIELD_NUMBER: _ClassVar[int]
    VERIFY_GLOBAL_TOO_FIELD_NUMBER: _ClassVar[int]
    RESEED_AFTER_VERIFY_FIELD_NUMBER: _ClassVar[int]
    EXPAND_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_MATCH_FIELD_NUMBER: _ClassVar[int]
    verify: VerifyOptions
    diffuse: DiffusionOptions
    expand: ExpansionOptions
    diffuse_first: bool
    verify_global_too: bool
    reseed_after_verify: bool
    expand_verified: bool
    regional_match: bool
    def __init__(self, verify: _Optional[_Union[VerifyOptions, _Mapping]] = ..., diffuse: _Optional[_Union[DiffusionOptions, _Mapping]] = ..., expand: _Optional[_Union[ExpansionOptions, _Mapping]] = ..., diffuse_first: _Optional[bool] = ..., verify_global_too: _Optional[bool] = ..., reseed_after_verify: _Optional[bool] = ..., expand_verified: _Optional[bool] = ..., regional_match: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "vector", "id", "k", "offset", "crop", "rerank", "return_matches", "include_query", "filter")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    RETURN_MATCHES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_QUERY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    vector: _types_pb2.Tensor
    id: str
    k: int
    offset: int
    crop: _types_pb2.Box
    rerank: RerankOptions
    return_matches: bool
    include_query: bool
    filter: _types_pb2.Filter
    def __init__(self, image: _Optional[bytes] = ..., vector: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., id: _Optional[str] = ..., k: _Optional[int] = ..., offset: _Optional[int] = ..., crop: _Optional[_Union[_types_pb2.Box, _Mapping]] = ..., rerank: _Optional[_Union[RerankOptions, _Mapping]] = ..., return_matches: _Optional[bool] = ..., include_query: _Optional[bool] = ..., filter: _Optional[_Union[_types_pb2.Filter, _Mapping]] = ...) -> None: ...

class StageScores(_message.Message):
    __slots__ = ("diffusion", "inliers")
    GLOBAL_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    diffusion: float
    inliers: int
    def __init__(self, diffusion: _Optional[float] = ..., inliers: _Optional[int] = ..., **kwargs) -> None: ...

class Matches(_message.Message):
    __slots__ = ("query_points", "result_points")
    QUERY_POINTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_POINTS_FIELD_NUMBER: _ClassVar[int]
    query_points: _types_pb2.Tensor
    result_points: _types_pb2.Tensor
    def __init__(self, query_points: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., result_points: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("id", "score", "stages", "verified", "confidence", "metadata", "matches", "shard_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    stages: StageScores
    verified: bool
    confidence: float
    metadata: _containers.ScalarMap[str, str]
    matches: Matches
    shard_id: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., stages: _Optional[_Union[StageScores, _Mapping]] = ..., verified: _Optional[bool] = ..., confidence: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., matches: _Optional[_Union[Matches, _Mapping]] = ..., shard_id: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "partial", "missing_shards", "timings", "query_confidence")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    QUERY_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    timings: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageTiming]
    query_confidence: float
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[int]] = ..., timings: _Optional[_Iterable[_Union[_types_pb2.StageTiming, _Mapping]]] = ..., query_confidence: _Optional[float] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing", "replicas_stored")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_STORED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    replicas_stored: int
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., replicas_stored: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard_id", "address", "images", "feature_bytes", "healthy", "regional_vectors", "local_features", "wal_bytes", "store_bytes", "index_bytes", "index", "startup_seconds", "oversized_records", "replicas")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_VECTORS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STARTUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERSIZED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    address: str
    images: int
    feature_bytes: int
    healthy: bool
    regional_vectors: int
    local_features: int
    wal_bytes: int
    store_bytes: int
    index_bytes: int
    index: str
    startup_seconds: float
    oversized_records: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStats]
    def __init__(self, shard_id: _Optional[int] = ..., address: _Optional[str] = ..., images: _Optional[int] = ..., feature_bytes: _Optional[int] = ..., healthy: _Optional[bool] = ..., regional_vectors: _Optional[int] = ..., local_features: _Optional[int] = ..., wal_bytes: _Optional[int] = ..., store_bytes: _Optional[int] = ..., index_bytes: _Optional[int] = ..., index: _Optional[str] = ..., startup_seconds: _Optional[float] = ..., oversized_records: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStats, _Mapping]]] = ...) -> None: ...

class ReplicaStats(_message.Message):
    __slots__ = ("replica", "address", "state", "images", "lag_writes", "catch_up_progress", "digest", "store_id")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAG_WRITES_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    replica: int
    address: str
    state: str
    images: int
    lag_writes: int
    catch_up_progress: float
    digest: int
    store_id: str
    def __init__(self, replica: _Optional[int] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., images: _Optional[int] = ..., lag_writes: _Optional[int] = ..., catch_up_progress: _Optional[float] = ..., digest: _Optional[int] = ..., store_id: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("images", "shards", "extractors", "dim", "whitened", "model", "graph_images", "graph_regions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXTRACTORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    WHITENED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRAPH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_REGIONS_FIELD_NUMBER: _ClassVar[int]
    images: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    extractors: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    whitened: bool
    model: str
    graph_images: int
    graph_regions: int
    def __init__(self, images: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., extractors: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., whitened: _Optional[bool] = ..., model: _Optional[str] = ..., graph_images: _Optional[int] = ..., graph_regions: _Optional[int] = ...) -> None: ...

class FitWhiteningRequest(_message.Message):
    __slots__ = ("max_vectors", "dim", "remove", "pairs")
    MAX_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    max_vectors: int
    dim: int
    remove: bool
    pairs: _containers.RepeatedCompositeFieldContainer[ImagePair]
    def __init__(self, max_vectors: _Optional[int] = ..., dim: _Optional[int] = ..., remove: _Optional[bool] = ..., pairs: _Optional[_Iterable[_Union[ImagePair, _Mapping]]] = ...) -> None: ...

class ImagePair(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: str
    b: str
    def __init__(self, a: _Optional[str] = ..., b: _Optional[str] = ...) -> None: ...

class BuildGraphRequest(_message.Message):
    __slots__ = ("k", "remove")
    K_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    k: int
    remove: bool
    def __init__(self, k: _Optional[int] = ..., remove: _Optional[bool] = ...) -> None: ...

class BuildGraphResponse(_message.Message):
    __slots__ = ("images", "k", "bytes", "seconds", "regions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    images: int
    k: int
    bytes: int
    seconds: float
    regions: int
    def __init__(self, images: _Optional[int] = ..., k: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., regions: _Optional[int] = ...) -> None: ...

class FitWhiteningResponse(_message.Message):
    __slots__ = ("sample_size", "dim", "pairs")
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    sample_size: int
    dim: int
    pairs: int
    def __init__(self, sample_size: _Optional[int] = ..., dim: _Optional[int] = ..., pairs: _Optional[int] = ...) -> None: ...

class GetImagesRequest(_message.Message):
    __slots__ = ("ids", "with_vector")
    IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_VECTOR_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    with_vector: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., with_vector: _Optional[bool] = ...) -> None: ...

class StoredImage(_message.Message):
    __slots__ = ("id", "metadata", "width", "height", "shard_id", "vector")
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
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    shard_id: int
    vector: _types_pb2.Tensor
    def __init__(self, id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., shard_id: _Optional[int] = ..., vector: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetImagesResponse(_message.Message):
    __slots__ = ("images", "missing", "unavailable")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[StoredImage]
    missing: _containers.RepeatedScalarFieldContainer[str]
    unavailable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[StoredImage, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ..., unavailable: _Optional[_Iterable[str]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("page_size", "cursor", "filter")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    cursor: str
    filter: _types_pb2.Filter
    def __init__(self, page_size: _Optional[int] = ..., cursor: _Optional[str] = ..., filter: _Optional[_Union[_types_pb2.Filter, _Mapping]] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_cursor")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[StoredImage]
    next_cursor: str
    def __init__(self, images: _Optional[_Iterable[_Union[StoredImage, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class QueryStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SearchBatchResult(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: QueryStatus
    response: SearchResponse
    def __init__(self, status: _Optional[_Union[QueryStatus, _Mapping]] = ..., response: _Optional[_Union[SearchResponse, _Mapping]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "timings")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchBatchResult]
    timings: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageTiming]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchBatchResult, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_types_pb2.StageTiming, _Mapping]]] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("url", "full")
    URL_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    url: str
    full: bool
    def __init__(self, url: _Optional[str] = ..., full: _Optional[bool] = ...) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("backup_id", "images", "shards", "chunks", "chunks_reused", "bytes", "bytes_written", "seconds", "started_version", "incremental_from")
    BACKUP_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REUSED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FROM_FIELD_NUMBER: _ClassVar[int]
    backup_id: str
    images: int
    shards: int
    chunks: int
    chunks_reused: int
    bytes: int
    bytes_written: int
    seconds: float
    started_version: int
    incremental_from: str
    def __init__(self, backup_id: _Optional[str] = ..., images: _Optional[int] = ..., shards: _Optional[int] = ..., chunks: _Optional[int] = ..., chunks_reused: _Optional[int] = ..., bytes: _Optional[int] = ..., bytes_written: _Optional[int] = ..., seconds: _Optional[float] = ..., started_version: _Optional[int] = ..., incremental_from: _Optional[str] = ...) -> None: ...

class ListBackupsRequest(_message.Message):
    __slots__ = ("url",)
    URL_FIELD_NUMBER: _ClassVar[int]
    url: str
    def __init__(self, url: _Optional[str] = ...) -> None: ...

class BackupInfo(_message.Message):
    __slots__ = ("backup_id", "complete", "created", "images", "shards", "bytes", "seconds", "incremental_from", "problem")
    BACKUP_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FROM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    backup_id: str
    complete: bool
    created: str
    images: int
    shards: int
    bytes: int
    seconds: float
    incremental_from: str
    problem: str
    def __init__(self, backup_id: _Optional[str] = ..., complete: _Optional[bool] = ..., created: _Optional[str] = ..., images: _Optional[int] = ..., shards: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., incremental_from: _Optional[str] = ..., problem: _Optional[str] = ...) -> None: ...

class ListBackupsResponse(_message.Message):
    __slots__ = ("backups",)
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    backups: _containers.RepeatedCompositeFieldContainer[BackupInfo]
    def __init__(self, backups: _Optional[_Iterable[_Union[BackupInfo, _Mapping]]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("url", "backup_id")
    URL_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ID_FIELD_NUMBER: _ClassVar[int]
    url: str
    backup_id: str
    def __init__(self, url: _Optional[str] = ..., backup_id: _Optional[str] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("backup_id", "images", "source_shards", "target_shards", "bytes_read", "seconds", "verify_seconds", "resumed")
    BACKUP_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    backup_id: str
    images: int
    source_shards: int
    target_shards: int
    bytes_read: int
    seconds: float
    verify_seconds: float
    resumed: bool
    def __init__(self, backup_id: _Optional[str] = ..., images: _Optional[int] = ..., source_shards: _Optional[int] = ..., target_shards: _Optional[int] = ..., bytes_read: _Optional[int] = ..., seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., resumed: _Optional[bool] = ...) -> None: ...

class ReshardRequest(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: int
    def __init__(self, shards: _Optional[int] = ...) -> None: ...

class ReshardResponse(_message.Message):
    __slots__ = ("from_shards", "to_shards", "from_placement", "to_placement", "records_moved", "copies_removed", "seconds", "copy_seconds")
    FROM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TO_SHARDS_FIELD_NUMBER: _ClassVar[int]
    FROM_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    TO_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_MOVED_FIELD_NUMBER: _ClassVar[int]
    COPIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COPY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    from_shards: int
    to_shards: int
    from_placement: str
    to_placement: str
    records_moved: int
    copies_removed: int
    seconds: float
    copy_seconds: float
    def __init__(self, from_shards: _Optional[int] = ..., to_shards: _Optional[int] = ..., from_placement: _Optional[str] = ..., to_placement: _Optional[str] = ..., records_moved: _Optional[int] = ..., copies_removed: _Optional[int] = ..., seconds: _Optional[float] = ..., copy_seconds: _Optional[float] = ...) -> None: ...

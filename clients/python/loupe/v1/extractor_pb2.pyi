from loupe.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractRequest(_message.Message):
    __slots__ = ("image", "crop", "want_regional", "want_local", "query")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    WANT_REGIONAL_FIELD_NUMBER: _ClassVar[int]
    WANT_LOCAL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    crop: _types_pb2.Box
    want_regional: bool
    want_local: bool
    query: bool
    def __init__(self, image: _Optional[bytes] = ..., crop: _Optional[_Union[_types_pb2.Box, _Mapping]] = ..., want_regional: _Optional[bool] = ..., want_local: _Optional[bool] = ..., query: _Optional[bool] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("features", "seconds")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    features: _types_pb2.ImageFeatures
    seconds: float
    def __init__(self, features: _Optional[_Union[_types_pb2.ImageFeatures, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("backbone", "pooling", "dim", "scales", "max_side", "local_dim")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DIM_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    pooling: str
    dim: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    max_side: int
    local_dim: int
    def __init__(self, backbone: _Optional[str] = ..., pooling: _Optional[str] = ..., dim: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ..., max_side: _Optional[int] = ..., local_dim: _Optional[int] = ...) -> None: ...

"""Every limit on what a caller may send, declared once, with the checks the broker and shards run.

The broker runs these checks before any work (no extractor or shard call is made for a
request that breaks one); each shard runs the same ones on every write it receives (it trusts
no caller, the broker included). Each failure is an ``InvalidArgument`` whose message names the
field, so it maps to INVALID_ARGUMENT in ``services.common.errors``. The same numbers are
documented in protos/loupe/v1/retrieval.proto and docs/faults.md. What a response may hold
under the message limit is derived from these bounds in ``services.common.message_size``.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Mapping

from loupe.v1 import types_pb2
from services.common.errors import InvalidArgument
from services.space.regions import MAX_REGIONS_PER_IMAGE

MiB = 1024 * 1024

# transport
MAX_MESSAGE_BYTES = 64 * MiB  # gRPC send/receive limit of every loupe server and client (ServerOptions default)

# ids
MAX_ID_BYTES = 511  # LMDB's key limit (the shard store keys records by id): what a shard can really keep
# metadata of one image (checked at write time, so no stored record can grow a response)
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_BYTES = 128
MAX_METADATA_VALUE_BYTES = 4096
MAX_METADATA_BYTES = 4 * 1024  # x 5000 neighbours = 20 MB: a full-depth shard response stays under 64 MiB
# images
MAX_IMAGE_BYTES = 32 * MiB
MAX_IMAGE_PIXELS = 24_000_000  # a 6000x4000 camera frame; was 40 MP (~4 s to decode)
MAX_CROP_COORD = 1_000_000.0
# vectors
MAX_VECTOR_DIM = 4096
# stored features of one image (what an extractor can produce; a shard refuses more)
MAX_LOCAL_FEATURES_PER_IMAGE = 2048  # extractor.local.max_keypoints is at most this (default 1000)
MAX_LOCAL_DESCRIPTOR_DIM = 1024  # channels of a stride-16 backbone tap (<= 672) or fewer after the collection PCA
MAX_WRITE_RECORDS = 1024  # records in one shard write (the broker sends at most broker.max_batch_images, 256)
MAX_VERIFY_IDS = 2048  # candidates in one shard Verify call (the broker verifies at most 2 x max_verify_candidates per query)
# batches
MAX_DELETE_IDS = 1000
MAX_WHITENING_SAMPLE = 1_000_000
MAX_WHITENING_PAIRS = 100_000
# rerank parameters
MAX_DIFFUSION_GAMMA = 100.0
MAX_EXPANSION_ALPHA = 100.0
VERIFY_MODELS = ("affine", "homography")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def check_text(value: str, field: str, max_bytes: int, *, allow_empty: bool = False) -> None:
    """A string from the caller: length in UTF-8 bytes, no control characters, no lone surrogates.

    (Invalid UTF-8 never gets here: the request then cannot be parsed at all.)
    """
    if not value and not allow_empty:
        raise InvalidArgument(f"{field}: must not be empty")
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field}: not valid UTF-8") from None
    if n > max_bytes:
        raise InvalidArgument(f"{field}: {n} bytes, the limit is {max_bytes}")
    if _has_control(value):
        raise InvalidArgument(f"{field}: control characters are not allowed")


def check_id(image_id: str, field: str) -> None:
    """An image id: 1..MAX_ID_BYTES bytes of UTF-8 without control characters."""
    check_text(image_id, field, MAX_ID_BYTES)


def check_metadata(metadata: Mapping[str, str], field: str) -> None:
    """Metadata of one image: entry count, key/value sizes and the total in bytes."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{field}: {len(metadata)} entries, the limit is {MAX_METADATA_ENTRIES}")
    total = 0
    for key, value in metadata.items():
        check_text(key, f"{field} key", MAX_METADATA_KEY_BYTES)
        check_text(value, f"{field}[{key[:32]!r}]", MAX_METADATA_VALUE_BYTES, allow_empty=True)
        total += len(key.encode("utf-8")) + len(value.encode("utf-8"))
    if total > MAX_METADATA_BYTES:
        raise InvalidArgument(f"{field}: {total} bytes in all, the limit is {MAX_METADATA_BYTES}")


def check_stored_shapes(dim: int, regions: int, local: int, local_dim: int, field: str) -> None:
    """Shapes of one stored image's features: global (dim,), regional (regions, dim), local
    keypoints (local, 4) with descriptors (local, local_dim); 0 = the part is absent."""
    if not 1 <= dim <= MAX_VECTOR_DIM:
        raise InvalidArgument(f"{field}.global: dimension must be in 1..{MAX_VECTOR_DIM}, got {dim}")
    if regions > MAX_REGIONS_PER_IMAGE:
        raise InvalidArgument(f"{field}.regional: {regions} regional vectors, the limit is {MAX_REGIONS_PER_IMAGE}")
    if local > MAX_LOCAL_FEATURES_PER_IMAGE:
        raise InvalidArgument(f"{field}.local: {local} keypoints, the limit is {MAX_LOCAL_FEATURES_PER_IMAGE}")
    if local and not 1 <= local_dim <= MAX_LOCAL_DESCRIPTOR_DIM:
        raise InvalidArgument(f"{field}.local.descriptors: dimension must be in 1..{MAX_LOCAL_DESCRIPTOR_DIM}, got {local_dim}")


def check_image_bytes(data: bytes, field: str) -> None:
    """Encoded image bytes: present and at most MAX_IMAGE_BYTES."""
    if not data:
        raise InvalidArgument(f"{field}: empty image bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{field}: {len(data)} bytes, the limit is {MAX_IMAGE_BYTES}")


def check_vector(tensor: types_pb2.Tensor, field: str) -> None:
    """A query descriptor: shape (D,) with 1 <= D <= MAX_VECTOR_DIM and matching data size.

    Finiteness is checked after decoding (``services.broker.search_pipeline.unit_vector``).
    """
    shape = list(tensor.shape)
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_VECTOR_DIM:
        raise InvalidArgument(f"{field}: shape must be [D] with 1 <= D <= {MAX_VECTOR_DIM}, got {shape[:4]}")
    itemsize = {types_pb2.DTYPE_FLOAT32: 4, types_pb2.DTYPE_FLOAT16: 2, types_pb2.DTYPE_INT8: 1}.get(tensor.dtype)
    if itemsize is None:
        raise InvalidArgument(f"{field}: dtype must be FLOAT32, FLOAT16 or INT8")
    if len(tensor.data) != shape[0] * itemsize:
        raise InvalidArgument(f"{field}: shape {shape} needs {shape[0] * itemsize} bytes of data, got {len(tensor.data)}")
    if not math.isfinite(tensor.scale):
        raise InvalidArgument(f"{field}.scale: must be finite")


def check_crop(box: types_pb2.Box, field: str = "crop") -> None:
    """A crop box: finite, 0 <= x1 < x2 <= MAX_CROP_COORD, likewise y."""
    coords = (box.x1, box.y1, box.x2, box.y2)
    if not all(math.isfinite(c) for c in coords):
        raise InvalidArgument(f"{field}: coordinates must be finite, got {list(coords)}")
    if not (0 <= box.x1 < box.x2 <= MAX_CROP_COORD and 0 <= box.y1 < box.y2 <= MAX_CROP_COORD):
        raise InvalidArgument(f"{field}: need 0 <= x1 < x2 <= {MAX_CROP_COORD:g} and 0 <= y1 < y2, got {list(coords)}")


def check_finite_range(value: float, field: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """A float parameter in [lo, hi] (ends open when asked); NaN and infinities are refused."""
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InvalidArgument(f"{field}: must be in {left}{lo:g}, {hi:g}{right}, got {value}")


def check_int_range(value: int, field: str, lo: int, hi: int) -> None:
    """An integer parameter in lo..hi."""
    if not lo <= value <= hi:
        raise InvalidArgument(f"{field}: must be in {lo}..{hi}, got {value}")


# --- public API of issue 13: get, list, batch search, filters ------------------------------
MAX_GET_IDS = 1000
MAX_LIST_PAGE = 1000
DEFAULT_LIST_PAGE = 100
MAX_CURSOR_BYTES = 2048
MAX_BATCH_QUERIES = 64
MAX_FILTER_CONDITIONS = 16
MAX_FILTER_VALUES = 256


def parse_filter_number(text: str) -> float:
    """A metadata value or range bound read as a number: a finite decimal number, or an ISO-8601
    date / date-time (naive = UTC) as its Unix time in seconds. Raises ValueError otherwise."""
    s = text.strip()
    try:
        x = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(x):
            raise ValueError(f"{text[:32]!r} is not a finite number")
        return x
    if len(s) < 10 or not s[:4].isdigit() or s[4] != "-":
        raise ValueError(f"{text[:32]!r} is neither a number nor an ISO-8601 date")
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{text[:32]!r} is neither a number nor an ISO-8601 date") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def check_filter(flt: types_pb2.Filter, field: str = "filter") -> None:
    """A metadata filter: condition count, keys, values, ranges (bounds readable, satisfiable)."""
    if len(flt.all) > MAX_FILTER_CONDITIONS:
        raise InvalidArgument(f"{field}.all: {len(flt.all)} conditions, the limit is {MAX_FILTER_CONDITIONS}")
    for i, c in enumerate(flt.all):
        f = f"{field}.all[{i}]"
        check_text(c.key, f"{f}.key", MAX_METADATA_KEY_BYTES)
        which = c.WhichOneof("test")
        if which is None:
            raise InvalidArgument(f"{f}: set one of equals, any_of or range")
        if which == "equals":
            check_text(c.equals, f"{f}.equals", MAX_METADATA_VALUE_BYTES, allow_empty=True)
        elif which == "any_of":
            values = c.any_of.values
            if not 1 <= len(values) <= MAX_FILTER_VALUES:
                raise InvalidArgument(f"{f}.any_of.values: must hold 1..{MAX_FILTER_VALUES} values, got {len(values)}")
            for j, v in enumerate(values):
                check_text(v, f"{f}.any_of.values[{j}]", MAX_METADATA_VALUE_BYTES, allow_empty=True)
        else:
            r = c.range
            if not r.min and not r.max:
                raise InvalidArgument(f"{f}.range: set min, max or both")
            bounds = {}
            for name in ("min", "max"):
                text = getattr(r, name)
                if text:
                    check_text(text, f"{f}.range.{name}", 64)
                    try:
                        bounds[name] = parse_filter_number(text)
                    except ValueError as exc:
                        raise InvalidArgument(f"{f}.range.{name}: {exc}") from None
            if "min" in bounds and "max" in bounds:
                lo, hi = bounds["min"], bounds["max"]
                if lo > hi or (lo == hi and (r.min_exclusive or r.max_exclusive)):
                    raise InvalidArgument(f"{f}.range: unsatisfiable, min {r.min!r} is not below max {r.max!r}")

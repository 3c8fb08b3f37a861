"""Revisited Oxford/Paris ground truth: loading, validation and query crops.

The revisitop ground truth (Radenović et al., CVPR 2018) is a dict::

    {'imlist': [db names], 'qimlist': [query names],
     'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [...], 'hard': [...], 'junk': [...]}, ...]}

with one ``gnd`` entry per query and 0-based indices into ``imlist``. It is read from the
official ``.pkl`` or from the same dict stored as ``.json``. Pickles are read with an
allow-list unpickler (plain containers and numpy arrays only), so a ground-truth file cannot
run code.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LABEL_FIELDS = ("easy", "hard", "junk")

# Globals a revisitop pickle may reference: numpy arrays/scalars (old and new module paths).
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }
)


class GroundTruthError(ValueError):
    """The ground truth is malformed; the message names the offending field."""


@dataclass(frozen=True)
class GroundTruth:
    """Validated revisitop ground truth.

    Attributes
    ----------
    imlist : list of str
        Database image names (no extension), ``n_db`` of them.
    qimlist : list of str
        Query image names, ``n_queries`` of them.
    gnd : list of dict
        One dict per query: ``'bbx'`` a tuple ``(x1, y1, x2, y2)`` of floats, and
        ``'easy'``, ``'hard'``, ``'junk'`` int64 arrays of 0-based indices into ``imlist``.
    """

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    @property
    def n_db(self) -> int:
        """Number of database images."""
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.qimlist)


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"ground-truth pickle references {module}.{name}, which is not allowed"
            )
        return super().find_class(module, name)


def load_ground_truth(path: str | os.PathLike[str]) -> GroundTruth:
    """Load and validate a revisitop ground-truth file.

    Parameters
    ----------
    path : str or PathLike
        A ``.pkl``/``.pickle`` (official format) or ``.json`` file holding the dict described
        in the module docstring.

    Returns
    -------
    GroundTruth

    Raises
    ------
    GroundTruthError
        Unknown extension or malformed content (the message names the field).
    OSError
        The file cannot be read.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        try:
            raw = _AllowListUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise GroundTruthError(f"{path}: not a readable ground-truth pickle: {exc}") from exc
    elif suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GroundTruthError(f"{path}: invalid JSON: {exc}") from exc
    else:
        raise GroundTruthError(f"{path}: unsupported extension {suffix!r} (use .pkl or .json)")
    return parse_ground_truth(raw)


def parse_ground_truth(raw: Any) -> GroundTruth:
    """Validate an in-memory revisitop ground-truth dict.

    Parameters
    ----------
    raw : Mapping
        ``{'imlist', 'qimlist', 'gnd'}`` as in the module docstring; index lists may be lists
        or integer numpy arrays, ``bbx`` a list/array of 4 numbers.

    Returns
    -------
    GroundTruth

    Raises
    ------
    GroundTruthError
        The message names the offending field, e.g. ``gnd[3].junk[2]``.
    """
    if not isinstance(raw, Mapping):
        raise GroundTruthError(f"ground truth must be a dict, got {type(raw).__name__}")
    for field in ("imlist", "qimlist", "gnd"):
        if field not in raw:
            raise GroundTruthError(f"ground truth is missing field {field!r}")
    imlist = _names(raw["imlist"], "imlist")
    qimlist = _names(raw["qimlist"], "qimlist")
    entries = raw["gnd"]
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise GroundTruthError(f"gnd must be a list, got {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise GroundTruthError(
            f"gnd has {len(entries)} entries but qimlist has {len(qimlist)} queries"
        )
    gnd = [_query_entry(entry, i, len(imlist)) for i, entry in enumerate(entries)]
    return GroundTruth(imlist=imlist, qimlist=qimlist, gnd=gnd)


def _names(value: Any, field: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise GroundTruthError(f"{field} must be a list of names, got {type(value).__name__}")
    names = []
    for j, name in enumerate(value):
        if not isinstance(name, str):
            raise GroundTruthError(f"{field}[{j}] must be a string, got {type(name).__name__}")
        names.append(name)
    return names


def _query_entry(entry: Any, i: int, n_db: int) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise GroundTruthError(f"gnd[{i}] must be a dict, got {type(entry).__name__}")
    for field in ("bbx", *LABEL_FIELDS):
        if field not in entry:
            raise GroundTruthError(f"gnd[{i}] is missing field {field!r}")
    parsed: dict[str, Any] = {"bbx": _bbx(entry["bbx"], f"gnd[{i}].bbx")}
    for field in LABEL_FIELDS:
        parsed[field] = _indices(entry[field], f"gnd[{i}].{field}", n_db)
    return parsed


def _bbx(value: Any, field: str) -> tuple[float, float, float, float]:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise GroundTruthError(f"{field} must be 4 numbers, got {value!r}") from exc
    if arr.shape != (4,) or not all(math.isfinite(v) for v in arr):
        raise GroundTruthError(f"{field} must be 4 finite numbers, got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in arr)
    if x2 <= x1 or y2 <= y1:
        raise GroundTruthError(f"{field} must satisfy x1 < x2 and y1 < y2, got {value!r}")
    return x1, y1, x2, y2


def _indices(value: Any, field: str, n_db: int) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise GroundTruthError(f"{field} must be a list of indices, got {type(value).__name__}")
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        # JSON gives ints; accept integral floats but nothing else (bools, strings, 1.5).
        for j, v in enumerate(arr.tolist()):
            integral = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
            if isinstance(v, bool) or not integral:
                raise GroundTruthError(f"{field}[{j}] must be an integer index, got {v!r}")
    out = arr.astype(np.int64)
    bad = np.flatnonzero((out < 0) | (out >= n_db))
    if bad.size:
        j = int(bad[0])
        raise GroundTruthError(f"{field}[{j}] = {out[j]} is not an index into imlist (n={n_db})")
    return out

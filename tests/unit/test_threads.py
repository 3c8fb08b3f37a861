"""One thread budget per process: faiss (OpenMP), OpenCV and numpy's BLAS all take it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, cv2, faiss
from threadpoolctl import threadpool_info
from services.common.threads import limit_numeric_threads
limit_numeric_threads({n}, openmp_too={openmp_too})
import numpy
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and p.get("threading_layer") != "openmp"]
print(json.dumps({{"cv2": cv2.getNumThreads(), "faiss": faiss.omp_get_max_threads(), "blas": blas}}))
"""


def _probe(n: int, openmp_too: bool) -> dict:
    # a process of its own: the limits hold for the rest of the process that sets them
    out = subprocess.run([sys.executable, "-c", PROBE.format(n=n, openmp_too=openmp_too)], capture_output=True, text=True,
                         check=True, env={"PATH": "", "OMP_NUM_THREADS": "2"}, timeout=120)
    return json.loads(out.stdout)


def test_every_pool_takes_the_budget() -> None:
    got = _probe(1, True)
    assert got["cv2"] == 1 and got["faiss"] == 1
    assert got["blas"] and set(got["blas"]) == {1}  # numpy's BLAS is found and sized


def test_openmp_can_be_left_alone() -> None:
    got = _probe(1, False)
    assert got["faiss"] == 2 and got["cv2"] == 1 and set(got["blas"]) == {1}


def test_the_budget_is_at_least_one() -> None:
    from services.common.threads import limit_numeric_threads

    with pytest.raises(ValueError, match="threads must be >= 1"):
        limit_numeric_threads(0)

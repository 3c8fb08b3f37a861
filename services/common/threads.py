"""One thread budget per process for every numeric pool it uses.

A process that runs numeric work sizes all of its pools from one number: faiss's OpenMP
(searches, graph builds), OpenCV's (the robust fits of verification), and the BLAS that numpy
calls (verification's matching products). Left alone, each pool takes every core of the node,
and two pools (or two processes) on the same cores oversubscribe them: two shards on two cores
ran four matching threads and their products took 2-3x the single-thread time (BENCHMARKS.md,
"Fewer verified candidates").
"""

from __future__ import annotations

__all__ = ["limit_numeric_threads"]


def limit_numeric_threads(threads: int, *, openmp_too: bool = True) -> None:
    """Size OpenCV's pool and every BLAS with a pool of its own to ``threads`` (>= 1) for the
    rest of this process; with ``openmp_too`` also the OpenMP pool (faiss, and a BLAS built on
    OpenMP such as faiss's own, which shares it). ``openmp_too=False`` leaves faiss's threads as
    they are (a broker whose few verify threads must not also narrow its graph builds)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    import cv2
    from threadpoolctl import ThreadpoolController

    cv2.setNumThreads(threads)
    libs = ThreadpoolController().lib_controllers
    for lib in libs:
        if lib.user_api == "openmp" or getattr(lib, "threading_layer", "") == "openmp":
            if openmp_too:
                lib.set_num_threads(threads)
        elif lib.user_api == "blas":
            lib.set_num_threads(threads)
    if openmp_too:
        import faiss

        faiss.omp_set_num_threads(threads)  # loads faiss's OpenMP where it was not yet

"""The approximate index loupe trains when exact search stops fitting: one rule for shards
(search) and the broker (the collection's kNN graph)."""

from __future__ import annotations

import math


def ivfpq_factory(n: int, dim: int, train_n: int | None = None) -> str:
    """faiss factory string of an IVF-PQ index for ``n`` vectors of ``dim``.

    ~4√n inverted lists (a power of two, 256..65536) and ≈ 64-byte codes (PQ with the largest
    m ≤ 64 that divides ``dim``). "np": no polysemous training (it multiplies training time by
    ~15, and loupe re-scores or tolerates the codes' approximation anyway). With ``train_n``
    training vectors the lists are capped at ``train_n / 39`` (faiss's floor per centroid).
    """
    nlist = 2 ** int(round(math.log2(max(256.0, min(65536.0, 4 * math.sqrt(max(n, 1)))))))
    if train_n is not None:
        nlist = min(nlist, 2 ** max(0, int(math.log2(max(train_n // 39, 1)))))
    m = max(d for d in range(1, 65) if dim % d == 0)
    return f"IVF{nlist},PQ{m}np"

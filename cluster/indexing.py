"""Client-side helpers of the CLI: list image files and stream them into a cluster."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from loupe.client import ImageToAdd, RetrievalClient

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def list_images(directory: str) -> list[str]:
    """Image files under ``directory`` (recursive), sorted for a deterministic order."""
    if not os.path.isdir(directory):
        raise ValueError(f"images: {directory!r} is not a directory")
    out = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.join(root, f))
    return sorted(out)


def image_id_for(path: str, root: str) -> str:
    """Id of an indexed file: its path relative to ``root`` without the extension."""
    return os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")


@dataclass(frozen=True)
class IndexReport:
    """Outcome of ``index_paths``."""

    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def index_paths(
    client: RetrievalClient,
    items: Sequence[tuple[str, str]],
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> IndexReport:
    """Stream (id, path) pairs to the broker in batches; ``on_progress(n)`` after each read."""

    def gen() -> Iterator[ImageToAdd]:
        for image_id, path in items:
            with open(path, "rb") as f:
                data = f.read()
            yield ImageToAdd(image_id, data, {"path": path})
            if on_progress is not None:
                on_progress(1)

    t0 = time.perf_counter()
    resp = client.add_images(gen(), batch_size=batch_size)
    return IndexReport(int(resp.added), time.perf_counter() - t0)

"""The description plan of an extractor replica: which backbone passes an image needs, and the
global, regional and local descriptors computed from them (one image, or a batch of images
that share stacked passes). No gRPC here: ``services.extractor.servicer`` is the wire face.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.limits import check_crop
from services.extractor.backbone import load_backbone, preprocess
from services.extractor.config import ExtractorConfig
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor, resize_max_side
from services.extractor.local_features import LocalConfig, LocalExtractor, LocalFeatures
from services.extractor.local_features import _resize as _local_resize
from services.extractor.model_file import read_trained_head
from services.extractor.pooling import regional_vectors
from services.extractor.runtime import BackboneRunner
from services.extractor.shared_pass import SharedPasses
from services.space.regions import reduce_regions
from loupe.v1 import types_pb2

Description = tuple[np.ndarray, "np.ndarray | None", "LocalFeatures | None"]
"""``(vector (D,), regional (R, D) or None, local features or None)`` of one image."""


@dataclass(frozen=True)
class Job:
    """One image waiting for the model (already decoded, cropped and resized)."""

    image: np.ndarray
    want_local: bool
    want_regional: bool
    query: bool = False  # a search's query: described on the query runtime


def crop_and_resize(image: np.ndarray, crop: types_pb2.Box | None, max_side: int) -> np.ndarray:
    """Crop (H, W, 3) ``image`` to ``crop`` (original pixels) then shrink so max(H, W) <= max_side."""
    if crop is not None:
        check_crop(crop)  # NaN/inf/unordered boxes are INVALID_ARGUMENT, not an internal error
        h, w = image.shape[:2]
        x1, y1 = max(0, int(np.floor(crop.x1))), max(0, int(np.floor(crop.y1)))
        x2, y2 = min(w, int(np.ceil(crop.x2))), min(h, int(np.ceil(crop.y2)))
        if x2 - x1 < 8 or y2 - y1 < 8:
            raise InvalidArgument(
                f"crop: box [{crop.x1}, {crop.y1}, {crop.x2}, {crop.y2}] leaves less than 8x8 pixels of a {w}x{h} image"
            )
        image = np.ascontiguousarray(image[y1:y2, x1:x2])
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return image


SNAP_FACTOR = 2.0 ** 0.25
"""A query's local level moves onto a global pass whose side is within this factor of its own."""


def snapped_scales(shape: tuple[int, ...], local: LocalConfig, global_config: GlobalConfig) -> tuple[float, ...]:
    """The local pyramid's scales for an image of ``shape`` ``(H, W, ...)``, each level below
    full size moved onto the global descriptor's pass of the nearest side when that side is
    within ``SNAP_FACTOR`` (a quarter octave) of the level's own: the level then *is* that pass
    (the same resize of the same image), so it costs no backbone pass of its own.

    The global passes are half an octave apart, so every level between them snaps; one below
    the smallest (a small crop's quarter-size level) keeps its own, cheap pass. On a 1024-px
    photo the levels (512, 256 px) are global passes already and nothing changes. Returns
    ``local.scales`` unchanged when the image is larger than the local working side (its
    levels are resizes of the working image, not of the image the global passes resize).
    """
    side = max(shape[:2])
    if side > local.max_side:
        return local.scales
    base = min(side, global_config.max_side)
    passes = sorted({max(1, round(base * s)) for s in global_config.scales})
    out: list[float] = []
    for s in local.scales:
        target = s * side
        nearest = min(passes, key=lambda p: abs(math.log(p / target)))
        snapped = nearest / side  # exactly resize_max_side(image, nearest)'s factor
        if s < 1.0 and abs(math.log(nearest / target)) <= math.log(SNAP_FACTOR) and snapped < 1.0 and snapped not in out:
            out.append(snapped)
        else:
            out.append(s)
    return tuple(out) if len(set(out)) == len(out) else local.scales


class Describer:
    """The replica's model and how it describes images.

    Loads the backbone (and a trained head / attention head when configured) and runs the
    backbone passes through ``config.runtime``. ``describe_batch`` is what the replica's
    batch thread calls; ``describe`` describes one image.
    """

    def __init__(self, config: ExtractorConfig) -> None:
        self.config = config
        self.model = load_backbone(config.weights_path or None, fuse_bn=True)  # serving only: no training here
        self.trained_head = read_trained_head(config.weights_path) if config.weights_path else None
        global_config = config.global_config
        if self.trained_head is not None:  # serve the trained descriptor exactly as trained
            global_config = dataclasses.replace(global_config, pooling=self.trained_head.pooling, gem_p=self.trained_head.gem_p)
        self.global_config = global_config
        self.attention_head = None
        if config.attention_path:
            from services.extractor.attention import load_attention

            self.attention_head, meta = load_attention(config.attention_path)
            local_config = dataclasses.replace(config.local_config, layer=meta["layer"], score="attention")
        else:
            local_config = config.local_config
        self.local_config = local_config
        self.query_local_config = (dataclasses.replace(local_config, max_side=config.query_local_max_side)
                                   if config.query_local_max_side else local_config)
        self.taps = [local_config.layer, "head"]
        threads = config.threads or torch.get_num_threads()
        self.backbone = BackboneRunner(self.model, self.taps, config.runtime, threads=threads, cache_dir=config.runtime_cache_dir)
        # queries come in new sizes: a runtime that does not recompile per size (the same ONNX
        # file), loaded now when the index runtime has already exported it, else on the first query
        self._threads = threads
        self._query_backbone: BackboneRunner | None = None
        if not config.query_runtime or config.query_runtime == config.runtime:
            self._query_backbone = self.backbone
        elif config.runtime != "torch":
            self._query_backbone = self._load_query_backbone()
        self.local_extractor = LocalExtractor(self.model, local_config, self.attention_head)
        self._model_lock = threading.Lock()
        # The working image serves every descriptor; each shrinks it further to its own max_side.
        self.working_side = max(global_config.max_side, local_config.max_side, config.regional_max_side)
        self.dim = int(self.describe(np.zeros((64, 64, 3), np.uint8), want_local=False, want_regional=False)[0].shape[0])

    def levels(self, image: np.ndarray, want_local: bool, want_regional: bool, query: bool = False) -> list[tuple[np.ndarray, list[str]]]:
        """The backbone inputs ``describe`` will ask for, with their taps: the same resizes,
        in the same order (a level this plan misses is simply computed on demand)."""
        levels: list[tuple[np.ndarray, list[str]]] = []
        gc, lc = self.global_config, self._local_config(query, image.shape)
        base = resize_max_side(image, gc.max_side)
        side = max(base.shape[:2])
        for s in gc.scales:
            levels.append((base if s == 1.0 else resize_max_side(image, max(1, round(side * s))), self.taps))
        if want_regional and self.config.regional_max_side:
            levels.append((resize_max_side(image, self.config.regional_max_side), self.taps))
        if want_local:
            working = _local_resize(image, min(1.0, lc.max_side / max(image.shape[:2])))
            levels.extend((_local_resize(working, s), [lc.layer]) for s in lc.scales)
        unique: list[tuple[np.ndarray, list[str]]] = []
        for level, taps in levels:
            for i, (seen, seen_taps) in enumerate(unique):
                if seen.shape == level.shape and np.array_equal(seen, level):
                    unique[i] = (seen, list(dict.fromkeys([*seen_taps, *taps])))
                    break
            else:
                unique.append((level, taps))
        return unique

    def _load_query_backbone(self) -> BackboneRunner:
        return BackboneRunner(self.model, self.taps, self.config.query_runtime, threads=self._threads, cache_dir=self.config.runtime_cache_dir)

    @property
    def query_backbone(self) -> BackboneRunner:
        """The runner of search queries' passes (``ExtractorConfig.query_runtime``)."""
        if self._query_backbone is None:
            self._query_backbone = self._load_query_backbone()  # under the model lock (describe_batch)
        return self._query_backbone

    def _runner(self, query: bool) -> BackboneRunner:
        return self.query_backbone if query else self.backbone

    def _local_config(self, query: bool, shape: tuple[int, ...]) -> LocalConfig:
        """The local features' settings for an image of ``shape`` ``(H, W, 3)``: a query's pyramid
        snaps its levels onto the global passes (``snapped_scales``); indexed images keep the
        configured scales."""
        if not query:
            return self.local_config
        lc = self.query_local_config
        scales = snapped_scales(shape, lc, self.global_config)
        return lc if scales == lc.scales else dataclasses.replace(lc, scales=scales)

    def _prefilled_passes(self, images: list[np.ndarray], plans: list[list[tuple[np.ndarray, list[str]]]],
                          query: bool = False) -> list[SharedPasses]:
        """``SharedPasses`` per image with the planned levels computed as stacked batches.

        All ``images`` have the same shape, so their i-th planned levels do too."""
        runner = self._runner(query)
        passes = [SharedPasses(runner, [self.local_config.layer]) for _ in images]  # type: ignore[arg-type]
        n_levels = min(len(p) for p in plans)
        for i in range(n_levels):
            if len({p[i][0].shape for p in plans}) != 1:
                continue  # not the same plan (cannot happen for same-shape inputs; computed on demand)
            taps = list(dict.fromkeys(t for p in plans for t in p[i][1]))
            xs = [preprocess(p[i][0]) for p in plans]
            maps = runner.forward_taps(torch.cat(xs), taps)
            for j, sp in enumerate(passes):
                sp.prefill(xs[j], {t: m[j : j + 1] for t, m in maps.items()})
        return passes

    def describe_batch(self, jobs: list[Job]) -> list[Description | BaseException]:
        """Describe each job's image; images of the same size share stacked backbone passes.

        Returns one ``(vector, regional, local)`` or exception per job, in order."""
        out: list[Description | BaseException] = [RuntimeError("not described")] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.image.shape, job.query), []).append(i)
        with self._model_lock:
            for (_, query), idx in groups.items():
                passes: list[SharedPasses | None] = [None] * len(idx)
                if len(idx) > 1:
                    try:
                        want_local = any(jobs[i].want_local for i in idx)
                        want_regional = any(jobs[i].want_regional for i in idx)
                        plans = [self.levels(jobs[i].image, want_local, want_regional, query) for i in idx]
                        passes = list(self._prefilled_passes([jobs[i].image for i in idx], plans, query))
                    except Exception:  # noqa: BLE001 - each image then runs (and fails) on its own
                        passes = [None] * len(idx)
                for k, i in enumerate(idx):
                    try:
                        out[i] = self.describe(jobs[i].image, jobs[i].want_local, jobs[i].want_regional, passes[k], query=query)
                    except Exception as exc:  # noqa: BLE001 - per image, to that image's caller
                        out[i] = exc
        return out

    def describe(
        self, image: np.ndarray, want_local: bool, want_regional: bool = True, passes: SharedPasses | None = None, *, query: bool = False
    ) -> Description:
        """(D,) global and (R, D) regional descriptors (through the trained head if any; regional
        None unless ``want_regional``) and the local features (None unless ``want_local``), from
        shared backbone passes (``SharedPasses``; ``passes`` may come prefilled by a batch) on the
        replica's runtime, or its query runtime for a search's ``query``."""
        # every pass keeps the local tap on its way; a pass runs to the head only when asked to
        if passes is None:
            passes = SharedPasses(self._runner(query), [self.local_config.layer])  # type: ignore[arg-type]
        g = GlobalExtractor(passes, self.global_config).extract(image)  # type: ignore[arg-type]
        vector, regional = g.vector, g.regional if want_regional else None
        if want_regional and self.config.regional_max_side:
            level = resize_max_side(image, self.config.regional_max_side)
            with torch.inference_mode():
                fmap = passes.forward_features(preprocess(level))
                regional = regional_vectors(fmap, self.global_config.rmac_levels)[0].numpy()
        loc = LocalExtractor(passes, self._local_config(query, image.shape), self.attention_head).extract(image) if want_local else None  # type: ignore[arg-type]
        if self.trained_head is not None:
            vector = self.trained_head.apply(vector[None, :])[0]
            regional = self.trained_head.apply(regional) if regional is not None else None
        if regional is not None and self.config.regions_per_image:
            regional = reduce_regions(regional[None], self.config.regions_per_image)[0]
        return vector, regional, loc

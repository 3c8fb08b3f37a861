"""gRPC servicer of an extractor replica (internal ``loupe.v1.Extractor``)."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import cv2
import grpc
import numpy as np
import torch
from prometheus_client import Histogram

from loupe.tensors import to_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc, types_pb2
from services.common.errors import InvalidArgument, grpc_errors
from services.common.limits import MAX_IMAGE_PIXELS, check_crop
from services.common.grpc_server import RunningServer, ServerOptions, create_sync_server
from services.common.images import ImageTooLarge, InvalidImage, decode_image
from services.common.metrics import ExtractorMetrics
from services.extractor.backbone import load_backbone, preprocess
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor, resize_max_side
from services.extractor.local_features import LocalConfig, LocalExtractor, LocalFeatures
from services.extractor.model_file import read_trained_head
from services.extractor.batching import Batcher
from services.extractor.local_features import _resize as _local_resize
from services.extractor.pooling import regional_vectors
from services.extractor.runtime import RUNTIMES, BackboneRunner
from services.extractor.shared_pass import SharedPasses
from services.rerank.regions import MAX_REGIONS_PER_IMAGE, reduce_regions


DEFAULT_RUNTIME = "openvino"
DEFAULT_BATCH_IMAGES = 4
DEFAULT_BATCH_WAIT_MS = 2.0
MAX_BATCH_IMAGES = 64
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

Description = tuple[np.ndarray, "np.ndarray | None", "LocalFeatures | None"]


@dataclass(frozen=True)
class _Job:
    """One image waiting for the model (already decoded, cropped and resized)."""

    image: np.ndarray
    want_local: bool
    want_regional: bool


@dataclass(frozen=True)
class ExtractorConfig:
    """What a replica computes.

    Attributes
    ----------
    weights_path : str
        Backbone weights file; "" = the packaged ImageNet EfficientNet-Lite0.
    global_config : GlobalConfig
        Pooling, scales and max side of the global descriptor.
    max_pixels : int
        Decompression-bomb guard: images whose header declares more pixels are refused.
    local_config : LocalConfig
        DELF-style local features (served when a request sets ``want_local``).
    attention_path : str
        Trained attention-head file (``loupe train-attention``); "" = score keypoints by
        feature L2 norm.
    regional_max_side : int
        Longest side of the image the R-MAC regional vectors are pooled from; 0 = the global
        descriptor's largest scale. Default 1024, the working image (its backbone pass is shared
        with the local features): with k-means-reduced regions, regional diffusion on the ROxford
        subset scored Medium mAP 58.0 from 1024-px regions against 54.4 from 512-px ones.
    regions_per_image : int
        The regional vectors are summarised by this many spherical k-means centroids
        (``services.rerank.regions``), for database images and queries alike; 0 keeps every
        R-MAC region (~21). Default 5, as the paper: regional diffusion on the ROxford subset
        went from Medium mAP 44.6 (every region) to 58.0 (5 centroids).
    runtime : {"torch", "onnxruntime", "openvino"}
        What runs the backbone passes (``services.extractor.runtime``); descriptors match eager
        torch to float rounding. Default from BENCHMARKS.md "Extraction speed (issue 14)".
    runtime_cache_dir : str
        Where the exported backbone (ONNX) is cached ("" = ``~/.cache/loupe/backbones``).
    threads : int
        Intra-op threads of the backbone runtime (0 = ``torch.get_num_threads()``, which the
        replica sets from ``--extractor-threads``).
    batch_images : int
        Most images described in one batch (1 = no batching). Concurrent Extract calls whose
        working images have the same size share stacked backbone passes.
    batch_wait_ms : float
        Longest a batch waits for more images after its first (milliseconds).
    """

    weights_path: str = ""
    global_config: GlobalConfig = GlobalConfig()
    max_pixels: int = MAX_IMAGE_PIXELS  # services/common/limits.py
    local_config: LocalConfig = LocalConfig()
    attention_path: str = ""
    regional_max_side: int = 1024
    regions_per_image: int = 5
    runtime: str = DEFAULT_RUNTIME
    runtime_cache_dir: str = ""
    threads: int = 0
    batch_images: int = DEFAULT_BATCH_IMAGES
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"extractor.runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.threads < 0:
            raise ValueError(f"extractor.threads must be >= 0, got {self.threads}")
        if not 1 <= self.batch_images <= MAX_BATCH_IMAGES:
            raise ValueError(f"extractor.batch_images must be in 1..{MAX_BATCH_IMAGES}, got {self.batch_images}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"extractor.batch_wait_ms must be in 0..1000, got {self.batch_wait_ms}")
        if self.max_pixels <= 0:
            raise ValueError(f"extractor.max_pixels must be > 0, got {self.max_pixels}")
        if not 0 <= self.regions_per_image <= MAX_REGIONS_PER_IMAGE:
            raise ValueError(f"extractor.regions_per_image must be in 0..{MAX_REGIONS_PER_IMAGE}, got {self.regions_per_image}")
        if self.regional_max_side != 0 and self.regional_max_side < 32:
            raise ValueError(f"extractor.regional_max_side must be 0 or >= 32, got {self.regional_max_side}")


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


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    """Runs the model on one batch at a time (the replica's threads are for the backbone runtime).

    Requests decode their images on the server's worker threads; the model work goes through
    one :class:`Batcher` thread, which stacks the backbone passes of same-size images.
    """

    def __init__(self, config: ExtractorConfig, metrics: ExtractorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
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
        self.taps = [local_config.layer, "head"]
        self.backbone = BackboneRunner(
            self.model, self.taps, config.runtime, threads=config.threads or torch.get_num_threads(), cache_dir=config.runtime_cache_dir
        )
        self.local_extractor = LocalExtractor(self.model, local_config, self.attention_head)
        self._model_lock = threading.Lock()
        # The working image serves every descriptor; each shrinks it further to its own max_side.
        self.working_side = max(global_config.max_side, local_config.max_side, config.regional_max_side)
        self.dim = int(self._describe(np.zeros((64, 64, 3), np.uint8), want_local=False, want_regional=False)[0].shape[0])
        if metrics is not None:
            self._batch_hist = Histogram(
                "loupe_extractor_batch_images", "Images described together in one batch by the replica (count).",
                ["replica"], buckets=BATCH_BUCKETS, registry=metrics.registry,
            )
            self._batch_hist.labels(metrics.replica)
        self.batcher: Batcher[_Job, Description] = Batcher(
            self.describe_batch, config.batch_images, config.batch_wait_ms / 1e3, on_batch=self._on_batch, name="loupe-extract-batcher"
        )

    def close(self) -> None:
        """Stop the batch worker (after the images already queued)."""
        self.batcher.close()

    def _on_batch(self, size: int, waits: list[float]) -> None:
        m = self.metrics
        if m is not None:
            for w in waits:
                m.queue_wait_seconds.labels(m.replica).observe(w)
            self._batch_hist.labels(m.replica).observe(size)

    def _levels(self, image: np.ndarray, want_local: bool, want_regional: bool) -> list[tuple[np.ndarray, list[str]]]:
        """The backbone inputs ``_describe`` will ask for, with their taps: the same resizes,
        in the same order (a level this plan misses is simply computed on demand)."""
        levels: list[tuple[np.ndarray, list[str]]] = []
        gc, lc = self.global_config, self.local_config
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

    def _prefilled_passes(self, images: list[np.ndarray], plans: list[list[tuple[np.ndarray, list[str]]]]) -> list[SharedPasses]:
        """``SharedPasses`` per image with the planned levels computed as stacked batches.

        All ``images`` have the same shape, so their i-th planned levels do too."""
        passes = [SharedPasses(self.backbone, [self.local_config.layer]) for _ in images]  # type: ignore[arg-type]
        n_levels = min(len(p) for p in plans)
        for i in range(n_levels):
            if len({p[i][0].shape for p in plans}) != 1:
                continue  # not the same plan (cannot happen for same-shape inputs; computed on demand)
            taps = list(dict.fromkeys(t for p in plans for t in p[i][1]))
            xs = [preprocess(p[i][0]) for p in plans]
            maps = self.backbone.forward_taps(torch.cat(xs), taps)
            for j, sp in enumerate(passes):
                sp.prefill(xs[j], {t: m[j : j + 1] for t, m in maps.items()})
        return passes

    def describe_batch(self, jobs: list[_Job]) -> list[Description | BaseException]:
        """Describe each job's image; images of the same size share stacked backbone passes.

        Returns one ``(vector, regional, local)`` or exception per job, in order."""
        out: list[Description | BaseException] = [RuntimeError("not described")] * len(jobs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.image.shape, []).append(i)
        with self._model_lock:
            for idx in groups.values():
                passes: list[SharedPasses | None] = [None] * len(idx)
                if len(idx) > 1:
                    try:
                        want_local = any(jobs[i].want_local for i in idx)
                        want_regional = any(jobs[i].want_regional for i in idx)
                        plans = [self._levels(jobs[i].image, want_local, want_regional) for i in idx]
                        passes = list(self._prefilled_passes([jobs[i].image for i in idx], plans))
                    except Exception:  # noqa: BLE001 - each image then runs (and fails) on its own
                        passes = [None] * len(idx)
                for k, i in enumerate(idx):
                    try:
                        out[i] = self._describe(jobs[i].image, jobs[i].want_local, jobs[i].want_regional, passes[k])
                    except Exception as exc:  # noqa: BLE001 - per image, to that image's caller
                        out[i] = exc
        return out

    def _describe(
        self, image: np.ndarray, want_local: bool, want_regional: bool = True, passes: SharedPasses | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, LocalFeatures | None]:
        """(D,) global and (R, D) regional descriptors (through the trained head if any; regional
        None unless ``want_regional``) and the local features (None unless ``want_local``), from
        shared backbone passes (``SharedPasses``; ``passes`` may come prefilled by a batch)."""
        # every pass keeps the local tap on its way; a pass runs to the head only when asked to
        if passes is None:
            passes = SharedPasses(self.backbone, [self.local_config.layer])  # type: ignore[arg-type]
        g = GlobalExtractor(passes, self.global_config).extract(image)  # type: ignore[arg-type]
        vector, regional = g.vector, g.regional if want_regional else None
        if want_regional and self.config.regional_max_side:
            level = resize_max_side(image, self.config.regional_max_side)
            with torch.inference_mode():
                fmap = passes.forward_features(preprocess(level))
                regional = regional_vectors(fmap, self.global_config.rmac_levels)[0].numpy()
        loc = LocalExtractor(passes, self.local_config, self.attention_head).extract(image) if want_local else None  # type: ignore[arg-type]
        if self.trained_head is not None:
            vector = self.trained_head.apply(vector[None, :])[0]
            regional = self.trained_head.apply(regional) if regional is not None else None
        if regional is not None and self.config.regions_per_image:
            regional = reduce_regions(regional[None], self.config.regions_per_image)[0]
        return vector, regional, loc

    def features(self, image_bytes: bytes, crop: types_pb2.Box | None, want_regional: bool, want_local: bool) -> types_pb2.ImageFeatures:
        """Decode, crop, resize and describe one image."""
        side = self.working_side
        try:
            image = decode_image(image_bytes, max_pixels=self.config.max_pixels, max_side=None if crop is not None else side)
        except (InvalidImage, ImageTooLarge) as exc:
            raise type(exc)(f"image: {exc}") from None
        image = crop_and_resize(image, crop, side)
        vector, regional, loc = self.batcher.submit(_Job(image, want_local, want_regional))
        out = types_pb2.ImageFeatures(width=image.shape[1], height=image.shape[0])
        out.__getattribute__("global").CopyFrom(to_tensor(vector.astype(np.float32)))
        if regional is not None:
            out.regional.CopyFrom(to_tensor(regional.astype(np.float16)))
        if loc is not None:
            out.local.keypoints.CopyFrom(to_tensor(loc.keypoints.astype(np.float32)))
            out.local.descriptors.CopyFrom(to_tensor(loc.descriptors.astype(np.float16)))
        return out

    @grpc_errors
    def Extract(self, request: extractor_pb2.ExtractRequest, context: grpc.ServicerContext) -> extractor_pb2.ExtractResponse:
        t0 = time.perf_counter()
        m = self.metrics
        if m is None:
            return self._extract(request, t0)
        m.queue_depth.labels(m.replica).inc()
        try:
            resp = self._extract(request, t0)
        except Exception as exc:  # counted, then re-raised to grpc_errors' table
            m.failures.labels(m.replica, type(exc).__name__).inc()
            raise
        finally:
            m.queue_depth.labels(m.replica).dec()
            m.extract_seconds.labels(m.replica).observe(time.perf_counter() - t0)
        m.images.labels(m.replica).inc()
        return resp

    def _extract(self, request: extractor_pb2.ExtractRequest, t0: float) -> extractor_pb2.ExtractResponse:
        if not request.image:
            raise InvalidArgument("image: empty image bytes")
        crop = request.crop if request.HasField("crop") else None
        feats = self.features(request.image, crop, request.want_regional, request.want_local)
        return extractor_pb2.ExtractResponse(features=feats, seconds=time.perf_counter() - t0)

    @grpc_errors
    def Describe(self, request: extractor_pb2.DescribeRequest, context: grpc.ServicerContext) -> extractor_pb2.DescribeResponse:
        gc = self.global_config
        return extractor_pb2.DescribeResponse(
            backbone="efficientnet-lite0" + (" (trained)" if self.trained_head is not None else ""),
            pooling=gc.pooling,
            dim=self.dim,
            scales=list(gc.scales),
            max_side=self.working_side,
            local_dim=self.local_extractor.dim,
        )


def create_server(
    config: ExtractorConfig, opts: ServerOptions, metrics: ExtractorMetrics | None = None
) -> tuple[RunningServer, ExtractorServicer]:
    """Load the model and start an Extractor server; returns it (with its port) and the servicer.

    At most ``opts.workers`` requests wait in the replica; more get RESOURCE_EXHAUSTED.
    ``metrics`` (optional) records images, failures, latency and the queue for the model.
    """
    servicer = ExtractorServicer(config, metrics)
    running = create_sync_server(
        lambda s: extractor_pb2_grpc.add_ExtractorServicer_to_server(servicer, s), ["loupe.v1.Extractor"], opts
    )
    return running, servicer

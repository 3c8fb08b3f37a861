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
from services.extractor.pooling import regional_vectors
from services.extractor.shared_pass import SharedPasses
from services.rerank.regions import MAX_REGIONS_PER_IMAGE, reduce_regions


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
    """

    weights_path: str = ""
    global_config: GlobalConfig = GlobalConfig()
    max_pixels: int = MAX_IMAGE_PIXELS  # services/common/limits.py
    local_config: LocalConfig = LocalConfig()
    attention_path: str = ""
    regional_max_side: int = 1024
    regions_per_image: int = 5

    def __post_init__(self) -> None:
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
    """Runs the model on one request at a time (the replica's threads are for torch)."""

    def __init__(self, config: ExtractorConfig, metrics: ExtractorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.backbone = load_backbone(config.weights_path or None, fuse_bn=True)  # serving only: no training here
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
        self.local_extractor = LocalExtractor(self.backbone, local_config, self.attention_head)
        self._model_lock = threading.Lock()
        # The working image serves every descriptor; each shrinks it further to its own max_side.
        self.working_side = max(global_config.max_side, local_config.max_side, config.regional_max_side)
        self.dim = int(self._describe(np.zeros((64, 64, 3), np.uint8), want_local=False, want_regional=False)[0].shape[0])

    def _describe(
        self, image: np.ndarray, want_local: bool, want_regional: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, LocalFeatures | None]:
        """(D,) global and (R, D) regional descriptors (through the trained head if any; regional
        None unless ``want_regional``) and the local features (None unless ``want_local``), from
        shared backbone passes (``SharedPasses``)."""
        # every pass keeps the local tap on its way; a pass runs to the head only when asked to
        passes = SharedPasses(self.backbone, [self.local_config.layer])
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
        t_wait = time.perf_counter()
        with self._model_lock:
            if self.metrics is not None:
                self.metrics.observe_wait(t_wait)
            vector, regional, loc = self._describe(image, want_local, want_regional)
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

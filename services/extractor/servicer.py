"""gRPC servicer of an extractor replica (internal ``loupe.v1.Extractor``): decoding, the batch
thread, metrics and the wire format around a :class:`~services.extractor.describer.Describer`."""

from __future__ import annotations

import time

import grpc
import numpy as np
from prometheus_client import Histogram

from loupe.tensors import to_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc, types_pb2
from services.common.errors import InvalidArgument, grpc_errors
from services.common.grpc_server import RunningServer, ServerOptions, create_sync_server
from services.common.images import ImageTooLarge, InvalidImage, decode_image
from services.common.metrics import ExtractorMetrics
from services.extractor.batching import Batcher
from services.extractor.config import ExtractorConfig
from services.extractor.describer import Describer, Description, Job, crop_and_resize

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    """Runs the model on one batch at a time (the replica's threads are for the backbone runtime).

    Requests decode their images on the server's worker threads; the model work goes through
    one :class:`Batcher` thread, which stacks the backbone passes of same-size images.
    """

    def __init__(self, config: ExtractorConfig, metrics: ExtractorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.describer = Describer(config)
        if metrics is not None:
            self._batch_hist = Histogram(
                "loupe_extractor_batch_images", "Images described together in one batch by the replica (count).",
                ["replica"], buckets=BATCH_BUCKETS, registry=metrics.registry,
            )
            self._batch_hist.labels(metrics.replica)
        self.batcher: Batcher[Job, Description] = Batcher(
            self.describer.describe_batch, config.batch_images, config.batch_wait_ms / 1e3, on_batch=self._on_batch,
            name="loupe-extract-batcher",
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

    def features(self, image_bytes: bytes, crop: types_pb2.Box | None, want_regional: bool, want_local: bool,
                 query: bool = False) -> types_pb2.ImageFeatures:
        """Decode, crop, resize and describe one image."""
        side = self.describer.working_side
        try:
            image = decode_image(image_bytes, max_pixels=self.config.max_pixels, max_side=None if crop is not None else side)
        except (InvalidImage, ImageTooLarge) as exc:
            raise type(exc)(f"image: {exc}") from None
        image = crop_and_resize(image, crop, side)
        vector, regional, loc = self.batcher.submit(Job(image, want_local, want_regional, query))
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
        feats = self.features(request.image, crop, request.want_regional, request.want_local, request.query)
        return extractor_pb2.ExtractResponse(features=feats, seconds=time.perf_counter() - t0)

    @grpc_errors
    def Describe(self, request: extractor_pb2.DescribeRequest, context: grpc.ServicerContext) -> extractor_pb2.DescribeResponse:
        d = self.describer
        gc = d.global_config
        return extractor_pb2.DescribeResponse(
            backbone="efficientnet-lite0" + (" (trained)" if d.trained_head is not None else ""),
            pooling=gc.pooling,
            dim=d.dim,
            scales=list(gc.scales),
            max_side=d.working_side,
            local_dim=d.local_extractor.dim,
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

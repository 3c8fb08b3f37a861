"""A real extractor gRPC server with dynamic batching: concurrent calls get their own image's
features (equal to describing that image alone), and a bad image fails only its own call."""

from __future__ import annotations

import threading

import cv2
import grpc
import numpy as np
import pytest
from skimage import data

from loupe.tensors import from_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc
from services.common.grpc_server import ServerOptions
from services.common.images import decode_image
from metric_names import exported_names
from services.common.metrics import ExtractorMetrics
from services.extractor.global_descriptor import GlobalConfig
from services.extractor.local_features import LocalConfig
from services.extractor.config import ExtractorConfig
from services.extractor.describer import crop_and_resize
from services.extractor.servicer import create_server


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()  # lossless: same pixels decoded


@pytest.fixture(scope="module")
def server():
    cfg = ExtractorConfig(
        global_config=GlobalConfig(pooling="rmac", max_side=256), local_config=LocalConfig(max_side=384, max_keypoints=300),
        regional_max_side=384, batch_images=4, batch_wait_ms=50.0,
    )
    metrics = ExtractorMetrics.create(0, capacity=4)
    running, servicer = create_server(cfg, ServerOptions(host="127.0.0.1", port=0, workers=4, max_concurrent_rpcs=64), metrics)
    yield running, servicer, metrics
    running.stop(1.0)
    servicer.close()


def test_concurrent_calls_are_batched_and_each_gets_its_own_features(server) -> None:
    running, servicer, metrics = server
    photos = [data.astronaut()[:384, :320], data.chelsea(), np.ascontiguousarray(data.coffee()[:384, :320]), data.rocket()[:300, :384]]
    requests = [extractor_pb2.ExtractRequest(image=_png(p), want_regional=True, want_local=True) for p in photos]
    requests.append(extractor_pb2.ExtractRequest(image=b"not an image", want_regional=True))
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = extractor_pb2_grpc.ExtractorStub(ch)
            barrier.wait()
            try:
                results[i] = stub.Extract(requests[i], timeout=600).features
            except grpc.RpcError as exc:
                results[i] = exc.code()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert results[-1] == grpc.StatusCode.INVALID_ARGUMENT
    for photo, feats in zip(photos, results):
        assert not isinstance(feats, grpc.StatusCode), feats
        side = servicer.describer.working_side  # the image as the server decodes and resizes it, described alone
        image = crop_and_resize(decode_image(_png(photo), max_side=side), None, side)
        vector, regional, loc = servicer.describer.describe(image, want_local=True)
        assert (feats.height, feats.width) == image.shape[:2]
        np.testing.assert_allclose(from_tensor(getattr(feats, "global")), vector, atol=1e-4)
        np.testing.assert_allclose(from_tensor(feats.regional).astype(np.float32), regional, atol=2e-3)  # float16 on the wire
        np.testing.assert_allclose(from_tensor(feats.local.keypoints)[:, :2], loc.keypoints[:, :2], atol=1e-3)
    samples = {s.name: s.value for f in metrics.registry.collect() for s in f.samples if not s.name.endswith("_bucket")}
    assert samples["loupe_extractor_batch_images_sum"] == 4  # every good image went through a batch, once
    assert 1 <= samples["loupe_extractor_batch_images_count"] <= 4
    assert "loupe_extractor_batch_images_bucket" in exported_names([metrics.registry])

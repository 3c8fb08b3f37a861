"""Backbone runtimes (ONNX Runtime, OpenVINO) give eager torch's descriptors on real photos.

Tolerance, stated once: backbone tap maps within 1e-4 relative (max |diff| / max |ref|);
global and regional vectors cosine >= 0.999 per vector; >= 98 % of the local keypoints at the
same place and level (near-tied scores may swap at the top-N cut), their descriptors cosine
>= 0.999 and scores within 1e-4 relative. The ONNX graph has dynamic height and width, so odd
sizes (a different TensorFlow "SAME" padding at every stride-2 layer) are checked too.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from skimage import data

from services.extractor.backbone import load_backbone, preprocess
from services.extractor.global_descriptor import GlobalConfig
from services.extractor.local_features import LocalConfig
from services.extractor.runtime import BackboneRunner
from services.extractor.config import ExtractorConfig
from services.extractor.describer import Describer

ACCELERATED = [
    "openvino",  # the default: a dependency, never skipped
    pytest.param(
        "onnxruntime",
        marks=pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed (test extra)"),
    ),
]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
COS_MIN = 0.999
TAP_REL_TOL = 1e-4


def _cfg(runtime: str, cache_dir: str) -> ExtractorConfig:
    # the served descriptor set, at smaller sizes so that the test stays fast
    return ExtractorConfig(
        global_config=GlobalConfig(pooling="rmac", max_side=256), local_config=LocalConfig(max_side=384, max_keypoints=300),
        regional_max_side=384, runtime=runtime, runtime_cache_dir=cache_dir,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="module")
def eager(cache_dir) -> Describer:
    return Describer(_cfg("torch", cache_dir))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("runtime", ACCELERATED)
def test_tap_maps_match_eager_at_odd_and_even_sizes_and_batches(runtime: str, cache_dir: str) -> None:
    model = load_backbone(None, fuse_bn=True)
    runner = BackboneRunner(model, ["block10", "head"], runtime, threads=2, cache_dir=cache_dir)
    rng = np.random.default_rng(0)
    for h, w, b in ((96, 128, 1), (181, 256, 1), (257, 255, 1), (75, 331, 2)):
        x = torch.cat([preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(b)])
        got = runner.forward_taps(x, ["block10", "head"])
        with torch.inference_mode():
            ref = model.forward_taps(x, ["block10", "head"])
        for tap in ("block10", "head"):
            assert got[tap].shape == ref[tap].shape, (tap, h, w)
            err = float((got[tap] - ref[tap]).abs().max() / ref[tap].abs().max())
            assert err < TAP_REL_TOL, f"{runtime} {tap} at {h}x{w}x{b}: relative error {err:.2e}"


@pytest.mark.parametrize("runtime", ACCELERATED)
def test_the_first_tap_alone_runs_on_the_graph_that_stops_there(runtime: str, cache_dir: str) -> None:
    model = load_backbone(None, fuse_bn=True)
    runner = BackboneRunner(model, ["block10", "head"], runtime, threads=2, cache_dir=cache_dir)
    calls: list[tuple[str, ...]] = []
    for outputs, run in list(runner._runs.items()):
        runner._runs[outputs] = lambda arr, run=run, outputs=outputs: calls.append(outputs) or run(arr)
    x = preprocess(np.random.default_rng(1).integers(0, 256, (181, 256, 3), dtype=np.uint8))
    local = runner.forward_taps(x, ["block10"])
    both = runner.forward_taps(x, ["head", "block10"])
    assert calls == [("block10",), ("block10", "head")] and set(local) == {"block10"} and set(both) == {"block10", "head"}
    # the same layer either way: the truncated graph computes exactly what the full one does up to it
    err = float((local["block10"] - both["block10"]).abs().max() / both["block10"].abs().max())
    assert err < TAP_REL_TOL


def test_a_tap_outside_the_exported_ones_falls_back_to_eager(cache_dir: str) -> None:
    model = load_backbone(None, fuse_bn=True)
    runner = BackboneRunner(model, ["block10", "head"], "openvino", threads=1, cache_dir=cache_dir)
    x = preprocess(np.full((64, 96, 3), 100, np.uint8))
    got = runner.forward_taps(x, ["block5"])["block5"]
    with torch.inference_mode():
        assert torch.equal(got, model.forward_taps(x, ["block5"])["block5"])


def test_the_export_is_cached(cache_dir: str) -> None:
    model = load_backbone(None, fuse_bn=True)
    BackboneRunner(model, ["block10", "head"], "openvino", threads=1, cache_dir=cache_dir)
    again = BackboneRunner(model, ["block10", "head"], "openvino", threads=1, cache_dir=cache_dir)
    assert again.export_s == 0.0


def test_unknown_runtime_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="extractor.runtime"):
        ExtractorConfig(runtime="tensorrt")


@pytest.mark.parametrize("runtime", ACCELERATED)
def test_descriptors_match_eager_on_real_photos(runtime: str, eager: Describer, cache_dir: str) -> None:
    svc = Describer(_cfg(runtime, cache_dir))
    for name in PHOTOS:
        image = getattr(data, name)()
        v0, r0, l0 = eager.describe(image, want_local=True)
        v1, r1, l1 = svc.describe(image, want_local=True)
        assert _cos(v0, v1) >= COS_MIN, name
        assert r0.shape == r1.shape and _cos(r0, r1).min() >= COS_MIN, name
        k0 = {tuple(np.round(k[:3], 3)): i for i, k in enumerate(l0.keypoints)}
        pairs = [(k0[key], j) for j, k in enumerate(l1.keypoints) if (key := tuple(np.round(k[:3], 3))) in k0]
        assert len(pairs) >= 0.98 * len(l0.keypoints), f"{name}: {len(pairs)} of {len(l0.keypoints)} keypoints in common"
        i0, i1 = np.array(pairs).T
        assert _cos(l0.descriptors[i0], l1.descriptors[i1]).min() >= COS_MIN, name
        np.testing.assert_allclose(l1.keypoints[i1, 3], l0.keypoints[i0, 3], rtol=1e-4)


def test_queries_run_on_the_query_runtime_with_the_same_descriptors(cache_dir: str) -> None:
    """Search queries (``Job.query``) go to ``query_runtime`` (ONNX Runtime: no recompiles per new
    size), index images to ``runtime``; the descriptors agree to float rounding."""
    from dataclasses import replace

    from services.extractor.describer import Job

    svc = Describer(replace(_cfg("openvino", cache_dir), query_runtime="onnxruntime"))
    assert svc.query_backbone.runtime == "onnxruntime" and svc.backbone.runtime == "openvino"
    calls = {"index": 0, "query": 0}
    for kind, runner in (("index", svc.backbone), ("query", svc.query_backbone)):
        forward = runner.forward_taps

        def counting(x, taps, _forward=forward, _kind=kind):
            calls[_kind] += 1
            return _forward(x, taps)

        runner.forward_taps = counting
    image = data.chelsea()
    (v0, r0, l0), (v1, r1, l1) = svc.describe_batch([Job(image, True, True), Job(image, True, True, query=True)])
    assert calls["index"] > 0 and calls["query"] > 0
    assert _cos(v0, v1) >= COS_MIN and _cos(r0, r1).min() >= COS_MIN
    assert len(l0.keypoints) == len(l1.keypoints) and _cos(l0.descriptors, l1.descriptors).mean() >= COS_MIN
    same = Describer(replace(_cfg("openvino", cache_dir), query_runtime=""))
    assert same.query_backbone is same.backbone
    with pytest.raises(ValueError, match="query_runtime"):
        ExtractorConfig(query_runtime="tensorrt")

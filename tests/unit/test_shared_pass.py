"""Shared backbone passes between the global descriptor, regional vectors and local features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.extractor.backbone import load_backbone, preprocess
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor
from services.extractor.local_features import LocalConfig, LocalExtractor
from services.extractor.pooling import regional_vectors
from services.extractor.config import ExtractorConfig
from services.extractor.describer import Describer, snapped_scales
from services.extractor.shared_pass import SharedPasses


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(None, fuse_bn=True)


def _image(h: int = 192, w: int = 256) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    return np.kron(base, np.ones((16, 16, 1), dtype=np.uint8)) // 2 + rng.integers(0, 128, (h, w, 3), dtype=np.uint8)


class _Counting:
    """Counts backbone passes (a thin wrapper for the test)."""

    def __init__(self, backbone) -> None:
        self.backbone, self.calls = backbone, 0

    def parameters(self):
        return self.backbone.parameters()

    def forward_taps(self, x, taps):
        self.calls += 1
        return self.backbone.forward_taps(x, taps)


def test_same_input_is_served_from_memory(backbone) -> None:
    counting = _Counting(backbone)
    passes = SharedPasses(counting, ["block10", "head"])  # type: ignore[arg-type]
    x = preprocess(_image())
    with torch.inference_mode():
        a = passes.forward_taps(x, ["block10"])["block10"]
        b = passes.forward_features(x.clone())
        c = passes.forward_features(preprocess(_image(128, 128)))
    assert counting.calls == 2 and passes.computed == 2
    assert a.shape[1] == 112 and b.shape[1] == 1280 and c.shape[-2:] == (4, 4)


def test_servicer_shares_passes_and_matches_separate_extraction(backbone) -> None:
    g_cfg = GlobalConfig(pooling="rmac", max_side=128)
    l_cfg = LocalConfig(max_side=256, max_keypoints=200)
    svc = Describer(ExtractorConfig(global_config=g_cfg, local_config=l_cfg, regional_max_side=256, regions_per_image=0, runtime="torch"))
    image = _image()  # 192 x 256: the working image itself
    counting = _Counting(svc.backbone)
    svc.backbone = counting  # type: ignore[assignment]
    vector, regional, loc = svc.describe(image, want_local=True)
    # global 128/91/64 px + local 64/128/256 px: the 128 and 64 px levels are shared, the
    # 256 px local level also gives the regional vectors
    assert counting.calls == 4
    expect_g = GlobalExtractor(backbone, g_cfg).extract(image)
    expect_l = LocalExtractor(backbone, l_cfg).extract(image)
    np.testing.assert_allclose(vector, expect_g.vector, atol=1e-6)
    np.testing.assert_allclose(loc.keypoints, expect_l.keypoints, atol=1e-5)
    np.testing.assert_allclose(loc.descriptors, expect_l.descriptors, atol=1e-5)
    with torch.inference_mode():
        expect_r = regional_vectors(backbone.forward_features(preprocess(image)), 3)[0].numpy()
    np.testing.assert_allclose(regional, expect_r, atol=1e-6)


def test_regional_from_the_global_scale_when_asked(backbone) -> None:
    g_cfg = GlobalConfig(pooling="rmac", max_side=128)
    svc = Describer(ExtractorConfig(global_config=g_cfg, local_config=LocalConfig(max_side=256), regional_max_side=0, regions_per_image=0, runtime="torch"))
    _, regional, loc = svc.describe(_image(), want_local=False)
    assert loc is None
    np.testing.assert_allclose(regional, GlobalExtractor(backbone, g_cfg).extract(_image()).regional, atol=1e-6)


def test_regions_are_reduced_to_centroids_by_default() -> None:
    svc = Describer(ExtractorConfig(global_config=GlobalConfig(pooling="rmac", max_side=128), local_config=LocalConfig(max_side=256)))
    _, regional, _ = svc.describe(_image(), want_local=False)
    assert regional.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(regional, axis=1), 1.0, atol=1e-5)


def test_a_query_without_regions_runs_only_the_global_passes(backbone) -> None:
    g_cfg = GlobalConfig(pooling="rmac", max_side=128)
    svc = Describer(ExtractorConfig(global_config=g_cfg, local_config=LocalConfig(max_side=256), regional_max_side=256))
    counting = _Counting(svc.backbone)
    svc.backbone = counting  # type: ignore[assignment]
    vector, regional, loc = svc.describe(_image(), want_local=False, want_regional=False)
    assert regional is None and loc is None and vector.shape == (1280,)
    assert counting.calls == 3  # 128/91/64 px: no 256-px pass for regions nobody asked for


def test_query_local_levels_snap_onto_the_global_passes() -> None:
    g_cfg, l_cfg = GlobalConfig(pooling="rmac", max_side=512), LocalConfig(max_side=1024)
    # a 1024-px photo: its 512/256-px local levels are global passes already; nothing moves
    assert snapped_scales((768, 1024), l_cfg, g_cfg) == l_cfg.scales
    # a 696-px crop: the half-size level (348 px) becomes the 362-px global pass; the
    # quarter-size one (174 px) is more than a quarter octave below the smallest (256) and stays
    got = snapped_scales((403, 696), l_cfg, g_cfg)
    assert got[1:] == (362 / 696, 1.0) and got[0] == 0.25
    # a 990-px crop: both lower levels land on global passes (512 and 256 px)
    assert snapped_scales((990, 768), l_cfg, g_cfg) == (256 / 990, 512 / 990, 1.0)
    # small crops: the global passes are the crop's own halvings (the same 166-px level)
    assert snapped_scales((222, 333), l_cfg, g_cfg) == (0.25, 166 / 333, 1.0)
    # larger than the local working side: levels come from the working image, left alone
    assert snapped_scales((1500, 1200), l_cfg, g_cfg) == l_cfg.scales


def test_a_snapped_query_level_is_served_by_the_global_pass(backbone) -> None:
    g_cfg = GlobalConfig(pooling="rmac", max_side=128)
    svc = Describer(ExtractorConfig(global_config=g_cfg, local_config=LocalConfig(max_side=256, max_keypoints=200), regional_max_side=256,
                                    regions_per_image=0, runtime="torch", query_runtime="torch"))
    counting = _Counting(svc.backbone)
    svc.backbone = svc._query_backbone = counting  # type: ignore[assignment]
    image = _image(176, 240)  # global 128/91/64 px; local 240/120/60 px: 120 → the 128-px pass, 60 → 64
    _, _, as_index = svc.describe(image, want_local=True)
    index_calls, counting.calls = counting.calls, 0
    _, _, as_query = svc.describe(image, want_local=True, query=True)
    assert index_calls == 6 and counting.calls == 4  # the query's two lower levels ride on global passes
    # the query's keypoints come from the snapped levels: same full-size level, other lower ones
    expect = LocalExtractor(backbone, LocalConfig(max_side=256, max_keypoints=200, scales=(64 / 240, 128 / 240, 1.0))).extract(image)
    np.testing.assert_allclose(as_query.keypoints, expect.keypoints, atol=1e-4)
    np.testing.assert_allclose(as_query.descriptors, expect.descriptors, atol=1e-5)
    assert not np.array_equal(as_query.keypoints, as_index.keypoints)

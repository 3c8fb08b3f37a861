"""Pooling functions (hand-computed values) and GlobalExtractor aggregation (fake backbone)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor
from services.extractor.pooling import gem, l2n, mac, regional_vectors, rmac, rmac_regions, spoc

# One image, two channels, 2x2 map.
X = torch.tensor([[[[1.0, 5.0], [3.0, 2.0]], [[0.0, 0.0], [4.0, 0.0]]]])


def test_mac_spoc_gem_by_hand() -> None:
    torch.testing.assert_close(mac(X), torch.tensor([[5.0, 4.0]]))
    torch.testing.assert_close(spoc(X), torch.tensor([[2.75, 1.0]]))
    torch.testing.assert_close(gem(X, p=1.0), spoc(X), atol=1e-6, rtol=0)
    torch.testing.assert_close(gem(X, p=2.0)[0, 0], torch.tensor(math.sqrt(39 / 4)))
    torch.testing.assert_close(gem(X, p=3.0)[0, 1], torch.tensor((64 / 4) ** (1 / 3)), atol=1e-5, rtol=0)
    assert gem(X, p=50.0)[0, 0] == pytest.approx(5.0, rel=0.03)  # tends to MAC


def test_gem_clamps_negatives() -> None:
    x = torch.full((1, 1, 2, 2), -1.0)
    assert torch.isfinite(gem(x)).all() and float(gem(x)) == pytest.approx(1e-6, rel=1e-3)


def test_pooling_shapes_and_memory_format() -> None:
    x = torch.rand(3, 7, 5, 6).contiguous(memory_format=torch.channels_last)
    for f in (mac, spoc, gem, rmac):
        assert f(x).shape == (3, 7)
    assert regional_vectors(x).shape == (3, len(rmac_regions(5, 6)), 7)


def test_rmac_regions_landscape_24x32_by_hand() -> None:
    # w = 24; a 2-region long side gives overlap 1 - 8/24 ~ 0.67, the closest to 0.4 of the
    # candidates, so the long side has l + 1 regions at level l.
    expected = [(0, 0, 32, 24)]
    expected += [(x, 0, 24, 24) for x in (0, 8)]
    expected += [(x, y, 16, 16) for y in (0, 8) for x in (0, 8, 16)]
    expected += [(x, y, 12, 12) for y in (0, 6, 12) for x in (0, 6, 13, 20)]
    np.testing.assert_array_equal(rmac_regions(24, 32), np.array(expected))
    # Portrait is the transpose (same regions, column-major order).
    portrait = sorted(map(tuple, rmac_regions(32, 24)[:, [1, 0, 3, 2]].tolist()))
    assert portrait == sorted(expected)


def test_rmac_regions_square_by_hand() -> None:
    expected = [(0, 0, 3, 3), (0, 0, 3, 3)]
    expected += [(x, y, 2, 2) for y in (0, 1) for x in (0, 1)]
    expected += [(x, y, 1, 1) for y in (0, 1, 2) for x in (0, 1, 2)]
    np.testing.assert_array_equal(rmac_regions(3, 3), np.array(expected))


@pytest.mark.parametrize(("H", "W"), [(1, 1), (1, 9), (7, 2), (24, 32), (32, 43), (11, 47), (40, 40)])
def test_rmac_regions_inside_the_map(H: int, W: int) -> None:
    r = rmac_regions(H, W)
    assert (r[:, :2] >= 0).all() and (r[:, 2:] >= 1).all()
    assert (r[:, 0] + r[:, 2] <= W).all() and (r[:, 1] + r[:, 3] <= H).all()
    assert len(rmac_regions(H, W, L=1)) <= len(r)


def test_rmac_regions_validates() -> None:
    with pytest.raises(ValueError):
        rmac_regions(0, 5)


def test_rmac_by_hand_on_a_1x2_map() -> None:
    # 1x2 map: regions are the whole map, then (level 1, 3 regions on the long side)
    # columns 0, 0, 1; levels 2-3 have side floor(2/3) = 0 and are skipped.
    x = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])
    np.testing.assert_array_equal(
        rmac_regions(1, 2), [(0, 0, 2, 1), (0, 0, 1, 1), (0, 0, 1, 1), (1, 0, 1, 1)]
    )
    torch.testing.assert_close(
        regional_vectors(x)[0],
        torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0]]),
        atol=1e-5, rtol=0,
    )
    s = torch.tensor([2.8, 2.4])
    torch.testing.assert_close(rmac(x)[0], s / s.norm(), atol=1e-5, rtol=0)


def test_rmac_on_24x32_is_the_normalised_sum_of_21_regions() -> None:
    x = torch.rand(2, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    regions = rmac_regions(24, 32)
    assert len(regions) == 21
    manual = sum(l2n(x[..., y : y + h, x0 : x0 + w].amax(dim=(-2, -1))) for x0, y, w, h in regions)
    torch.testing.assert_close(rmac(x), l2n(manual))


@pytest.mark.parametrize("shape", [(1, 16, 24, 32), (2, 8, 32, 24), (1, 4, 9, 12), (1, 3, 1, 2)])
def test_serving_and_training_paths_pool_the_same_regions(shape: tuple[int, int, int, int]) -> None:
    """The grad-free path (numpy, channels-last) and the autograd path give the same vectors,
    and gradients still flow through R-MAC when training."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    served = regional_vectors(x)
    trained = regional_vectors(x.clone().requires_grad_(True))
    assert trained.requires_grad and not served.requires_grad
    torch.testing.assert_close(served, trained.detach(), atol=1e-6, rtol=0)
    leaf = x.clone().requires_grad_(True)
    rmac(leaf).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# -- GlobalExtractor with a fake stride-32 backbone ---------------------------------------


class _FakeBackbone(nn.Module):
    """``(1, 3, H, W) -> (1, 6, ceil(H/32), ceil(W/32))``, non-negative; records input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, 6).view(6, 1, 1, 1).repeat(1, 3, 1, 1))
        self.sizes: list[tuple[int, int]] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append((x.shape[-2], x.shape[-1]))
        pooled = F.avg_pool2d(x + 1.0, 32, ceil_mode=True) ** 2
        return F.relu(F.conv2d(pooled, self.weight) * torch.linspace(0.1, 1, pooled.shape[-1]))


def _image(h: int = 200, w: int = 300) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pooling": "avg"}, "pooling"),
        ({"gem_p": 0.0}, "gem_p"),
        ({"gem_p": float("inf")}, "gem_p"),
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, 1.5)}, "scales"),
        ({"rmac_levels": 0}, "rmac_levels"),
        ({"max_side": 10}, "max_side"),
        ({"max_side": 512.0}, "max_side"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GlobalConfig(**kwargs)


def test_config_defaults() -> None:
    cfg = GlobalConfig(scales=[1.0, 0.5])  # type: ignore[arg-type]
    assert cfg.scales == (1.0, 0.5)
    assert GlobalConfig().scales == pytest.approx((1.0, 2**-0.5, 0.5))


def test_extract_shapes_and_scales() -> None:
    fake = _FakeBackbone()
    feats = GlobalExtractor(fake, GlobalConfig(max_side=128)).extract(_image())  # type: ignore[arg-type]
    assert fake.sizes == [(85, 128), (61, 91), (43, 64)]  # levels resized from the given image
    assert feats.vector.shape == (6,) and feats.vector.dtype == np.float32
    assert np.linalg.norm(feats.vector) == pytest.approx(1.0, abs=1e-5)
    assert feats.regional.shape == (len(rmac_regions(3, 4)), 6)
    np.testing.assert_allclose(np.linalg.norm(feats.regional, axis=1), 1.0, atol=1e-5)


def test_multiscale_gem_aggregation_matches_cirtorch() -> None:
    fake = _FakeBackbone()
    cfg = GlobalConfig(gem_p=3.0, max_side=128)
    got = GlobalExtractor(fake, cfg).extract(_image()).vector  # type: ignore[arg-type]
    maps = [fake.forward_features(_prep(s)) for s in ((85, 128), (60, 91), (42, 64))]
    per_scale = torch.cat([l2n(gem(m, 3.0)) for m in maps])
    expected = l2n(per_scale.pow(3).mean(0).pow(1 / 3))
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-6)


def _prep(size: tuple[int, int]) -> torch.Tensor:
    import cv2

    from services.extractor.backbone import preprocess

    image = cv2.resize(_image(), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return preprocess(image)


def test_bench_extract_all_agrees_with_extract() -> None:
    """``bench/global_variants.py`` scores every pooling from one pass: it must match ``extract``."""
    from bench.global_variants import extract_all

    fake: Any = _FakeBackbone()
    image = _image()
    poolings = ("gem", "rmac", "mac", "spoc")
    out = extract_all(GlobalExtractor(fake, GlobalConfig(max_side=128)), image)
    assert set(out) == {f"{p}-{m}" for p in poolings for m in ("ss", "ms")} | {"regional"}
    for pooling in poolings:
        ms = GlobalExtractor(fake, GlobalConfig(pooling=pooling, max_side=128)).extract(image)
        np.testing.assert_allclose(out[f"{pooling}-ms"], ms.vector, atol=1e-6)
        cfg = GlobalConfig(pooling=pooling, max_side=128, scales=(1.0,))
        ss = GlobalExtractor(fake, cfg).extract(image)
        np.testing.assert_allclose(out[f"{pooling}-ss"], ss.vector, atol=1e-6)
        np.testing.assert_allclose(out["regional"], ss.regional, atol=1e-6)


def test_extract_rejects_bad_images() -> None:
    extractor = GlobalExtractor(_FakeBackbone())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        extractor.extract(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        extractor.extract(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError):
        extractor.extract(np.zeros((0, 10, 3), np.uint8))

"""DELF-style local features: receptive-field geometry, extraction contract, recovery of a
known warp through local features + verification, and the attention head."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from services.extractor.attention import (
    AttentionHead,
    AttentionTrainConfig,
    attention_pool,
    load_attention,
    save_attention,
    train_attention,
)
from services.extractor.backbone import EfficientNetLite0, load_backbone, preprocess
from services.extractor.local_features import (
    LocalConfig,
    LocalExtractor,
    LocalFeatures,
    receptive_field_centres,
)
from services.space.whitening import LocalPCA
from services.rerank.verify import VerifyParams, verify_pair

CONFIG = LocalConfig(max_keypoints=500)


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0:
    return load_backbone()


@pytest.fixture(scope="module")
def extractor(backbone: EfficientNetLite0) -> LocalExtractor:
    return LocalExtractor(backbone, CONFIG)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def astronaut_features(extractor: LocalExtractor, astronaut: np.ndarray) -> LocalFeatures:
    return extractor.extract(astronaut)


@pytest.fixture(scope="module")
def coffee_features(extractor: LocalExtractor) -> LocalFeatures:
    return extractor.extract(np.ascontiguousarray(data.coffee()))


@pytest.fixture(scope="module")
def pca(astronaut_features: LocalFeatures, coffee_features: LocalFeatures) -> LocalPCA:
    """LocalPCA-40 learned on two unrelated photos (not on the warped ones it is used on)."""
    return LocalPCA().fit(np.concatenate([astronaut_features.descriptors, coffee_features.descriptors]), dim=40)


# -- receptive fields -----------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "height", "width"), [("block11.expand", 377, 390), ("block6.expand", 150, 161)])
def test_receptive_field_centres_match_the_gradient_support(
    backbone: EfficientNetLite0, layer: str, height: int, width: int
) -> None:
    """The RF of an interior cell is the support of d(cell)/d(input); its centre must be the
    formula's (TensorFlow "SAME" padding makes it size dependent: odd and even sizes)."""
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    fmap = backbone.forward_taps(x, [layer])[layer]
    i, j = fmap.shape[2] // 2, fmap.shape[3] // 2
    fmap[0, :, i, j].sum().backward()
    ys, xs = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    assert 0 < ys.min() and ys.max() < height - 1, "RF must be interior for this check"
    assert 0 < xs.min() and xs.max() < width - 1, "RF must be interior for this check"
    centres_y = receptive_field_centres(layer, height)
    centres_x = receptive_field_centres(layer, width)
    assert (len(centres_y), len(centres_x)) == tuple(fmap.shape[2:])
    assert centres_y[i] == (ys.min() + ys.max()).item() / 2
    assert centres_x[j] == (xs.min() + xs.max()).item() / 2


def test_receptive_field_centres_are_a_stride_16_grid() -> None:
    centres = receptive_field_centres("block11.expand", 1024)
    assert len(centres) == 64
    np.testing.assert_array_equal(np.diff(centres), 16)
    with pytest.raises(ValueError, match="layer"):
        receptive_field_centres("head", 100)


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer": "block11"}, "layer"),  # stride 32
        ({"layer": "block4"}, "layer"),  # stride 8
        ({"layer": "block99"}, "block99"),
        ({"layer": "head"}, "layer"),
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -0.5)}, "scales"),
        ({"scales": (1.0, 1.0)}, "scales"),
        ({"max_keypoints": 0}, "max_keypoints"),
        ({"score": "max"}, "score"),
        ({"max_side": 8}, "max_side"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalConfig(**kwargs)


def test_attention_score_needs_a_matching_head(backbone: EfficientNetLite0) -> None:
    with pytest.raises(ValueError, match="attention_head"):
        LocalExtractor(backbone, LocalConfig(score="attention"))
    with pytest.raises(ValueError, match="attention_head"):
        LocalExtractor(backbone, LocalConfig(), AttentionHead(112))  # score="l2norm"
    with pytest.raises(ValueError, match="channels"):
        LocalExtractor(backbone, LocalConfig(layer="block10", score="attention"), AttentionHead(672))  # 112 ch


# -- extraction -----------------------------------------------------------------------------


def test_extract_contract(extractor: LocalExtractor, astronaut: np.ndarray, astronaut_features: LocalFeatures) -> None:
    kp, desc = astronaut_features
    assert kp.dtype == np.float32 and desc.dtype == np.float32
    assert kp.shape == (CONFIG.max_keypoints, 4)
    assert desc.shape == (CONFIG.max_keypoints, extractor.dim) == (CONFIG.max_keypoints, 112)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    h, w = astronaut.shape[:2]
    assert kp[:, 0].min() >= 0 and kp[:, 0].max() <= w - 1
    assert kp[:, 1].min() >= 0 and kp[:, 1].max() <= h - 1
    levels = np.array(CONFIG.scales)
    assert np.all(np.abs(kp[:, 2:3] / levels - 1).min(axis=1) < 0.005), "scale = level size / input size"
    assert len(np.unique(kp[:, 2])) > 1, "top-N must draw from several scales"
    assert np.all(np.diff(kp[:, 3]) <= 0), "sorted by decreasing score"


def test_scores_are_feature_norms(backbone: EfficientNetLite0, astronaut: np.ndarray) -> None:
    small = np.ascontiguousarray(astronaut[::2, ::2])
    single = LocalExtractor(backbone, LocalConfig(scales=(1.0,), max_keypoints=10))
    kp, _ = single.extract(small)
    with torch.inference_mode():
        fmap = backbone.forward_taps(preprocess(small), [CONFIG.layer])[CONFIG.layer][0]
    norms = torch.linalg.vector_norm(fmap, dim=0).flatten().sort(descending=True).values[:10]
    np.testing.assert_allclose(kp[:, 3], norms.numpy(), rtol=1e-5)


def test_large_input_is_downscaled_but_keypoints_stay_in_input_pixels(
    backbone: EfficientNetLite0, astronaut: np.ndarray, astronaut_features: LocalFeatures
) -> None:
    """A 4x upscaled astronaut with max_side=512 is extracted at the original size: the same
    cells come out, at 4x the coordinates and 1/4 the scale."""
    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    kp, _ = LocalExtractor(backbone, replace(CONFIG, max_side=512)).extract(big)
    levels = np.array(CONFIG.scales) / 4
    assert np.all(np.abs(kp[:, 2:3] / levels - 1).min(axis=1) < 0.005)
    assert kp[:, :2].min() >= 0 and kp[:, :2].max() <= 2047
    small = astronaut_features.keypoints[:, :2]
    back = (kp[:, :2] + 0.5) / 4 - 0.5
    dist = np.linalg.norm(back[:, None] - small[None], axis=2).min(axis=1)
    assert np.median(dist) < 0.01 and np.mean(dist < 0.01) > 0.8


def test_extract_rejects_bad_images(extractor: LocalExtractor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(np.zeros((64, 64), np.uint8))


def test_tiny_image_yields_few_features(extractor: LocalExtractor) -> None:
    kp, desc = extractor.extract(np.full((40, 30, 3), 128, np.uint8))
    assert 0 < len(kp) < CONFIG.max_keypoints and len(desc) == len(kp)


# -- warp recovery through local features + verification -------------------------------------


def _warp_error(estimated: np.ndarray, true: np.ndarray, size: int) -> float:
    """Median distance (px) between the two models' images of a grid over the query."""
    g = np.linspace(0, size - 1, 8)
    pts = np.array([(x, y, 1.0) for x in g for y in g])

    def apply(m: np.ndarray) -> np.ndarray:
        h = np.vstack([m, [0, 0, 1]]) if m.shape == (2, 3) else m
        p = pts @ h.T
        return p[:, :2] / p[:, 2:]

    return float(np.median(np.linalg.norm(apply(estimated) - apply(true), axis=1)))


@pytest.mark.parametrize("model", ["affine", "homography"])
def test_synthetic_warp_is_recovered(
    extractor: LocalExtractor,
    astronaut: np.ndarray,
    astronaut_features: LocalFeatures,
    coffee_features: LocalFeatures,
    pca: LocalPCA,
    model: str,
) -> None:
    size = astronaut.shape[0]
    if model == "affine":
        true = cv2.getRotationMatrix2D((size / 2, size / 2), 20, 0.75)
        true[:, 2] += (30, -20)
        warped = cv2.warpAffine(astronaut, true, (size, size), borderMode=cv2.BORDER_REFLECT)
    else:
        src = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
        dst = np.float32([[40, 20], [size - 10, 60], [size - 50, size - 30], [20, size - 70]])
        true = cv2.getPerspectiveTransform(src, dst)
        warped = cv2.warpPerspective(astronaut, true, (size, size), borderMode=cv2.BORDER_REFLECT)
    target = extractor.extract(warped)
    params = VerifyParams(model=model)
    query = (astronaut_features.keypoints, pca.apply(astronaut_features.descriptors))
    result = verify_pair(*query, target.keypoints, pca.apply(target.descriptors), params)
    assert result.inliers >= 100, result.inliers
    assert _warp_error(result.model, true, size) < 6.0
    unrelated = verify_pair(*query, coffee_features.keypoints, pca.apply(coffee_features.descriptors), params)
    assert unrelated.inliers < result.inliers / 5


# -- attention ------------------------------------------------------------------------------


def test_attention_head_and_pooling_shapes() -> None:
    head = AttentionHead(672, hidden=16)
    x = torch.randn(2, 672, 5, 7)
    att = head(x)
    assert att.shape == (2, 1, 5, 7) and bool((att > 0).all())
    pooled = attention_pool(x, att)
    assert pooled.shape == (2, 672)
    ones = attention_pool(x, torch.ones(2, 1, 5, 7))
    torch.testing.assert_close(ones, torch.nn.functional.normalize(x, dim=1).mean(dim=(2, 3)))


def test_attention_scores_keypoints(backbone: EfficientNetLite0, astronaut: np.ndarray) -> None:
    torch.manual_seed(0)
    head = AttentionHead(112, hidden=8)
    small = np.ascontiguousarray(astronaut[::2, ::2])
    ex = LocalExtractor(backbone, LocalConfig(scales=(1.0,), max_keypoints=20, score="attention"), head)
    kp, _ = ex.extract(small)
    with torch.inference_mode():
        fmap = backbone.forward_taps(preprocess(small), [CONFIG.layer])[CONFIG.layer]
        best = head(fmap).flatten().sort(descending=True).values[:20]
    np.testing.assert_allclose(kp[:, 3], best.numpy(), rtol=1e-5)


def test_train_attention_learns_and_roundtrips(
    backbone: EfficientNetLite0, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """Two classes (crops of two photos): the head + linear classifier fit them quickly."""
    coffee = np.ascontiguousarray(data.coffee())
    rng = np.random.default_rng(0)

    def crops(image: np.ndarray, n: int) -> list[np.ndarray]:
        h, w = image.shape[:2]
        out = []
        for _ in range(n):
            y, x = rng.integers(0, h - 200), rng.integers(0, w - 200)
            out.append(np.ascontiguousarray(image[y : y + 200, x : x + 200]))
        return out

    images = crops(astronaut, 4) + crops(coffee, 4)
    labels = [0] * 4 + [1] * 4
    torch.manual_seed(0)
    head = AttentionHead(112, hidden=32)
    config = AttentionTrainConfig(image_side=128, epochs=6, batch_size=4, lr=3e-3)
    history = train_attention(
        backbone, head, images, labels, config, val_images=crops(astronaut, 1) + crops(coffee, 1), val_labels=[0, 1]
    )
    assert len(history.loss) == len(history.train_accuracy) == len(history.val_accuracy) == 6
    assert history.loss[-1] < history.loss[0]
    assert history.train_accuracy[-1] == 1.0 and history.val_accuracy[-1] == 1.0
    assert not head.training

    path = tmp_path / "attention.pt"
    save_attention(head, path, layer=config.layer, meta={"val_accuracy": history.val_accuracy[-1]})
    loaded, meta = load_attention(path)
    assert meta["layer"] == "block10" and meta["in_channels"] == 112 and meta["hidden"] == 32
    assert meta["val_accuracy"] == 1.0 and meta["backbone"] == "efficientnet-lite0"
    x = torch.randn(1, 112, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), head(x))
    with pytest.raises(ValueError, match="channels"):
        save_attention(head, path, layer="block11.expand")


def test_train_attention_validates_inputs(backbone: EfficientNetLite0) -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="label"):
        train_attention(backbone, AttentionHead(112), [img, img], [0])
    with pytest.raises(ValueError, match="channels"):
        train_attention(backbone, AttentionHead(672), [img], [0])
    with pytest.raises(ValueError, match="epochs"):
        AttentionTrainConfig(epochs=0)

"""EfficientNet-Lite0: ImageNet predictions on scikit-image samples, shapes, taps, loading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from services.extractor.backbone import (
    EfficientNetLite0,
    _packaged_weights_path,
    load_backbone,
    preprocess,
)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return load_backbone()


def _center_crop_224(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = 256 / min(h, w)
    image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    y, x = (h - 224) // 2, (w - 224) // 2
    return image[y : y + 224, x : x + 224]


def _top1(model: EfficientNetLite0, image: np.ndarray) -> int:
    with torch.inference_mode():
        return int(model(preprocess(_center_crop_224(image))).argmax(1))


def test_cat_is_a_cat(model: EfficientNetLite0) -> None:
    assert 281 <= _top1(model, data.chelsea()) <= 285


def test_coffee_is_espresso(model: EfficientNetLite0) -> None:
    assert _top1(model, data.coffee()) == 967


def test_loaded_model_is_frozen(model: EfficientNetLite0) -> None:
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    try:
        assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    finally:
        model.eval()


def test_preprocess_range_and_layout() -> None:
    image = np.array([[[0, 127, 255]]], dtype=np.uint8).repeat(5, 0).repeat(7, 1)
    x = preprocess(image)
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        preprocess(np.zeros((5, 7), np.uint8))


def test_feature_and_tap_shapes(model: EfficientNetLite0) -> None:
    x = preprocess(np.zeros((200, 300, 3), np.uint8))
    with torch.inference_mode():
        assert model.forward_features(x).shape == (1, 1280, 7, 10)
        taps = model.forward_taps(x, ["block11.expand", "block10", "block9.expand", "stem"])
    assert {k: tuple(v.shape) for k, v in taps.items()} == {
        "stem": (1, 32, 100, 150),
        "block9.expand": (1, 672, 13, 19),
        "block10": (1, 112, 13, 19),
        "block11.expand": (1, 672, 13, 19),
    }
    for name, t in taps.items():
        assert model.tap_spec(name) == (t.shape[1], {"stem": 2}.get(name, 16))
    assert model.tap_spec("head") == (1280, 32)
    assert model.tap_spec("block5.expand") == (240, 8)


def test_taps_match_full_forward(model: EfficientNetLite0) -> None:
    x = preprocess(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with torch.inference_mode():
        head = model.forward_taps(x, ["head"])["head"]
        torch.testing.assert_close(head, model.forward_features(x))


@pytest.mark.parametrize(("tap", "last_block"), [("block7", 7), ("block11.expand", 10)])
def test_taps_stop_at_the_deepest_requested(
    model: EfficientNetLite0, tap: str, last_block: int
) -> None:
    calls: list[int] = []
    hooks = [
        b._depthwise_conv.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, b in enumerate(model._blocks)
    ]
    try:
        with torch.inference_mode():
            model.forward_taps(preprocess(np.zeros((64, 64, 3), np.uint8)), ["stem", tap])
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(last_block + 1))


@pytest.mark.parametrize("name", ["block16", "block0.expand", "blockx", "head2", ""])
def test_unknown_tap_rejected(model: EfficientNetLite0, name: str) -> None:
    with pytest.raises(ValueError):
        model.forward_taps(preprocess(np.zeros((32, 32, 3), np.uint8)), [name])


def test_load_user_file_with_meta(tmp_path, model: EfficientNetLite0) -> None:
    state = torch.load(_packaged_weights_path(), map_location="cpu", weights_only=True)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state, "meta": {"backbone": "efficientnet-lite0"}}, path)
    loaded = load_backbone(str(path))
    torch.testing.assert_close(loaded._conv_head.weight, model._conv_head.weight)

    torch.save({"state_dict": state, "meta": {"backbone": "resnet50"}}, path)
    with pytest.raises(ValueError, match="resnet50"):
        load_backbone(str(path))


def test_fused_batchnorm_gives_the_same_outputs(model: EfficientNetLite0) -> None:
    fused = load_backbone(fuse_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = preprocess(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), atol=1e-3, rtol=1e-3)
        a = fused.forward_taps(x, ["block11.expand"])["block11.expand"]
        b = model.forward_taps(x, ["block11.expand"])["block11.expand"]
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)

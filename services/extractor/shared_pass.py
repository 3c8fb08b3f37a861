"""One image, several descriptors, shared backbone passes.

The global descriptor (3 scales at 512 px) and the local features (pyramid 0.25, 0.5, 1 of the
1024-px working image) feed the backbone some identical levels: the 512-px and 256-px images
are the same resize of the same working image. :class:`SharedPasses` stands in for the backbone
while one image is described: every pass runs to all the taps any descriptor needs (the local
layer, and the head when asked), and a later request for the same input tensor is served from
memory. On a 1024-px image the local pyramid's 512- and 256-px levels come from the global
descriptor's passes, and the regions' 1024-px pass gives the local features their full-size
level. Measured (bench/extract_speed.py): the first saving is within noise — the 1024-px level
dominates — while the second makes 1024-px regions cost +25 % instead of a whole extra pass.
A query of another size (a crop) gets the same sharing by moving its local levels onto the
global passes (``describer.snapped_scales``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from services.extractor.backbone import EfficientNetLite0


class SharedPasses:
    """Memoising backbone facade for the descriptors of one image.

    Parameters
    ----------
    backbone : EfficientNetLite0
        The frozen backbone doing the work.
    taps : sequence of str
        Taps every pass computes (e.g. ``["block10", "head"]``).
    """

    def __init__(self, backbone: EfficientNetLite0, taps: Sequence[str]) -> None:
        self.backbone = backbone
        self.taps = list(dict.fromkeys(taps))
        self._passes: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.computed = 0  # passes actually run (the rest came from memory)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.backbone.parameters()

    def forward_taps(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(1, 3, H, W)`` preprocessed image → ``{tap: (1, C, h, w)}`` for ``taps``."""
        for seen, maps in self._passes:
            if seen.shape == x.shape and torch.equal(seen, x) and all(t in maps for t in taps):
                return {t: maps[t] for t in taps}
        maps = self.backbone.forward_taps(x, list(dict.fromkeys([*self.taps, *taps])))
        self._passes.append((x, maps))
        self.computed += 1
        return {t: maps[t] for t in taps}

    def prefill(self, x: torch.Tensor, maps: dict[str, torch.Tensor]) -> None:
        """Remember ``maps`` (``{tap: (1, C, h, w)}``) as the pass of ``x`` (computed elsewhere,
        e.g. in a stacked batch); a later request for ``x`` and those taps is served from them."""
        self._passes.append((x, maps))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv map ``(1, 1280, H/32, W/32)``, as ``EfficientNetLite0.forward_features``."""
        return self.forward_taps(x, ["head"])["head"]

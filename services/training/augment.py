"""Photometric and geometric augmentation on uint8 RGB arrays (numpy + PIL, no torchvision).

Every function takes an ``(H, W, 3)`` uint8 RGB array and a ``numpy.random.Generator`` and
returns a new uint8 array, so a seeded generator makes a whole pipeline reproducible.
:func:`augment` applies an :class:`AugmentConfig`; :data:`STRONG` is the instance-mode recipe
(two strong views of one photo form a positive pair), :data:`LIGHT` the one for labelled images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


@dataclass(frozen=True)
class AugmentConfig:
    """One augmentation recipe; every range is ``(low, high)``, every ``*_p`` a probability.

    Attributes
    ----------
    scale : (float, float)
        Area of the random crop as a fraction of the image.
    ratio : (float, float)
        Aspect ratio (w / h) of the random crop, sampled log-uniformly.
    perspective : float
        Corner displacement of the random perspective, as a fraction of half the side.
    perspective_p : float
    brightness, contrast, saturation : float
        Enhancement factors are drawn from ``[1 - v, 1 + v]``.
    hue : float
        Hue shift drawn from ``[-hue, hue]`` of a full turn (at most 0.5).
    blur_p : float
    blur_sigma : (float, float)
        Gaussian blur radius in pixels of the output.
    """

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    perspective: float = 0.3
    perspective_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.05
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


STRONG = AugmentConfig()
LIGHT = AugmentConfig(
    scale=(0.6, 1.0), perspective=0.1, perspective_p=0.3, brightness=0.2, contrast=0.2,
    saturation=0.2, hue=0.0, blur_p=0.0,
)


def _check(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop a random box (area fraction in ``scale``, aspect in ``ratio``) and resize it.

    Falls back to the largest centred box of an in-range aspect after 10 failed draws
    (the torchvision algorithm).

    Parameters
    ----------
    image : ndarray ``(H, W, 3)`` uint8
    size : int
        Output side.

    Returns
    -------
    ndarray ``(size, size, 3)`` uint8
    """
    _check(image)
    h, w = image.shape[:2]
    box = None
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:
        r = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (w, round(w / r)) if w / h <= r else (round(h * r), h)
        cw, ch = min(cw, w), min(ch, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        box = (x0, y0, x0 + cw, y0 + ch)
    out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(out)


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` (4, 2) to input points ``src``."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    return np.linalg.solve(a, b).tolist()


def random_perspective(image: np.ndarray, distortion: float, rng: np.random.Generator) -> np.ndarray:
    """Move each corner inwards by up to ``distortion`` of half the side; outside is black.

    Parameters
    ----------
    image : ndarray ``(H, W, 3)`` uint8
    distortion : float
        In ``[0, 1]``.

    Returns
    -------
    ndarray ``(H, W, 3)`` uint8
    """
    _check(image)
    h, w = image.shape[:2]
    dx, dy = distortion * (w - 1) / 2, distortion * (h - 1) / 2
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    sign = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    dst = src + sign * rng.uniform(0, 1, size=(4, 2)) * [dx, dy]
    coeffs = _perspective_coeffs(src, dst)
    out = Image.fromarray(image).transform((w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    return np.asarray(out)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.05,
) -> np.ndarray:
    """Random brightness, contrast, saturation (factors in ``[1 - v, 1 + v]``) then hue shift.

    Parameters
    ----------
    image : ndarray ``(H, W, 3)`` uint8

    Returns
    -------
    ndarray ``(H, W, 3)`` uint8
    """
    _check(image)
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}")
    pil = Image.fromarray(image)
    for enhancer, v in (
        (ImageEnhance.Brightness, brightness),
        (ImageEnhance.Contrast, contrast),
        (ImageEnhance.Color, saturation),
    ):
        if v > 0:
            pil = enhancer(pil).enhance(rng.uniform(max(0.0, 1 - v), 1 + v))
    if hue > 0:
        hsv = np.array(pil.convert("HSV"))
        shift = int(round(rng.uniform(-hue, hue) * 256))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift).astype(np.uint8)
        pil = Image.fromarray(hsv, "HSV").convert("RGB")
    return np.asarray(pil)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels: ``(H, W, 3) -> (H, W, 3)`` uint8."""
    _check(image)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def augment(
    image: np.ndarray, size: int, rng: np.random.Generator, config: AugmentConfig = STRONG
) -> np.ndarray:
    """Random resized crop to ``size`` -> perspective -> colour jitter -> blur.

    Parameters
    ----------
    image : ndarray ``(H, W, 3)`` uint8
    size : int
        Output side.
    rng : numpy Generator
    config : AugmentConfig

    Returns
    -------
    ndarray ``(size, size, 3)`` uint8
    """
    out = random_resized_crop(image, size, rng, config.scale, config.ratio)
    if config.perspective > 0 and rng.random() < config.perspective_p:
        out = random_perspective(out, config.perspective, rng)
    out = color_jitter(out, rng, config.brightness, config.contrast, config.saturation, config.hue)
    if config.blur_p > 0 and rng.random() < config.blur_p:
        out = gaussian_blur(out, rng.uniform(*config.blur_sigma))
    return out


def resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Resize (down or up) so the longer side is ``max_side``, keeping the aspect ratio.

    ``(H, W, 3) -> (H', W', 3)`` uint8 with ``max(H', W') == max_side``.
    """
    _check(image)
    h, w = image.shape[:2]
    s = max_side / max(h, w)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    if new == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR, reducing_gap=2.0))

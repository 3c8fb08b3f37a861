"""Safe image decoding: bytes -> ``(H, W, 3)`` uint8 RGB, guarded against decompression bombs.

The pixel count is checked from the header (``Image.open`` does not decode) before any pixel
data is decoded. JPEGs are decoded at a reduced DCT scale (``Image.draft``) when that still
leaves at least ``max_side`` pixels, then resized with Lanczos.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class InvalidImage(ValueError):
    """The bytes are not a decodable JPEG/PNG/WebP image."""


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed (decompression-bomb guard)."""


def decode_image(
    data: bytes, *, max_pixels: int = 50_000_000, max_side: int | None = 1024
) -> np.ndarray:
    """Decode an encoded image to RGB.

    Parameters
    ----------
    data : bytes
        JPEG, PNG or WebP file contents (animated images: first frame).
    max_pixels : int
        Largest accepted ``width * height`` as declared by the header. Pillow's own
        ``Image.MAX_IMAGE_PIXELS`` guard also applies and is reported as ``ImageTooLarge``
        naming ``max_pixels`` (error messages carry no library text: callers see them).
    max_side : int or None
        Downscale so that ``max(H, W) <= max_side``; ``None`` keeps the full resolution.

    Returns
    -------
    ndarray ``(H, W, 3)`` uint8, RGB
        EXIF orientation applied; grayscale, palette, CMYK and 16-bit converted; transparent
        pixels composited on white.

    Raises
    ------
    InvalidImage
        Empty, corrupt, truncated or unsupported data.
    ImageTooLarge
        More than ``max_pixels`` pixels.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    if not data:
        raise InvalidImage("empty image data")
    with warnings.catch_warnings():  # only DecompressionBombWarning's filter is touched
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, max_pixels, max_side)
        except (InvalidImage, ImageTooLarge):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own guard: its text stays here
            raise ImageTooLarge(f"image declares more than max_pixels={max_pixels} pixels") from e
        except UnidentifiedImageError as e:
            raise InvalidImage(f"not a JPEG, PNG or WebP image ({len(data)} bytes)") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidImage(f"corrupt or truncated image ({len(data)} bytes)") from e


def _decode(data: bytes, max_pixels: int, max_side: int | None) -> np.ndarray:
    # Reads the header only; other formats' parsers are never tried.
    img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidImage(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}")
    # MPO: multi-picture JPEG as written by many cameras.
    if max_side is not None and img.format in ("JPEG", "MPO") and max(w, h) > max_side:
        img.draft(None, _fit_size(w, h, max_side))  # decode at 1/2, 1/4 or 1/8 scale if possible
    img = ImageOps.exif_transpose(img)  # decodes
    img = _to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        img = img.resize(_fit_size(*img.size, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)


def _fit_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB``; alpha (or a transparency key) is composited on white.

    16-bit grayscale (``I;16*``, and ``I`` read from 16-bit PNGs) is rescaled by 1/257.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")

"""decode_image: formats, EXIF, colour modes, downscaling, bombs and garbage."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common.images import ImageTooLarge, InvalidImage, decode_image


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 8-bit RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_rgb_png_roundtrip_is_exact() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, arr)


def test_header_bomb_rejected_fast_without_decoding() -> None:
    data = _bomb_png(100_000, 100_000)  # over Pillow's own limit too: its message is not passed on
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge) as err:
        decode_image(data)
    assert time.perf_counter() - t0 < 0.5
    assert str(err.value) == "image declares more than max_pixels=50000000 pixels", err.value


def test_max_pixels_is_checked_before_decoding() -> None:
    data = _bomb_png(5000, 5000)  # 25 MP, below Pillow's own limit; pixel data is missing
    with pytest.raises(ImageTooLarge, match="max_pixels=1000000"):
        decode_image(data, max_pixels=1_000_000)
    with pytest.raises(InvalidImage):  # under the limit it is decoded and found truncated
        decode_image(data, max_pixels=30_000_000)


def test_exif_orientation_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom is blue


def test_cmyk_jpeg_to_rgb() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    out = decode_image(_encode(img, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[8, 8], (255, 0, 0), atol=12)


def test_rgba_png_composited_on_white() -> None:
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # transparent -> white
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue
    arr[0, 2] = (0, 0, 0, 128)  # half black over white -> ~127 gray
    out = decode_image(_encode(Image.fromarray(arr, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (0, 0, 255))
    np.testing.assert_allclose(out[0, 2], (127, 127, 127), atol=1)


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 255, 0] + [10, 20, 30] + [0, 0, 0] * 254)
    img.putpixel((0, 0), 0)
    out = decode_image(_encode(img, "PNG", transparency=0))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[1, 1], (10, 20, 30))


def test_grayscale_png_and_jpeg() -> None:
    img = Image.new("L", (8, 6), 100)
    np.testing.assert_array_equal(decode_image(_encode(img, "PNG")), np.full((6, 8, 3), 100, np.uint8))
    out = decode_image(_encode(img, "JPEG"))
    assert out.shape == (6, 8, 3)
    np.testing.assert_allclose(out, 100, atol=2)


def test_sixteen_bit_grayscale_png() -> None:
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], (0, 100, 255))
    assert out.shape == (1, 3, 3)


def test_webp() -> None:
    arr = np.full((10, 12, 3), (30, 60, 90), np.uint8)
    out = decode_image(_encode(Image.fromarray(arr), "WEBP", lossless=True))
    np.testing.assert_array_equal(out, arr)


def test_downscale_to_max_side_jpeg_and_png() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (500, 1500, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = _encode(Image.fromarray(arr), fmt)
        assert decode_image(data, max_side=300).shape == (100, 300, 3)
        assert decode_image(data, max_side=None).shape == (500, 1500, 3)
        assert decode_image(data, max_side=2000).shape == (500, 1500, 3)


def test_downscaled_jpeg_content_is_preserved() -> None:
    arr = np.zeros((800, 1600, 3), np.uint8)
    arr[:, :800] = (200, 30, 30)
    arr[:, 800:] = (30, 30, 200)
    out = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=95), max_side=160)
    assert out.shape == (80, 160, 3)
    np.testing.assert_allclose(out[40, 20], (200, 30, 30), atol=8)
    np.testing.assert_allclose(out[40, 140], (30, 30, 200), atol=8)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a JPEG, PNG or WebP"),
        (bytes(range(256)) * 8, "not a JPEG, PNG or WebP"),
    ],
)
def test_empty_and_garbage_rejected(data: bytes, match: str) -> None:
    with pytest.raises(InvalidImage, match=match):
        decode_image(data)


def test_truncated_jpeg_rejected() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(arr), "JPEG")
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_unsupported_format_rejected() -> None:
    with pytest.raises(InvalidImage, match="not a JPEG, PNG or WebP"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "BMP"))


def test_errors_are_value_errors() -> None:
    assert issubclass(InvalidImage, ValueError) and issubclass(ImageTooLarge, ValueError)
    assert not issubclass(InvalidImage, ImageTooLarge)

"""The labels CSV shared by `loupe train` and `loupe train-attention`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.training.labels import read_labels, resolve_image


def test_header_is_optional(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("image,label\na.jpg,x\nb.jpg,y\nc.jpg,x\n")
    assert read_labels(p) == (["a.jpg", "b.jpg", "c.jpg"], ["x", "y", "x"])
    p.write_text("a.jpg,x\n\n# a comment\nb , y ,extra\n")
    assert read_labels(p) == (["a.jpg", "b"], ["x", "y"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image,label\na.jpg,x\na.jpg,y\n", "line 3.*twice.*line 2"),
        ("a.jpg,x\nb.jpg\n", "line 2: expected image,label"),
        ("a.jpg,\n", "line 1: expected image,label"),
        ("image,label\n", "no rows"),
    ],
)
def test_bad_rows_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_labels(p)


def test_resolve_image_with_or_without_extension(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"x")
    assert resolve_image(tmp_path, "a.jpg") == tmp_path / "a.jpg"
    assert resolve_image(tmp_path, "a") == tmp_path / "a.jpg"
    assert resolve_image(tmp_path, "sub/b") == tmp_path / "sub" / "b.png"
    with pytest.raises(FileNotFoundError, match="'c'"):
        resolve_image(tmp_path, "c")

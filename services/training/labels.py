"""The labels CSV shared by ``loupe train`` and ``loupe train-attention``.

One row per image: ``image,label``. ``image`` is a path relative to the images directory, with
or without its extension (``all_souls_000022`` finds ``all_souls_000022.jpg``). A first row
``image,label`` is a header and is skipped; blank rows and rows starting with ``#`` are
ignored; extra columns are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def read_labels(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a labels CSV.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    (images, labels) : (list[str], list[str])
        Image names as written (relative to the images directory) and their labels, in file
        order.

    Raises
    ------
    ValueError
        A row without two non-empty columns (the message names the line), an image listed
        twice, or no rows at all.
    """
    images: list[str] = []
    labels: list[str] = []
    seen: dict[str, int] = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in row]
            if not images and line_no == 1 and [c.lower() for c in cells[:2]] == ["image", "label"]:
                continue
            if len(cells) < 2 or not cells[0] or not cells[1]:
                raise ValueError(f"labels CSV {str(path)!r} line {line_no}: expected image,label, got {row!r}")
            if cells[0] in seen:
                raise ValueError(
                    f"labels CSV {str(path)!r} line {line_no}: image {cells[0]!r} listed twice (first on line {seen[cells[0]]})"
                )
            seen[cells[0]] = line_no
            images.append(cells[0])
            labels.append(cells[1])
    if not images:
        raise ValueError(f"labels CSV {str(path)!r} has no rows")
    return images, labels


def resolve_image(images_dir: str | Path, name: str) -> Path:
    """The file ``name`` refers to in ``images_dir``: as written, else with a known image suffix.

    Raises
    ------
    FileNotFoundError
        No such file (the message names the directory and the name).
    """
    root = Path(images_dir)
    for cand in (name, *(name + s for s in IMAGE_SUFFIXES)):
        p = root / cand
        if p.is_file():
            return p
    raise FileNotFoundError(f"images directory {str(root)!r} has no file for {name!r}")

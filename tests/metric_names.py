"""What a set of prometheus-client registries exports, as Prometheus sees it (test helper)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def exported_names(registries: Iterable[Any]) -> set[str]:
    """Every sample name (``_bucket``, ``_count``, ``_sum``, ``_total`` included) the registries expose."""
    names: set[str] = set()
    for r in registries:
        for family in r.collect():
            names.update(s.name for s in family.samples)
            if family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
            elif family.type == "counter":
                names.add(family.name + "_total")
            else:
                names.add(family.name)
    return names

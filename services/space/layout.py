"""The layout of a collection, recorded in each data directory: shard count, placement rule, and
which shard (and replica) the directory holds.

Ids are placed on shards by a ``placement.Placement`` (shard count and rule); a process started
with another shard count (or placement rule) than the one that wrote its data would look ids up on
the wrong shard: upserts would duplicate, deletes would miss, and a shrunk cluster would orphan
whole shard directories. So every data directory carries ``layout.json``, written on first start,
and a start with a different layout refuses with a message that names the setting.

The collection's shard count is the broker's directory's (the head's): ``loupe reshard`` replaces
that file atomically at its switch (its commit point, ``write_layout``) and rewrites each shard
replica's file too; a shard replica's directory is checked for its identity (shard, replica) and
rule, not the count (a shard actor Ray restarts after a reshard still has its old arguments).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from services.space.placement import PLACEMENT_VERSION, PLACEMENTS

LAYOUT_FILE = "layout.json"
LAYOUT_FORMAT = 1


class LayoutMismatch(ValueError):
    """The data directory was written with another layout than this start asks for."""


@dataclass(frozen=True)
class Layout:
    """What a data directory was written for.

    Attributes
    ----------
    shards : int
        Shard count of the collection (``--shards``).
    placement : str
        Name of the id → shard rule (``placement.PLACEMENTS``); "" in an expectation: the recorded
        rule if this build knows it, ``PLACEMENT_VERSION`` for a new directory.
    shard : int or None
        The shard this directory holds (None: the broker's directory).
    replica : int or None
        The replica of that shard (None: the broker's directory).
    """

    shards: int
    placement: str = PLACEMENT_VERSION
    shard: int | None = None
    replica: int | None = None


def check_layout(directory: str | Path, expected: Layout, check_count: bool = True, new_placement: str = PLACEMENT_VERSION) -> Layout:
    """Write ``expected`` to ``directory/layout.json`` on first use (a "" rule: ``new_placement``),
    else check it is the same (the shard count only with ``check_count``: see the module
    docstring); returns the recorded layout (what a "" rule of ``expected`` resolved to).

    Raises
    ------
    LayoutMismatch
        Naming the differing setting, the recorded and the requested value, and what to do.
    """
    path = Path(directory) / LAYOUT_FILE
    if not path.exists():
        written = replace(expected, placement=expected.placement or new_placement)
        write_layout(directory, written)
        return written
    recorded = read_layout(directory)
    if check_count and recorded.shards != expected.shards:
        raise LayoutMismatch(
            f"{directory} holds a collection of shards={recorded.shards} (layout.json) but this cluster starts with "
            f"--shards {expected.shards}: ids would map to other shards (duplicates on upsert, deletes that miss). Start with "
            f"--shards {recorded.shards}; to change the shard count, run `loupe reshard --shards {expected.shards}` "
            f"on the running cluster (resharding: records move between shards), not a restart with another count"
        )
    if recorded.placement not in PLACEMENTS or (expected.placement and recorded.placement != expected.placement):
        raise LayoutMismatch(
            f"{directory} was written with placement {recorded.placement!r} but this build places ids with "
            f"{expected.placement or ' or '.join(PLACEMENTS)!r}; "
            f"run the loupe version that wrote it"
        )
    for field in ("shard", "replica"):
        if getattr(recorded, field) != getattr(expected, field):
            raise LayoutMismatch(
                f"{directory} holds {field} {getattr(recorded, field)} but was given to {field} {getattr(expected, field)}: "
                f"a data directory (volume) must stay with its shard replica"
            )
    return recorded


def read_layout(directory: str | Path) -> Layout:
    """The layout recorded in ``directory/layout.json``; ``LayoutMismatch`` when it is unreadable."""
    path = Path(directory) / LAYOUT_FILE
    try:
        raw = json.loads(path.read_text())
        return Layout(shards=int(raw["shards"]), placement=str(raw["placement"]), shard=raw.get("shard"), replica=raw.get("replica"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LayoutMismatch(f"{path}: unreadable layout file ({type(exc).__name__}: {exc}); restore it or the directory from a backup") from None


def write_layout(directory: str | Path, layout: Layout) -> None:
    """Record ``layout`` in ``directory/layout.json``, atomically (a reader sees the old or the new file)."""
    path = Path(directory) / LAYOUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": LAYOUT_FORMAT, **asdict(layout)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

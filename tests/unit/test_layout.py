"""The layout file of a data directory: written once, a different start refuses with the setting's name."""

from __future__ import annotations

import json

import pytest

from services.space.layout import LAYOUT_FILE, Layout, LayoutMismatch, check_layout
from services.space.placement import PLACEMENT_VERSION


def test_first_start_writes_the_layout_and_the_same_start_passes(tmp_path) -> None:
    check_layout(tmp_path / "shard-001", Layout(shards=2, shard=1, replica=0))
    raw = json.loads((tmp_path / "shard-001" / LAYOUT_FILE).read_text())
    assert raw["shards"] == 2 and raw["shard"] == 1 and raw["replica"] == 0 and raw["format"] == 1
    assert check_layout(tmp_path / "shard-001", Layout(shards=2, shard=1, replica=0)).shards == 2


def test_another_shard_count_refuses_naming_the_setting(tmp_path) -> None:
    check_layout(tmp_path, Layout(shards=2))
    with pytest.raises(LayoutMismatch, match=r"shards=2 .* --shards 3.*Start with --shards 2.*resharding"):
        check_layout(tmp_path, Layout(shards=3))


def test_a_volume_given_to_another_shard_or_rule_refuses(tmp_path) -> None:
    check_layout(tmp_path, Layout(shards=2, shard=0, replica=0))
    with pytest.raises(LayoutMismatch, match="holds shard 0 but was given to shard 1"):
        check_layout(tmp_path, Layout(shards=2, shard=1, replica=0))
    with pytest.raises(LayoutMismatch, match=f"placement '{PLACEMENT_VERSION}'"):
        check_layout(tmp_path, Layout(shards=2, placement="blake2b64-mod-v1", shard=0, replica=0))
    (tmp_path / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(LayoutMismatch, match="unreadable layout file"):
        check_layout(tmp_path, Layout(shards=2, shard=0, replica=0))

"""`loupe eval` end to end on a real cluster: a tiny revisitop set made from the demo photos,
scored through the CLI; per-query AP in the table, progress bars on stderr (also with --json)."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.config import ClusterConfig
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

PHOTO_SUBSET = PHOTOS[:3]


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """Database: 2 indexed transforms of 3 photos; queries: one held-out transform of each."""
    root = tmp_path_factory.mktemp("evalset")
    imlist, qimlist, gnd = [], [], []
    for p in PHOTO_SUBSET:
        for t in ("orig", "rotate"):
            name = f"{p}_{t}"
            (root / f"{name}.jpg").write_bytes(encode_jpeg(INDEXED[t](load_photo(p))))
            imlist.append(name)
    for i, p in enumerate(PHOTO_SUBSET):
        name = f"{p}_query"
        img = HELD_OUT["perspective"](load_photo(p))
        (root / f"{name}.jpg").write_bytes(encode_jpeg(img))
        qimlist.append(name)
        gnd.append({"bbx": [0, 0, img.shape[1], img.shape[0]], "easy": [2 * i], "hard": [2 * i + 1], "junk": []})
    (root / "gnd.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    cfg = ClusterConfig(shards=1, replicas=1, max_side=256, global_max_side=256, scales=(1.0,), data_dir=str(tmp_path_factory.mktemp("data")))
    with Cluster(cfg) as c:
        yield c.broker_address


def test_eval_prints_per_query_ap_and_progress(eval_set, address, capsys) -> None:
    args = ["eval", "--address", address, "--images", str(eval_set), "--gnd", str(eval_set / "gnd.json"), "--rerank", "none", "--rerank", "verify"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "per-query AP, Medium (Hard)" in out
    table = out.split("per-query AP, Medium (Hard)")[1].splitlines()
    for p in PHOTO_SUBSET:
        row = next(line for line in table if line.startswith(f"{p}_query"))
        assert len(row.split()) == 1 + 2 * 2  # name, then "M (H)" for each of the 2 configurations
    stage_line = next(line for line in out.splitlines() if line.strip().startswith("verify ") and "fanout" in line)
    assert "extract" in stage_line and "verify" in stage_line.split(None, 1)[1]  # the broker's verify stage timed
    assert "index" in err and "6/6" in err  # the indexing bar reached its total
    assert "search[verify]" in err and "3/3" in err


def test_eval_json_keeps_stdout_clean_and_reports_per_query(eval_set, address, capsys) -> None:
    args = ["eval", "--address", address, "--images", str(eval_set), "--gnd", str(eval_set / "gnd.json"), "--skip-index", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    (run,) = result["runs"]
    assert [q["name"] for q in run["queries"]] == [f"{p}_query" for p in PHOTO_SUBSET]
    assert all(q["ap"]["medium"] is not None for q in run["queries"])
    assert {"extract", "fanout"} <= set(run["stage_ms_p50"]) and all(v >= 0 for v in run["stage_ms_p50"].values())
    assert "search[none]" in err


def test_no_progress_is_silent_on_stderr(eval_set, address, capsys) -> None:
    args = ["eval", "--address", address, "--images", str(eval_set), "--gnd", str(eval_set / "gnd.json"), "--skip-index", "--no-progress"]
    assert main(args) == 0
    assert "search[" not in capsys.readouterr().err

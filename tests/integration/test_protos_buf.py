"""Proto hygiene with the real `buf` binary (PyPI buf-bin): lint, and breaking-change detection
against the protos committed in git, so that an incompatible change to loupe.v1 fails CI.

Baselines compared with the working tree's protos/:
- HEAD (catches an uncommitted incompatible edit);
- the parent of the last commit that touched protos/ (catches a committed one), when that
  parent is in this clone and not older than the commit that introduced buf.yaml (history
  before the promise was enforced contains a removed field);
- ``LOUPE_BUF_AGAINST`` (a git ref, e.g. the target branch of a pull request), when set.
Each baseline is exported with ``git archive`` into a temporary directory, which works in a
shallow clone where HEAD is the only commit.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from binaries import venv_binary

REPO = Path(__file__).resolve().parents[2]


def _buf() -> str:
    return venv_binary("buf", "buf-bin")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def _run_buf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUF_CACHE_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / "loupe-buf-cache")}
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def _export_protos(ref: str, dest: Path) -> Path:
    """protos/ as committed at ``ref``, written under ``dest``; returns the protos directory."""
    out = subprocess.run(["git", "archive", "--format=tar", ref, "protos"], cwd=REPO, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "protos"


def _baselines() -> list[str]:
    if _git("rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        return []
    refs = ["HEAD"]
    last = _git("log", "-n1", "--format=%H", "--", "protos").stdout.strip()
    parent = _git("rev-parse", "--verify", "-q", f"{last}^").stdout.strip() if last else ""
    introduced = _git("log", "--diff-filter=A", "--format=%H", "--", "buf.yaml").stdout.split()
    if parent and introduced and _git("merge-base", "--is-ancestor", introduced[-1], parent).returncode == 0:
        refs.append(parent)
    if os.environ.get("LOUPE_BUF_AGAINST"):
        refs.append(os.environ["LOUPE_BUF_AGAINST"])
    return refs


def test_buf_lint_passes():
    res = _run_buf("lint")
    assert res.returncode == 0, res.stdout + res.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    proto = tmp_path / "protos/loupe/v1/retrieval.proto"
    proto.write_text(proto.read_text() + "\nmessage bad_name {}\n")
    res = _run_buf("lint", cwd=tmp_path)
    assert res.returncode != 0 and "bad_name" in res.stdout, res.stdout + res.stderr


def test_no_breaking_change_against_committed_protos(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no committed protos to compare with")
    refs = _baselines()
    if not refs:
        pytest.skip("git repository without commits: no committed protos to compare with")
    for i, ref in enumerate(refs):
        if _git("cat-file", "-e", f"{ref}:protos").returncode != 0:
            continue  # protos/ did not exist at ref
        against = _export_protos(ref, tmp_path / f"against{i}")
        res = _run_buf("breaking", "--against", str(against))
        assert res.returncode == 0, f"incompatible change to the protos against {ref}:\n{res.stdout}{res.stderr}"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("  int32 offset = 4;\n", ""), 'field "4" with name "offset"'),  # field removed
        (("  int32 offset = 4;\n", "  int64 offset = 4;\n"), 'type from "int32" to "int64"'),  # retyped
        (("  int32 offset = 4;\n", "  int32 skip = 4;\n"), 'name from "offset" to "skip"'),  # renamed: breaks JSON
        (("  rpc GetStats(GetStatsRequest) returns (GetStatsResponse);\n", ""), 'RPC "GetStats"'),  # rpc removed
    ],
)
def test_buf_breaking_detects_an_incompatible_change(tmp_path, edit, expected):
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    proto = tmp_path / "protos/loupe/v1/retrieval.proto"
    text = proto.read_text()
    assert edit[0] in text, f"test fixture out of date: {edit[0]!r} not in retrieval.proto"
    proto.write_text(text.replace(edit[0], edit[1], 1))
    res = _run_buf("breaking", "--against", str(REPO / "protos"), cwd=tmp_path)
    assert res.returncode != 0, "buf breaking accepted an incompatible change"
    assert expected in res.stdout, res.stdout + res.stderr


def test_buf_breaking_accepts_an_added_field(tmp_path):
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    proto = tmp_path / "protos/loupe/v1/retrieval.proto"
    text = proto.read_text()
    anchor = "  bool return_matches = 7;\n"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "  // A new optional field.\n  int32 new_option = 99;\n", 1))
    res = _run_buf("breaking", "--against", str(REPO / "protos"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

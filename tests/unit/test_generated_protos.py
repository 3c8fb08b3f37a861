"""CI fails when clients/python/loupe/v1/* is stale with respect to protos/ (regenerate: make protos)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "clients" / "python"  # the thin client distribution holds the generated package loupe.v1


def test_generated_code_is_up_to_date(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos" / "loupe" / "v1").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "loupe" / "v1").glob("*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = STUBS / rel
        assert committed.exists(), f"{rel} missing: run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make protos`"

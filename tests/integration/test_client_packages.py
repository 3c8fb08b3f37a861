"""Both client packages install alone, outside the repository, and work against a live cluster.

One real cluster (Ray actors, gRPC on 127.0.0.1, a throwaway CA, read/write tokens) serves both:

- Node: ``npm pack`` in clients/node, ``npm install <tarball>`` into an empty directory under the
  test's tmp_path (dependencies from the npm registry), then from there a search, a bad input
  (INVALID_ARGUMENT naming the field) and a refused token (UNAUTHENTICATED), the packaged
  example, and ``tsc --noEmit`` of the packaged TypeScript example against the installed types.
- Python: a wheel of clients/python (``pip wheel``), installed into a fresh venv (grpcio,
  protobuf and numpy from the package index or pip's cache); torch, ray, faiss and openvino must
  not be there; a search with a token through the library and through ``loupe-client``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from secure_setup import make_pki, make_tokens

from cluster.config import ClusterConfig
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "clients" / "node"
PYTHON_CLIENT_DIR = REPO / "clients" / "python"
PHOTO_SUBSET = PHOTOS[:3]
SERVER_ONLY = ("torch", "ray", "faiss", "openvino", "services", "cluster")

# Run from the installed Node package: a search, a bad input, a refused token; prints JSON.
NODE_PROBE = r"""
const fs = require('node:fs');
const { LoupeClient, tokenFromEnv, status } = require('@loupe/client');
async function outcome(promise) {
  try { await promise; return ['OK', '']; } catch (err) { return [status[err.code], err.details]; }
}
(async () => {
  const [address, caFile, tokenFile, query] = process.argv.slice(2);
  const image = fs.readFileSync(query);
  const client = new LoupeClient(address, { token: tokenFromEnv(tokenFile), caFile, deadlineMs: 60000 });
  const stranger = new LoupeClient(address, { token: 'not-a-loupe-token', caFile });
  try {
    const resp = await client.search({ image, k: 3 });
    console.log(JSON.stringify({
      ids: resp.results.map((r) => r.id),
      badInput: await outcome(client.search({ image, k: 0 })),
      refused: await outcome(stranger.search({ image, k: 3 })),
      module: require.resolve('@loupe/client'),
    }));
  } finally {
    client.close();
    stranger.close();
  }
})().catch((err) => { console.error(err); process.exit(1); });
"""

# Run by the fresh venv's python: a search through the library; prints JSON.
PYTHON_PROBE = r"""
import json, sys
import loupe
from loupe.client import RetrievalClient, token_from_env

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)
address, ca_file, token_file, query = sys.argv[1:]
with RetrievalClient(address, token=token_from_env(token_file), tls_ca_file=ca_file) as c:
    resp = c.search(image=open(query, "rb").read(), k=3, timeout_s=60)
print(json.dumps({"ids": [r.id for r in resp.results], "module": loupe.__file__}))
"""


def _outside_repo(path: Path) -> Path:
    assert not path.resolve().is_relative_to(REPO), f"{path} must be outside the repository"
    return path


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} (in {cwd}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without loupe settings or Python/Node search paths that could reach the repo."""
    drop = ("PYTHONPATH", "NODE_PATH", "VIRTUAL_ENV", "LOUPE_PROTOS_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LOUPE_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A TLS + token cluster holding PHOTO_SUBSET × INDEXED; yields (address, pki, tokens, queries)."""
    d = tmp_path_factory.mktemp("client-packages")
    pki, tokens = make_pki(d / "tls"), make_tokens(d / "auth")
    queries = {}
    for photo in PHOTO_SUBSET:
        queries[photo] = d / f"query-{photo}.jpg"
        queries[photo].write_bytes(encode_jpeg(HELD_OUT["perspective"](load_photo(photo))))
    cfg = ClusterConfig(
        shards=2, replicas=1, max_side=320, global_max_side=320, scales=(1.0,), namespace="loupe-client-packages-test",
        tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), auth_tokens_file=str(tokens.tokens_file),
    )
    with Cluster(cfg) as cluster:
        with RetrievalClient(cluster.broker_address, token=tokens.write, tls_ca_file=str(pki.ca)) as writer:
            writer.wait_ready(30)
            db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p))), {"photo": p}) for p in PHOTO_SUBSET for t, fn in INDEXED.items()]
            assert writer.add_images(db).added == len(db)
        yield cluster.broker_address, pki, tokens, queries


def _tsc() -> str:
    """The TypeScript compiler locked in clients/node (devDependency), installed by `npm ci`."""
    tsc = NODE_DIR / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        _run([shutil.which("npm") or "npm", "ci", "--no-audit", "--no-fund"], NODE_DIR)
    return str(tsc)


def test_node_package_installs_alone_and_works_against_a_live_cluster(served, tmp_path):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js/npm are not installed: the Node package test cannot run")
    address, pki, tokens, queries = served
    tsc = _tsc()
    _run([tsc, "--noEmit", "-p", "tsconfig.json"], NODE_DIR)  # the checkout's example against src/index.d.ts

    dist = _outside_repo(tmp_path / "dist")
    dist.mkdir()
    packed = _run([npm, "pack", "--pack-destination", str(dist)], NODE_DIR).stdout.strip().splitlines()[-1]
    tarball = dist / packed
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("package/package.json"))
        for proto in ("retrieval.proto", "types.proto"):
            shipped = tar.extractfile(f"package/protos/loupe/v1/{proto}").read()
            assert shipped == (REPO / "protos" / "loupe" / "v1" / proto).read_bytes(), f"{proto} in the tarball is stale"
    assert "private" not in manifest and "package/src/index.d.ts" in names and "package/examples/search.ts" in names

    app = _outside_repo(tmp_path / "app")
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "loupe-client-user", "version": "0.0.0", "private": True}))
    _run([npm, "install", "--no-audit", "--no-fund", str(tarball)], app, env=_clean_env())
    installed = app / "node_modules" / "@loupe" / "client"
    assert (installed / "protos" / "loupe" / "v1" / "retrieval.proto").exists()

    env = _clean_env()
    photo = PHOTO_SUBSET[0]
    (app / "probe.js").write_text(NODE_PROBE)
    out = json.loads(_run([node, "probe.js", address, str(pki.ca), str(tokens.read_file), str(queries[photo])], app, env=env).stdout)
    assert Path(out["module"]).resolve().is_relative_to(installed.resolve()), out["module"]
    assert out["ids"] and out["ids"][0].startswith(f"{photo}/"), out
    code, details = out["badInput"]
    assert code == "INVALID_ARGUMENT" and details.startswith("k:"), out["badInput"]
    assert out["refused"][0] == "UNAUTHENTICATED", out["refused"]

    example = _run([node, str(installed / "examples" / "search.js"), address, str(queries[photo]), "3"], app,
                   env={**env, "LOUPE_TOKEN_FILE": str(tokens.read_file), "LOUPE_TLS_CA_FILE": str(pki.ca)}).stdout
    assert f"  {photo}/" in example.splitlines()[1], example

    shutil.copy(installed / "examples" / "search.ts", app / "search.ts")
    (app / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "target": "es2022", "module": "node16", "moduleResolution": "node16", "types": ["node"]},
        "files": ["search.ts"],
    }))
    _run([tsc, "--noEmit", "-p", "tsconfig.json"], app, env=env)


def test_thin_python_client_installs_alone_and_searches_a_live_cluster(served, tmp_path):
    address, pki, tokens, queries = served
    dist = _outside_repo(tmp_path / "dist")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(PYTHON_CLIENT_DIR)], tmp_path, env=_clean_env())
    wheels = list(dist.glob("loupe_client-*.whl"))
    assert len(wheels) == 1, wheels

    venv = _outside_repo(tmp_path / "venv")
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env=_clean_env())
    python = venv / "bin" / "python"
    env = _clean_env()
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheels[0])], tmp_path, env=env, timeout=600)

    installed = {line.split("==")[0].lower() for line in _run([str(python), "-m", "pip", "freeze"], tmp_path, env=env).stdout.split()}
    assert {"loupe-client", "grpcio", "protobuf", "numpy"} <= installed, installed
    assert not installed & {"torch", "ray", "faiss-cpu", "openvino", "loupe", "opencv-python-headless", "onnxruntime"}, installed
    check = "import importlib.util, json, sys; print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
    assert json.loads(_run([str(python), "-c", check, *SERVER_ONLY], tmp_path, env=env).stdout) == []

    photo = PHOTO_SUBSET[1]
    (tmp_path / "probe.py").write_text(PYTHON_PROBE)
    out = json.loads(_run([str(python), "probe.py", address, str(pki.ca), str(tokens.read_file), str(queries[photo])], tmp_path, env=env).stdout)
    assert Path(out["module"]).resolve().is_relative_to(venv.resolve()), out["module"]
    assert out["ids"] and out["ids"][0].startswith(f"{photo}/"), out

    cli = _run([str(venv / "bin" / "loupe-client"), "search", str(queries[photo]), "--k", "3", "--address", address],
               tmp_path, env={**env, "LOUPE_TOKEN_FILE": str(tokens.read_file), "LOUPE_TLS_CA_FILE": str(pki.ca)})
    results = json.loads(cli.stdout)["results"]  # the default rerank of `loupe search`: diffusion and verification
    assert results and results[0]["id"].startswith(f"{photo}/"), results
    refused = subprocess.run([str(venv / "bin" / "loupe-client"), "stats", "--address", address, "--tls-ca-file", str(pki.ca)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr

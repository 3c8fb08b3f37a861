"""The Node.js client (clients/node) against a live cluster with TLS and token auth.

Starts a real cluster (Ray actors, gRPC on 127.0.0.1, a throwaway CA), writes the test images,
records the status codes the Python client gets for a set of bad inputs, then runs
``node --test`` in clients/node with the address, CA, token files and those codes in env
vars, and asserts the Node runner passed. Needs Node.js >= 18 and ``npm ci`` in clients/node
(run here when node_modules is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from secure_setup import make_pki, make_tokens

from cluster.config import ClusterConfig
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient
from loupe.v1 import retrieval_pb2

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
PHOTO_SUBSET = PHOTOS[:4]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (`node` not on PATH): the Node client tests cannot run")
    return node


def _ensure_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, "npm not on PATH: run `npm ci` in clients/node"
    res = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"npm ci in clients/node failed:\n{res.stdout}\n{res.stderr}"


def _python_codes(client: RetrievalClient, query: bytes, corrupt: bytes) -> dict[str, str]:
    """Status names the Python client gets for the bad inputs the Node test repeats."""
    dim = client.stats().dim
    bad_verify = retrieval_pb2.RerankOptions(verify=retrieval_pb2.VerifyOptions(enabled=True, model="nonsense"))
    cases = {
        "k_zero": lambda: client.search(image=query, k=0),
        "k_too_large": lambda: client.search(image=query, k=1001),
        "no_query": lambda: client.search(k=3),
        "corrupt_image": lambda: client.search(image=corrupt, k=3),
        "wrong_vector_dim": lambda: client.search(vector=np.zeros(dim + 1, np.float32), k=3),
        "bad_verify_model": lambda: client.search(image=query, k=3, rerank=bad_verify),
        "delete_empty": lambda: client.delete([]),
        "delete_unknown": lambda: client.delete(["never-added"]),
        "add_empty_id": lambda: client.add_images([ImageToAdd("", query)]),
    }
    codes = {}
    for name, call in cases.items():
        try:
            call()
            codes[name] = "OK"
        except grpc.RpcError as exc:
            codes[name] = exc.code().name
    return codes


def test_node_client_against_a_live_cluster(tmp_path):
    node = _node()
    _ensure_node_modules()
    pki, tokens = make_pki(tmp_path / "tls"), make_tokens(tmp_path / "auth")
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    db, queries = [], []
    for photo in PHOTO_SUBSET:
        for t, fn in INDEXED.items():
            p = img_dir / f"{photo}-{t}.jpg"
            p.write_bytes(encode_jpeg(fn(load_photo(photo))))
            db.append({"id": f"{photo}/{t}", "path": str(p), "photo": photo})
        q = img_dir / f"query-{photo}.jpg"
        q.write_bytes(encode_jpeg(HELD_OUT["perspective"](load_photo(photo))))
        queries.append({"photo": photo, "path": str(q)})
    corrupt = img_dir / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a JPEG")
    (tmp_path / "images.json").write_text(json.dumps({"db": db, "queries": queries, "corrupt": str(corrupt)}))

    cfg = ClusterConfig(
        shards=2, replicas=1, max_side=320, global_max_side=320, scales=(1.0,), namespace="loupe-node-test",
        tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), auth_tokens_file=str(tokens.tokens_file),
    )
    with Cluster(cfg) as cluster:
        with RetrievalClient(cluster.broker_address, token=tokens.write, tls_ca_file=str(pki.ca)) as py:
            py.wait_ready(30)
            py.add_images([ImageToAdd(d["id"], Path(d["path"]).read_bytes(), {"photo": d["photo"]}) for d in db])
            codes = _python_codes(py, Path(queries[0]["path"]).read_bytes(), corrupt.read_bytes())
        assert codes["k_zero"] == "INVALID_ARGUMENT" and codes["delete_unknown"] == "NOT_FOUND", codes
        env = {
            **os.environ,
            "LOUPE_TEST_ADDRESS": cluster.broker_address,
            "LOUPE_TEST_CA_FILE": str(pki.ca),
            "LOUPE_TEST_READ_TOKEN_FILE": str(tokens.read_file),
            "LOUPE_TEST_WRITE_TOKEN_FILE": str(tokens.write_file),
            "LOUPE_TEST_IMAGES": str(tmp_path / "images.json"),
            "LOUPE_TEST_PY_CODES": json.dumps(codes),
        }
        for var in ("LOUPE_TOKEN", "LOUPE_TOKEN_FILE", "LOUPE_TLS_CA_FILE"):
            env.pop(var, None)
        res = subprocess.run([node, "--test", "test/"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=300)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report[-6000:]
    assert "# fail 0" in report and "# skipped 0" in report, report[-3000:]
    assert "# pass 7" in report, report[-3000:]

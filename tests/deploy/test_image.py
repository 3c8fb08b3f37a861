"""The container image, built and run for real (marker `soak`: minutes of CPU and network, not in
`make test`; run with `make soak` or `pytest -m soak tests/deploy/test_image.py`).

Builds with scripts/build_image.sh (podman/buildah; DEBOOTSTRAP_BASE=1 when no BASE_IMAGE is
given, WHEELS_DIR=/opt/wheels when that directory holds a CPU torch wheel) unless LOUPE_TEST_IMAGE
names an image already built, then checks: no CUDA torch and no nvidia wheels; `loupe up` in the
container serves (gRPC health SERVING on loupe.v1.Retrieval), answers a search, runs as the
non-root user 10001, and exits cleanly on SIGTERM. Containers run the way this kind of sandbox
allows (docs/deploy-kubernetes.md, The image): runc, cgroupfs, low ulimits, host network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak

REPO_ROOT = Path(__file__).resolve().parents[2]
PODMAN_RUN = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *PODMAN_RUN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def image():
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman buildah runc debootstrap)")
    if os.environ.get("LOUPE_TEST_IMAGE"):
        yield os.environ["LOUPE_TEST_IMAGE"]
        return
    name = f"localhost/loupe-test:{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "IMAGE": name, "BUILDER": os.environ.get("BUILDER", "podman")}
    if "BASE_IMAGE" not in env:
        env["DEBOOTSTRAP_BASE"] = "1"
    if "WHEELS_DIR" not in env and list(Path("/opt/wheels").glob("torch-*+cpu-*.whl")):
        env["WHEELS_DIR"] = "/opt/wheels"
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "build_image.sh")], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    print(proc.stdout.strip().splitlines()[-1])
    yield name
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True, timeout=120)


def test_the_image_has_a_cpu_torch_and_no_nvidia_wheels(image):
    out = _podman("run", "--rm", *ULIMITS, image, "pip", "list", "--format", "json").stdout
    packages = {p["name"].lower(): p["version"] for p in json.loads(out)}
    assert packages["torch"].endswith("+cpu"), packages["torch"]
    assert [n for n in packages if n.startswith("nvidia")] == []
    assert packages["ray"] == _chart_ray_version()
    code = "import torch; print(torch.version.cuda)"
    assert _podman("run", "--rm", *ULIMITS, image, "python", "-c", code).stdout.strip() == "None"


def _chart_ray_version() -> str:
    import yaml

    return yaml.safe_load((REPO_ROOT / "helm" / "loupe" / "values.yaml").read_text())["rayVersion"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loupe_up_serves_a_search_as_non_root(image):
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, metrics = _free_port(), _free_port()
    name = f"loupe-test-{uuid.uuid4().hex[:8]}"
    _podman("run", "-d", "--name", name, "--network", "host", "--shm-size", "512m", *ULIMITS, image,
            "loupe", "up", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics),
            "--shards", "1", "--replicas", "1", "--extractor-threads", "1", "--data-dir", "/home/loupe/data")
    try:
        started, status = time.monotonic(), None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < 600:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service="loupe.v1.Retrieval"), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert _podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", _podman("logs", name, check=False).stderr[-5000:]
                time.sleep(3)
        assert status == health_pb2.HealthCheckResponse.SERVING, _podman("logs", name, check=False).stderr[-5000:]
        print(f"SERVING {time.monotonic() - started:.0f} s after the start")
        # a search through the image's own CLI (an empty collection answers with no results)
        query = "from PIL import Image; Image.new('RGB', (64, 48), (120, 80, 40)).save('/tmp/q.png')"
        _podman("exec", name, "python", "-c", query)
        answer = json.loads(_podman("exec", name, "loupe", "search", "/tmp/q.png", "--k", "1", "--rerank", "none", "--json",
                                    "--address", f"127.0.0.1:{port}").stdout)
        assert isinstance(answer, (dict, list)), answer
        # the server process (the container's PID 1) runs as the image's non-root user
        status_file = _podman("exec", name, "cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status_file.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}, uids
        stop = _podman("stop", "-t", "60", name)
        assert stop.returncode == 0
        assert _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0", _podman("logs", name, check=False).stderr[-3000:]
    finally:
        _podman("rm", "-f", name, check=False)

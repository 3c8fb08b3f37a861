"""Shared fixtures: paths to optional evaluation data, and one local Ray for the in-process clusters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _pytest_processes() -> set[int]:
    """This pytest process and, in an xdist worker, the controller and every worker it started."""
    own = {os.getpid()}
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return own
    controller = os.getppid()
    own.add(controller)
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == controller:
                own.add(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return own


def _guard_signals() -> None:
    """Refuse (with a traceback naming the test) any signal a test sends to a pytest process or
    to pytest's process group. A worker killed from outside dies silently ("node down: Not
    properly terminated", no faulthandler dump): one run lost a worker that way (issue 21)."""
    kill, killpg = os.kill, os.killpg

    def guarded_kill(pid: int, sig: int) -> None:
        if sig and pid in _pytest_processes():
            raise RuntimeError(f"a test sent signal {sig} to pytest's own process {pid}")
        kill(pid, sig)

    def guarded_killpg(pgid: int, sig: int) -> None:
        if sig and pgid == os.getpgid(0):
            raise RuntimeError(f"a test sent signal {sig} to pytest's process group {pgid}")
        killpg(pgid, sig)

    os.kill, os.killpg = guarded_kill, guarded_killpg


_guard_signals()


def shared_dataset(name: str) -> Path:
    """Path of a data set under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"evaluation data {path} is absent (it lives outside the repo in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (loopback only, private token) for every in-process ``Cluster`` of this pytest process (each xdist worker has its own).

    Each test module still starts and stops its own loupe cluster (actors, broker); only Ray's
    own daemons are shared, so the run pays for one Ray start instead of one per module (~6 s
    each here) and the pytest process does not go through a dozen Ray start/stop cycles.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("local_ray")``."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.launcher import init_ray

    owned = init_ray(ClusterConfig())
    yield
    if owned:
        ray.shutdown()

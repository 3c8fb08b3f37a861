"""Shared fixtures: paths to optional evaluation data, and one local Ray for the in-process clusters."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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

"""Crash safety of a real shard process (in the spirit of Qdrant's crasher).

A writer streams a mixed workload of adds (new ids and replacements) and deletes against a
shard server running as its own process (``python -m services.index``), SIGKILLs it at random
points, restarts it on the same directory and checks after every restart that every
acknowledged write is present with its vector and metadata, that no acknowledged delete came
back, and that the write in flight at the kill is either wholly present or wholly absent.
CI runs a handful of kills; ``make soak`` runs ≥ 20 (marker ``soak``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from loupe.tensors import to_tensor
from loupe.v1 import shard_pb2, shard_pb2_grpc, types_pb2
from shard_records import shard_record

REPO_ROOT = Path(__file__).resolve().parents[2]
D = 48
DELETED = None


def _vector(rng: random.Random) -> np.ndarray:
    v = np.asarray([rng.gauss(0, 1) for _ in range(D)], np.float32)
    return v / np.linalg.norm(v)


class ShardProcess:
    """A shard server subprocess on a directory; its address is read from its first stdout line."""

    def __init__(self, data_dir: Path, snapshot_every: int, log_path: Path) -> None:
        self.data_dir, self.snapshot_every, self.log_path = data_dir, snapshot_every, log_path
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: shard_pb2_grpc.ShardStub | None = None
        self.startup: dict = {}

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.index", "--data-dir", str(self.data_dir), "--snapshot-every", str(self.snapshot_every)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log,
        )
        line = self.proc.stdout.readline().decode()
        assert line, f"shard exited with {self.proc.poll()}; log: {self.log_path.read_text()[-3000:]}"
        info = json.loads(line)
        self.startup = info["startup"]
        self.channel = grpc.insecure_channel(info["address"])
        self.stub = shard_pb2_grpc.ShardStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.channel.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.channel.close()
        return rc


class Workload:
    """Random adds/replaces/deletes; ``acked`` is the model of what the shard must hold."""

    def __init__(self, seed: int, ids: int = 300, pad_bytes: int = 2000) -> None:
        self.rng = random.Random(seed)
        self.ids, self.pad_bytes = ids, pad_bytes
        self.acked: dict[str, tuple[np.ndarray, dict[str, str]] | None] = {}
        self.in_flight: tuple[str, dict] | None = None
        self.version = 0

    def next_request(self) -> tuple[str, object, dict]:
        ids = [f"img-{self.rng.randrange(self.ids)}" for _ in range(self.rng.randint(1, 6))]
        ids = list(dict.fromkeys(ids))
        if self.rng.random() < 0.25:
            return "delete", shard_pb2.ShardDeleteRequest(shard_id=0, ids=ids), {i: DELETED for i in ids}
        recs, effect = [], {}
        for image_id in ids:
            self.version += 1
            v = _vector(self.rng)
            md = {"v": str(self.version), "pad": "x" * self.rng.randrange(min(self.pad_bytes, 1024))}
            feats = types_pb2.ImageFeatures(width=64, height=48)
            feats.__getattribute__("global").CopyFrom(to_tensor(v))
            if self.rng.random() < 0.5:
                feats.regional.CopyFrom(to_tensor(np.stack([_vector(self.rng) for _ in range(3)]).astype(np.float16)))
            if self.pad_bytes > 4096:  # bulk within the shard's limits: local features (float16, 128-D)
                n = 1 + self.rng.randrange(min(2048, self.pad_bytes // 256))
                feats.local.keypoints.CopyFrom(to_tensor(np.zeros((n, 4), np.float32)))
                feats.local.descriptors.CopyFrom(to_tensor(np.ones((n, 128), np.float16)))
            recs.append(shard_pb2.ShardRecord(id=image_id, features=feats, metadata=md))
            effect[image_id] = (v, md)
        return "add", shard_pb2.ShardAddRequest(shard_id=0, records=recs), effect

    def run(self, shard: ShardProcess, stop: threading.Event) -> None:
        """Send requests until the shard dies or ``stop`` is set; record what was acknowledged."""
        while not stop.is_set():
            kind, req, effect = self.next_request()
            self.in_flight = (kind, effect)
            try:
                if kind == "add":
                    shard.stub.Add(req, timeout=10)
                else:
                    shard.stub.Delete(req, timeout=10)
            except grpc.RpcError:
                return  # killed mid-request: this one stays in flight, unacknowledged
            self.acked.update(effect)
            self.in_flight = None


def holds(shard: ShardProcess, image_id: str, expected: tuple[np.ndarray, dict] | None) -> bool:
    """Whether the shard holds ``image_id`` exactly as ``expected`` (None = absent)."""
    got = shard.stub.GetFeatures(shard_pb2.GetFeaturesRequest(shard_id=0, ids=[image_id], want_global=True), timeout=10)
    if expected is None:
        return not got.ids
    if list(got.ids) != [image_id]:
        return False
    vec, md = expected
    stored = np.frombuffer(got.features[0].__getattribute__("global").data, np.float32)
    if not np.allclose(stored, vec, atol=1e-6):
        return False
    hit = shard.stub.Search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(vec), top_k=1), timeout=10)
    return list(hit.ids) == [image_id] and dict(hit.metadata[0].values) == md


def check(shard: ShardProcess, work: Workload) -> None:
    for image_id, expected in work.acked.items():
        if work.in_flight is not None and image_id in work.in_flight[1]:
            continue  # judged below, as a whole
        assert holds(shard, image_id, expected), f"acknowledged state of {image_id} lost after restart"
    if work.in_flight is not None:
        kind, effect = work.in_flight
        applied = [holds(shard, i, e) for i, e in effect.items()]
        before = [holds(shard, i, work.acked.get(i)) for i in effect]
        assert all(applied) or all(before), f"unacknowledged {kind} {sorted(effect)} is partly applied"
        if all(applied):
            work.acked.update(effect)
        work.in_flight = None
    stats = shard.stub.Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=10)
    assert stats.images == sum(v is not None for v in work.acked.values())


def crash_loop(tmp_path: Path, kills: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shard = ShardProcess(tmp_path / "shard", snapshot_every=rng.choice([20, 50, 200]), log_path=tmp_path / "shard.log")
    work = Workload(seed)
    startups = []
    shard.start()
    try:
        return _crash_loop(shard, work, rng, kills, startups)
    finally:
        if shard.proc is not None and shard.proc.poll() is None:
            shard.proc.kill()


def _crash_loop(shard: "ShardProcess", work: "Workload", rng: random.Random, kills: int, startups: list[dict]) -> list[dict]:
    for _ in range(kills):
        stop = threading.Event()
        writer = threading.Thread(target=work.run, args=(shard, stop))
        writer.start()
        time.sleep(rng.uniform(0.05, 0.6))
        shard.kill()
        writer.join(timeout=30)
        shard.start()
        startups.append(shard.startup)
        check(shard, work)
    assert shard.terminate() == 0  # SIGTERM drains, snapshots and exits 0
    shard.start()
    assert shard.startup["replayed"] == 0 and shard.startup["source"] == "snapshot"
    check(shard, work)
    shard.terminate()
    assert sum(v is not None for v in work.acked.values()) > 0
    return startups


def test_every_acknowledged_write_survives_sigkill(tmp_path):
    startups = crash_loop(tmp_path, kills=4, seed=7)
    assert any(s["source"] == "snapshot" for s in startups), startups  # restarts used snapshots + replay


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [1, 2])
def test_crash_loop_soak(tmp_path, seed):
    crash_loop(tmp_path, kills=25, seed=seed)


def test_disk_full_fails_writes_keeps_reads_and_recovers(tmp_path):
    """A tmpfs of 24 MiB as the shard's disk: writes past it get RESOURCE_EXHAUSTED and are not
    acknowledged, searches keep answering, and writes succeed again once space is freed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root: the disk-full test cannot run here")
    shard = ShardProcess(mnt / "shard", snapshot_every=10_000, log_path=tmp_path / "shard.log")
    try:
        shard.start()
        work = Workload(3, ids=1_000_000, pad_bytes=200_000)
        (mnt / "filler").write_bytes(b"\0" * (12 << 20))  # leaves the shard ~12 MiB
        code = None
        for _ in range(2000):
            kind, req, effect = work.next_request()
            if kind != "add":
                continue
            try:
                shard.stub.Add(req, timeout=10)
                work.acked.update(effect)
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
                work.in_flight = ("add", effect)
                break
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
        assert "no space left" in detail.lower() and "Traceback" not in detail
        check(shard, work)  # reads still answer; the failed write is not (even partly) there
        (mnt / "filler").unlink()
        kind, req, effect = work.next_request()
        while kind != "add":
            kind, req, effect = work.next_request()
        shard.stub.Add(req, timeout=10)
        work.acked.update(effect)
        check(shard, work)
        assert shard.terminate() == 0
    finally:
        if shard.proc is not None and shard.proc.poll() is None:
            shard.proc.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _bulk_records(first: int, n: int, rng: random.Random) -> shard_pb2.ShardAddRequest:
    """``n`` records of ~64 KiB each (local features), ids ``bulk-{first}``.. — one Add call."""
    recs = [shard_record(f"bulk-{i}", _vector(rng), keypoints=256) for i in range(first, first + n)]
    return shard_pb2.ShardAddRequest(shard_id=0, records=recs)


def _wait_for(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_snapshots_follow_changes_and_compaction_rewrites_them(tmp_path):
    """On a real shard process: one Add of ``snapshot_every`` records (one commit, that many
    changes) brings a snapshot; a small store (~10 MB) mostly deleted and then crashed is
    compacted at the next start, and the snapshot that still held the deleted images is
    rewritten at once, not at the next clean stop."""
    rng = random.Random(5)
    data = tmp_path / "shard"
    shard = ShardProcess(data, snapshot_every=150, log_path=tmp_path / "shard.log")
    snapshot = data / "index.faiss"
    try:
        shard.start()
        shard.stub.Add(_bulk_records(0, 60, rng), timeout=30)
        assert not _wait_for(snapshot.exists, 1.0)  # 60 changes: none yet
        shard.stub.Add(_bulk_records(60, 100, rng), timeout=30)  # 160 changes in two commits (the old cadence counted 2)
        assert _wait_for(snapshot.exists), "no snapshot after snapshot_every changes"
        snap_bytes = snapshot.stat().st_size
        shard.stub.Delete(shard_pb2.ShardDeleteRequest(shard_id=0, ids=[f"bulk-{i}" for i in range(20, 160)]), timeout=30)
        size_before = (data / "data.mdb").stat().st_size
        shard.kill()  # no snapshot at stop: the one on disk still holds the 140 deleted images
        shard.start()
        size_after = (data / "data.mdb").stat().st_size
        assert shard.startup["source"] == "snapshot" and shard.startup["replayed"] == 140, shard.startup
        assert _wait_for(lambda: snapshot.stat().st_size < snap_bytes / 4), "the stale snapshot stayed after compaction"
        print(f"\ncompaction at start: data.mdb {size_before / 1e6:.1f} MB -> {size_after / 1e6:.1f} MB; "
              f"index.faiss {snap_bytes} -> {snapshot.stat().st_size} bytes")
        assert size_after < size_before / 2
        stats = shard.stub.Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=10)
        assert stats.images == 20
        assert shard.terminate() == 0
    finally:
        if shard.proc is not None and shard.proc.poll() is None:
            shard.proc.kill()

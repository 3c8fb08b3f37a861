"""Backups without a cluster: the chunk format and cut rule, the manifest's checks, the directory
store, and ``take_backup`` / ``restore`` over in-memory shards (pure logic: the real shards,
S3 and clusters are in tests/integration/test_backup.py)."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from loupe.v1 import shard_pb2
from shard_records import shard_record, unit_vector
from services.backup import restore as restoring
from services.backup.chunks import cuts_after, decode_chunk, encode_chunk, ids_per_cut
from services.backup.manifest import Manifest, manifest_name
from services.backup.storage import DirectoryStorage, open_storage
from services.backup.take import BackupSettings, read_manifest, take_backup
from services.common.errors import DataLoss, InvalidArgument
from services.space.placement import Placement


def _record(i: int, version: int = 1) -> shard_pb2.ShardRecord:
    return shard_record(f"img-{i:05d}", unit_vector(np.random.default_rng(i), 8), metadata={"n": str(i)}, version=version, width=10, height=10)


class MemShard:
    """Just enough of a shard for backups: records by id, tombstones, paged version lists."""

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.records: dict[str, shard_pb2.ShardRecord] = {}
        self.tombstones: dict[str, int] = {}
        self.get_calls = 0
        self.fail_adds_after: int | None = None
        self.whitening = b""

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        return shard_pb2.ShardStatsResponse(shard_id=self.shard_id, images=len(self.records), tombstones=len(self.tombstones),
                                            feature_bytes=100 * len(self.records), store_id=f"s{self.shard_id}")

    async def list_versions(self, req: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse:
        ids = sorted(i for i in set(self.records) | set(self.tombstones) if i > req.after)
        page = ids[:req.limit]
        resp = shard_pb2.ListVersionsResponse(done=len(ids) <= req.limit)
        for i in page:
            resp.ids.append(i)
            resp.versions.append(self.records[i].version if i in self.records else self.tombstones[i])
            resp.deleted.append(i not in self.records)
        return resp

    async def get_records(self, req: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse:
        self.get_calls += 1
        ids = list(req.ids)[:3]  # small answers: the caller must ask again for the rest
        return shard_pb2.GetRecordsResponse(records=[self.records[i] for i in ids if i in self.records], consumed=len(ids))

    async def add(self, req: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        if self.fail_adds_after is not None:
            if self.fail_adds_after <= 0:
                from services.common.errors import Unavailable
                raise Unavailable(f"shard {self.shard_id}: gone")
            self.fail_adds_after -= 1
        for r in req.records:
            if r.id not in self.records or self.records[r.id].version <= r.version:
                self.records[r.id] = r
        return shard_pb2.ShardAddResponse(stored=len(req.records))

    async def set_whitening(self, req: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse:
        self.whitening = req.whitening
        return shard_pb2.SetWhiteningResponse()


async def _run(fn, *args):
    return fn(*args)


def _source(n: int = 200, shards: int = 2) -> list[MemShard]:
    out = [MemShard(i) for i in range(shards)]
    for i in range(n):
        r = _record(i)
        out[Placement(shards).shard_of(r.id)].records[r.id] = r
    return out


def _backup(storage, shards, **kw) -> Manifest:
    settings = BackupSettings(target_chunk_bytes=kw.pop("target", 2000), page=7, **kw)
    return asyncio.run(take_backup(storage, shards, {"whitening.npz": b"W"}, started_version=5, layout={"shards": len(shards)}, model={},
                                   run=_run, settings=settings))


def test_chunk_round_trip_and_broken_framing_names_the_file():
    recs = [_record(i) for i in range(5)]
    data = encode_chunk(recs)
    assert encode_chunk(recs) == data  # deterministic: equal records, equal bytes (reusable by checksum)
    assert [r.id for r in decode_chunk(data, "chunks/x")] == [r.id for r in recs]
    with pytest.raises(DataLoss, match="chunks/x: record 4 is cut short"):
        decode_chunk(data[:-3], "chunks/x")
    with pytest.raises(DataLoss, match="chunks/x"):
        decode_chunk(b"\xff" * 12, "chunks/x")


def test_cut_points_depend_on_the_id_alone_and_halve_when_the_target_doubles():
    ids = [f"id-{i}" for i in range(4000)]
    at8 = {i for i in ids if cuts_after(i, 8)}
    at16 = {i for i in ids if cuts_after(i, 16)}
    assert at16 <= at8 and 300 < len(at8) < 700  # about 1 in 8
    assert ids_per_cut(4 << 20, 150_000) == 16 and ids_per_cut(4 << 20, 1) == 1 << 16 and ids_per_cut(10, 1e9) == 1


def test_backup_and_restore_into_another_shard_count(tmp_path):
    src = _source()
    doomed = "img-00007"
    sid = Placement(2).shard_of(doomed)
    src[sid].tombstones[doomed] = 9
    del src[sid].records[doomed]
    storage = DirectoryStorage(str(tmp_path))
    m = _backup(storage, src)
    assert m.images == 199 and sum(s.tombstones for s in m.shards) == 1 and len({c.file for s in m.shards for c in s.chunks}) > 4
    assert read_manifest(storage, m.id).to_json() == m.to_json()

    target = [MemShard(i) for i in range(3)]
    got = restoring.resolve(storage, "")
    assert asyncio.run(restoring.verify(storage, got, _run)) > 0
    progress = restoring.WriteProgress()
    asyncio.run(restoring.write_records(storage, got, target, _run, progress))
    assert progress.written == 199
    for t in target:  # re-placed by the target's placement, versions kept
        assert all(Placement(3).shard_of(i) == t.shard_id for i in t.records)
    restored = {i: r for t in target for i, r in t.records.items()}
    original = {i: r for s in src for i, r in s.records.items()}
    assert restored == original and doomed not in restored


def test_incremental_backup_reads_only_the_changed_chunks(tmp_path):
    src = _source()
    storage = DirectoryStorage(str(tmp_path))
    first = _backup(storage, src)
    calls = sum(s.get_calls for s in src)
    second = _backup(storage, src)
    assert second.incremental_from == first.id and second.chunks_reused == sum(len(s.chunks) for s in second.shards)
    assert sum(s.get_calls for s in src) == calls and second.bytes_written == 0  # nothing read, nothing written

    changed = _record(3, version=7)  # one record rewritten
    src[Placement(2).shard_of(changed.id)].records[changed.id] = changed
    third = _backup(storage, src)
    chunks = sum(len(s.chunks) for s in third.shards)
    assert third.chunks_reused == chunks - 1 and 0 < third.bytes_written < first.bytes_written
    full = _backup(storage, src, full=True)
    assert full.chunks_reused == 0 and full.incremental_from == ""


def test_a_corrupt_or_missing_file_is_data_loss_naming_it_before_anything_is_written(tmp_path):
    src = _source()
    storage = DirectoryStorage(str(tmp_path))
    m = _backup(storage, src)
    victim = m.shards[1].chunks[2].file
    path = tmp_path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match=f"{victim}: checksum mismatch \\(shard 1 chunk 3 of"):
        asyncio.run(restoring.verify(storage, restoring.resolve(storage, m.id), _run))
    path.unlink()
    with pytest.raises(DataLoss, match=f"{victim}: missing"):
        asyncio.run(restoring.verify(storage, restoring.resolve(storage, m.id), _run))

    manifest = tmp_path / manifest_name(m.id)
    text = manifest.read_text()
    manifest.write_text(text.replace('"images": 1', '"images": 2', 1))
    with pytest.raises(DataLoss, match=f"{manifest_name(m.id)}: checksum mismatch"):
        restoring.resolve(storage, m.id)
    manifest.write_text(text[: len(text) // 2])
    (tmp_path / (manifest_name(m.id) + ".sha256")).write_text(__import__("hashlib").sha256(text[: len(text) // 2].encode()).hexdigest())
    with pytest.raises(DataLoss, match="not a valid loupe backup manifest"):
        restoring.resolve(storage, m.id)


def test_a_restore_that_fails_midway_is_completed_by_running_it_again(tmp_path):
    src = _source()
    storage = DirectoryStorage(str(tmp_path))
    m = _backup(storage, src)
    target = [MemShard(i) for i in range(2)]
    target[1].fail_adds_after = 2
    progress = restoring.WriteProgress()
    with pytest.raises(Exception, match="gone"):
        asyncio.run(restoring.write_records(storage, m, target, _run, progress))
    assert 0 < progress.written < m.images
    target[1].fail_adds_after = None
    asyncio.run(restoring.write_records(storage, m, target, _run, restoring.WriteProgress()))
    assert {i: r for t in target for i, r in t.records.items()} == {i: r for s in src for i, r in s.records.items()}


def test_urls_are_checked_naming_the_field(tmp_path):
    for bad, msg in [("", "url: required"), ("relative/dir", "relative path"), ("gs://b/p", "scheme 'gs'"), ("s3:///p", "names no bucket")]:
        with pytest.raises(InvalidArgument, match=msg):
            open_storage(bad)
    assert isinstance(open_storage(f"file://{tmp_path}"), DirectoryStorage)
    with pytest.raises(InvalidArgument, match="backup_id"):
        restoring.resolve(DirectoryStorage(str(tmp_path)), "../../etc")


def test_manifest_json_is_stable_and_checked(tmp_path):
    storage = DirectoryStorage(str(tmp_path))
    m = _backup(storage, _source(20))
    raw = json.loads(m.to_json())
    raw["shards"][0]["images"] += 1
    with pytest.raises(DataLoss, match="shard 0 lists"):
        Manifest.from_json(json.dumps(raw).encode(), "m.json")
    assert os.path.exists(tmp_path / manifest_name(m.id))


# --- the broker's side: model files, the restore marker, refusals -------------------------------------
class _Extractors:
    def __init__(self, dim: int | None) -> None:
        self.dim = dim

    async def describe(self, timeout_s: float):
        from loupe.v1 import extractor_pb2
        from services.common.errors import Unavailable

        if self.dim is None:
            raise Unavailable("no extractor replica reachable")
        return extractor_pb2.DescribeResponse(backbone="b", pooling="gem", dim=self.dim)


def _broker(tmp_path, name: str, shards: list[MemShard], dim: int | None = 8):
    from services.broker.backups import Backups
    from services.broker.collection_model import CollectionModel
    from services.broker.versions import VersionClock

    return Backups(_Extractors(dim), shards, CollectionModel(str(tmp_path / name)), VersionClock(), 64 << 20)


def test_broker_backup_and_restore_carry_the_model_and_refuse_what_they_must(tmp_path):
    from loupe.v1 import retrieval_pb2
    from services.broker.deadlines import Deadline
    from services.common.errors import FailedPrecondition
    from services.space.whitening import PCAWhitening

    src = _source(60)
    source = _broker(tmp_path, "source", src)
    w = PCAWhitening()
    w.fit(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    source.collection.set_whitening(w)
    url = str(tmp_path / "backups")
    first = asyncio.run(source.backup(retrieval_pb2.BackupRequest(url=url), Deadline(60, 60)))
    assert first.images == 60 and first.shards == 2 and first.started_version > 0

    target = [MemShard(i) for i in range(3)]
    target[2].fail_adds_after = 1
    broker = _broker(tmp_path, "target", target)
    with pytest.raises(Exception, match=r"stopped after \d+ of 60 images were written: .*run the same restore again"):
        asyncio.run(broker.restore(retrieval_pb2.RestoreRequest(url=url), Deadline(60, 60)))
    assert json.loads((tmp_path / "target" / "restore.json").read_text())["state"] == "writing"
    target[2].fail_adds_after = None
    r = asyncio.run(broker.restore(retrieval_pb2.RestoreRequest(url=url), Deadline(60, 60)))
    assert r.resumed and r.images == 60 and (r.source_shards, r.target_shards) == (2, 3)
    assert broker.collection.whitening is not None and all(t.whitening == w.to_bytes() for t in target)
    assert (tmp_path / "target" / "whitening.npz").read_bytes() == w.to_bytes()

    second = asyncio.run(source.backup(retrieval_pb2.BackupRequest(url=url), Deadline(60, 60)))
    with pytest.raises(FailedPrecondition, match="not empty .*it holds part or all of backup"):
        asyncio.run(broker.restore(retrieval_pb2.RestoreRequest(url=url, backup_id=second.backup_id), Deadline(60, 60)))
    other = _broker(tmp_path, "other", [MemShard(0)], dim=16)
    with pytest.raises(FailedPrecondition, match="dim=8.*dim=16"):
        asyncio.run(other.restore(retrieval_pb2.RestoreRequest(url=url), Deadline(60, 60)))
    listed = asyncio.run(source.list(retrieval_pb2.ListBackupsRequest(url=url)))
    assert [(b.backup_id, b.complete, b.images) for b in listed.backups] == [(first.backup_id, True, 60), (second.backup_id, True, 60)]


def test_writes_during_the_backup_are_whole_or_absent_and_earlier_ones_all_there(tmp_path):
    """Between the pages of the version listing the shard keeps changing: new ids, rewrites of ids
    listed and not yet listed, deletes. Every id that existed before and was not deleted is in the
    backup; every record in it is one version exactly as written (never a mix)."""
    src = _source(120, shards=1)
    before = dict(src[0].records)
    written: dict[tuple[str, int], shard_pb2.ShardRecord] = {(r.id, r.version): r for r in before.values()}
    shard = src[0]
    listing = shard.list_versions
    rng = np.random.default_rng(3)
    state = {"version": 100, "deleted": set()}

    async def churn(req, timeout_s):
        for _ in range(5):
            state["version"] += 1
            i = int(rng.integers(0, 160))  # an existing id or a new one
            r = _record(i, version=state["version"])
            r.metadata["v"] = str(state["version"])
            shard.records[r.id] = r
            shard.tombstones.pop(r.id, None)
            written[(r.id, r.version)] = r
        victim = f"img-{int(rng.integers(0, 120)):05d}"
        if victim in shard.records:
            del shard.records[victim]
            shard.tombstones[victim] = state["version"]
            state["deleted"].add(victim)
        return await listing(req, timeout_s)

    shard.list_versions = churn  # type: ignore[method-assign]
    storage = DirectoryStorage(str(tmp_path))
    m = _backup(storage, src)
    got = {r.id: r for s in m.shards for c in s.chunks for r in decode_chunk(storage.get(c.file), c.file)}
    assert set(before) - state["deleted"] <= set(got)
    for image_id, r in got.items():
        assert written[(image_id, r.version)] == r  # whole: exactly one write's record

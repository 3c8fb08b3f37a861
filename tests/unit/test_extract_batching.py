"""Dynamic batching in the extractor: the Batcher's logic, and batched descriptors equal unbatched."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from skimage import data

from services.extractor.batching import Batcher
from services.extractor.global_descriptor import GlobalConfig
from services.extractor.local_features import LocalConfig
from services.extractor.config import ExtractorConfig
from services.extractor.describer import Describer, Job


def _submit_all(b: Batcher, items: list) -> list:
    out: list = [None] * len(items)

    def one(i: int) -> None:
        try:
            out[i] = b.submit(items[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_batches_are_bounded_results_in_order_and_errors_per_item() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def run(items: list[int]) -> list:
        gate.wait(5)  # hold the first batch so that the others queue up
        sizes.append(len(items))
        return [ValueError(f"item {x}") if x % 5 == 0 else x * 10 for x in items]

    b = Batcher(run, max_items=4, max_wait_s=0.05)
    threading.Timer(0.3, gate.set).start()
    items = list(range(1, 14))
    out = _submit_all(b, items)
    b.close()
    assert sum(sizes) == len(items) and max(sizes) <= 4 and max(sizes) > 1
    for x, r in zip(items, out):
        if x % 5 == 0:
            assert isinstance(r, ValueError) and str(r) == f"item {x}"
        else:
            assert r == x * 10


def test_a_failing_batch_fails_each_of_its_callers_and_the_worker_goes_on() -> None:
    calls = []

    def run(items: list[int]) -> list:
        calls.append(list(items))
        if 0 in items:
            raise RuntimeError("model broke")
        return items

    b = Batcher(run, max_items=1, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="model broke"):
        b.submit(0)
    assert b.submit(7) == 7
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


def test_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="max_items"):
        Batcher(lambda x: x, max_items=0, max_wait_s=0.0)
    with pytest.raises(ValueError, match="batch_images"):
        ExtractorConfig(batch_images=0)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        ExtractorConfig(batch_wait_ms=-1)


class _Counting:
    def __init__(self, backbone) -> None:
        self.backbone, self.calls, self.batch = backbone, 0, []

    def parameters(self):
        return self.backbone.parameters()

    def forward_taps(self, x, taps):
        self.calls += 1
        self.batch.append(x.shape[0])
        return self.backbone.forward_taps(x, taps)


@pytest.fixture(scope="module")
def svc() -> Describer:
    cfg = ExtractorConfig(
        global_config=GlobalConfig(pooling="rmac", max_side=256), local_config=LocalConfig(max_side=384, max_keypoints=300),
        regional_max_side=384, runtime="torch", batch_images=8,
    )
    return Describer(cfg)


def _photos() -> list[np.ndarray]:
    a = data.astronaut()[:384, :320]  # two images of one size, one of another
    b = np.ascontiguousarray(data.coffee()[:384, :320])
    return [a, data.chelsea(), b]


def test_batched_descriptors_equal_unbatched_in_order_with_stacked_passes(svc: Describer) -> None:
    photos = _photos()
    jobs = [Job(im, want_local=True, want_regional=True) for im in photos]
    single = [svc.describe(im, want_local=True) for im in photos]
    counting = _Counting(svc.backbone)
    runner, svc.backbone = svc.backbone, counting  # type: ignore[assignment]
    try:
        batched = svc.describe_batch(jobs)
    finally:
        svc.backbone = runner
    # the two 384x320 images share stacked passes (256/181/128 px global, 384 px regional + local,
    # 192/96 px local), chelsea runs alone: one pass per planned level, none computed twice
    levels = [len(svc.levels(im, want_local=True, want_regional=True)) for im in photos]
    assert levels[0] == levels[2] == 6
    assert counting.calls == levels[0] + levels[1]
    assert counting.batch.count(2) == levels[0]
    for (v0, r0, l0), res in zip(single, batched):
        assert not isinstance(res, BaseException)
        v1, r1, l1 = res
        np.testing.assert_allclose(v1, v0, atol=1e-5)
        np.testing.assert_allclose(r1, r0, atol=1e-5)
        np.testing.assert_allclose(l1.keypoints[:, :3], l0.keypoints[:, :3], atol=1e-4)
        np.testing.assert_allclose(l1.descriptors, l0.descriptors, atol=1e-4)


def test_an_image_that_fails_fails_alone(svc: Describer) -> None:
    photos = _photos()
    bad = np.zeros((384, 320, 3), np.float32)  # same size as two others, wrong dtype
    out = svc.describe_batch([Job(photos[0], False, True), Job(bad, False, True), Job(photos[2], False, True)])  # type: ignore[arg-type]
    assert isinstance(out[1], ValueError)
    for i in (0, 2):
        assert not isinstance(out[i], BaseException)
        np.testing.assert_allclose(out[i][0], svc.describe(photos[i], want_local=False)[0], atol=1e-5)


def test_a_query_local_working_side_shares_the_global_passes() -> None:
    with pytest.raises(ValueError, match="query_local_max_side"):
        ExtractorConfig(local_config=LocalConfig(max_side=384), query_local_max_side=512)
    cfg = ExtractorConfig(
        global_config=GlobalConfig(pooling="rmac", max_side=256), local_config=LocalConfig(max_side=384, max_keypoints=300),
        regional_max_side=384, runtime="torch", query_local_max_side=256,
    )
    svc = Describer(cfg)
    photo = data.astronaut()[:384, :320]
    indexed = svc.levels(photo, want_local=True, want_regional=False)
    query = svc.levels(photo, want_local=True, want_regional=False, query=True)
    # the database image runs its local pyramid up to 384 px; the query's tops out at the global 256-px pass
    assert max(max(lv.shape[:2]) for lv, _ in indexed) == 384
    assert max(max(lv.shape[:2]) for lv, _ in query) == 256 and len(query) < len(indexed)
    counting = _Counting(svc.query_backbone)
    svc._query_backbone = counting  # type: ignore[assignment]
    _, _, loc = svc.describe(photo, want_local=True, want_regional=False, query=True)
    assert counting.calls == len(query)  # exactly the planned passes, none at the indexed local side
    assert loc is not None and len(loc.keypoints) > 0 and loc.keypoints[:, 0].max() < photo.shape[1]

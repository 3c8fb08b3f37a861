from services.broker.topk import Hit, merge_topk


def hits(*pairs):
    return [Hit(s, i) for i, s in pairs]


def test_merge_orders_by_score_across_lists():
    a = hits(("a1", 0.9), ("a2", 0.5), ("a3", 0.1))
    b = hits(("b1", 0.8), ("b2", 0.7))
    out = merge_topk([a, b], 4)
    assert [h.image_id for h in out] == ["a1", "b1", "b2", "a2"]


def test_merge_dedupes_ids_keeping_best():
    a = hits(("x", 0.9), ("y", 0.3))
    b = hits(("x", 0.95), ("z", 0.5))
    out = merge_topk([a, b], 5)
    assert [h.image_id for h in out] == ["x", "z", "y"]
    assert out[0].score == 0.95


def test_merge_k_zero_and_short_lists():
    assert merge_topk([hits(("a", 1.0))], 0) == []
    assert [h.image_id for h in merge_topk([[], hits(("a", 1.0))], 10)] == ["a"]


def test_merge_smaller_is_better_for_distances():
    a = hits(("far", 3.0))
    b = hits(("near", 0.5), ("mid", 1.0))
    assert [h.image_id for h in merge_topk([a, b], 3, larger_is_better=False)] == ["near", "mid", "far"]


def test_merge_ties_are_deterministic():
    a = hits(("a", 0.5))
    b = hits(("b", 0.5))
    assert [h.image_id for h in merge_topk([a, b], 2)] == ["a", "b"]

import pytest

from cluster.config import ClusterConfig
from loupe.rerank_spec import parse_rerank


def test_config_defaults_and_env_override():
    cfg = ClusterConfig.build({"shards": 3}, environ={"LOUPE_REPLICAS": "2", "LOUPE_SCALES": "1,0.5"})
    assert cfg.shards == 3 and cfg.replicas == 2 and cfg.scales == (1.0, 0.5)


@pytest.mark.parametrize(
    "values, environ, message",
    [
        ({"shards": 0}, {}, "shards"),
        ({}, {"LOUPE_PORT": "abc"}, "LOUPE_PORT"),
        ({"port": 70000}, {}, "port"),
        ({"pooling": "avg"}, {}, "pooling"),
    ],
)
def test_config_rejects_bad_values_naming_them(values, environ, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.build(values, environ=environ)


def test_parse_rerank():
    assert not parse_rerank("none").verify.enabled
    o = parse_rerank("verify,diffuse")
    assert o.verify.enabled and o.diffuse.enabled and not o.diffuse.regional
    assert parse_rerank("diffuse-regional").diffuse.regional
    assert parse_rerank("qe").expand.query_expansion
    with pytest.raises(ValueError, match="unknown stage 'foo'"):
        parse_rerank("verify,foo")
    assert parse_rerank("verify:200").verify.candidates == 200
    assert parse_rerank("diffuse-regional:50").diffuse.neighbourhood == 50
    with pytest.raises(ValueError, match="positive count"):
        parse_rerank("qe:3")
    with pytest.raises(ValueError, match="positive count"):
        parse_rerank("verify:0")


def test_parse_rerank_online_graph():
    o = parse_rerank("diffuse-online")
    assert o.diffuse.enabled and o.diffuse.online_graph and not o.diffuse.regional
    assert not parse_rerank("diffuse").diffuse.online_graph
    r = parse_rerank("diffuse-regional,diffuse-online")
    assert r.diffuse.regional and r.diffuse.online_graph


def test_parse_rerank_parameters():
    o = parse_rerank("verify,diffuse-regional,diffuse-first,k=30,alpha=0.95,gamma=2,inliers=12")
    assert (o.diffuse.k, o.diffuse.gamma, o.verify.min_inliers) == (30, 2.0, 12)
    assert abs(o.diffuse.alpha - 0.95) < 1e-6 and o.diffuse.regional and o.diffuse_first
    with pytest.raises(ValueError, match="unknown parameter 'beta'"):
        parse_rerank("diffuse,beta=1")
    with pytest.raises(ValueError, match="needs a diffusion stage"):
        parse_rerank("verify,alpha=0.5")
    with pytest.raises(ValueError, match="needs the verify stage"):
        parse_rerank("diffuse,inliers=10")
    with pytest.raises(ValueError, match="whole number"):
        parse_rerank("diffuse,k=3.5")
    with pytest.raises(ValueError, match="without a stage"):
        parse_rerank("k=3")

"""Regional diffusion reads the broker's regional copy instead of the shards: against a real shard
server, the vectors the diffusion stage gets are the ones ``GetFeatures`` would have sent (the
same float16 values), images written after the graph build come from the shard, and the diffusion
ranking is the same with and without the copy."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.broker.backends import GrpcShardClient
from services.broker.collection_model import CollectionModel
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline
from services.broker.graph_build import build_graphs
from services.broker.metrics import BrokerMetrics
from services.broker.query import Query
from services.broker.rerank_stages import Diffuse, RerankState
from services.broker.search_pipeline import SearchPipeline
from services.broker.topk import Hit
from services.common.auth import AuthPolicy
from services.common.grpc_server import ServerOptions
from services.index.servicer import create_server as create_shard
from services.index.store import StoredImage
from services.rerank.diffusion import DiffusionParams

TOKEN = "internal-test-token"
DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _image(rng: np.random.Generator, image_id: str, centre: np.ndarray, regions: int = 5) -> StoredImage:
    reg = _unit(centre + 0.5 * rng.normal(size=(regions, DIM))) if regions else None
    return StoredImage(image_id, _unit(centre + 0.3 * rng.normal(size=DIM)), None if reg is None else reg.astype(np.float16), None, {}, 640, 480)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, DIM))
    images = [_image(rng, f"img{i:03d}", centres[i % 6], regions=0 if i == 7 else 1 + i % 5) for i in range(120)]
    opts = ServerOptions(host="127.0.0.1", port=0, auth=AuthPolicy.internal(TOKEN))
    running, servicer = create_shard(0, opts, data_dir=str(tmp_path_factory.mktemp("shard") / "shard-000"))
    servicer.index.add(images)
    yield running, servicer, [im.image_id for im in images], centres
    running.stop(0)
    servicer.index.close()


def test_diffusion_reads_the_copy_and_gets_what_the_shard_would_send(shard, tmp_path):
    running, servicer, ids, centres = shard

    async def scenario():
        client = GrpcShardClient(0, f"127.0.0.1:{running.port}", ServerOptions().channel_options(), internal_token=TOKEN)
        pool = ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        asked: list[str] = []  # ids the shard was asked for features
        get_features = client.get_features

        async def counting(request, timeout_s):
            asked.extend(request.ids)
            return await get_features(request, timeout_s)

        client.get_features = counting
        try:
            with_copy, without = CollectionModel(str(tmp_path / "broker")), CollectionModel()
            writer = with_copy.begin_build()
            graph, regional, _ = await build_graphs([client], with_copy.transform, k=10, regional_k=10, page=32,
                                                    timeout=lambda: 30.0, run=lambda fn, *a: loop.run_in_executor(None, fn, *a), copy=writer)
            with_copy.set_graph(graph, regional, writer.finish())
            without.set_graph(graph, regional)
            assert len(with_copy.regional_copy) == len(ids)
            pipes = [SearchPipeline(None, [client], m, BrokerMetrics.create(), BrokerConfig(), pool) for m in (with_copy, without)]
            hits = [Hit(1.0 - k / 1000, image_id, 0) for k, image_id in enumerate(ids)]
            deadline = Deadline(30.0, 30.0)

            # what the diffusion stage gets: the same arrays from the copy as from the shard
            from_copy = await pipes[0].regional_nodes(hits, deadline)
            assert asked == []  # nothing read from the shard
            from_shard = await pipes[1].regional_nodes(hits, deadline)
            np.testing.assert_array_equal(from_copy.owner, from_shard.owner)
            assert 7 not in from_copy.owner.tolist()
            assert from_copy.vectors.dtype == from_shard.vectors.dtype == np.float32
            np.testing.assert_array_equal(from_copy.vectors, from_shard.vectors)

            # the diffusion stage ranks the same with and without the copy
            query = Query(_unit(centres[0]), None, _unit(centres[0] + 0.3 * np.random.default_rng(1).normal(size=(5, DIM))))
            stage = Diffuse(DiffusionParams(k=10), regional=True, neighbourhood=len(hits))
            ranked = []
            for p in pipes:
                state = RerankState(query, list(hits), len(hits), deadline)
                await stage.run(p, state)
                ranked.append([(h.image_id, h.score) for h in state.hits])
            assert ranked[0] == ranked[1]

            # an image replaced after the build: the copy forgets it, its new vectors come from the shard
            rng = np.random.default_rng(2)
            new = _image(rng, "img003", centres[5], regions=2)
            with_copy.graph_forget(["img003"])
            servicer.index.add([new])
            asked.clear()
            got = await pipes[0].regional_nodes(hits, deadline)
            assert asked == ["img003"]  # only the image written since the build
            fresh = await pipes[1].regional_nodes(hits, deadline)
            assert got.vectors[got.owner == 3].shape == (2, DIM)
            np.testing.assert_array_equal(got.owner, fresh.owner)
            np.testing.assert_array_equal(got.vectors, fresh.vectors)
            assert with_copy.regional_copy.gather(["img003"])[0].tolist() == []
        finally:
            await client.close()
            pool.shutdown()

    asyncio.run(scenario())

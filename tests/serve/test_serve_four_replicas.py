"""Four CPU generator replicas of the tiny model: best-of-8 fans out evenly (the CPU stand-in of the
multi-GPU scaling measurement, which needs a multi-GPU machine)."""

from __future__ import annotations

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SMALL = {"width": 128, "height": 128, "exact_size": True, "steps": 4}


@pytest.fixture(scope="module")
def four_replicas(tmp_path_factory):
    args = tiny_app_args(router={"seeds_per_call": 2, "prune_group_size": 2},
                         defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4},
                         generator={"max_batch": 2})  # fmt: skip
    options = cpu_options({"num_replicas": 4, "max_ongoing_requests": 1})
    with running_service(str(tmp_path_factory.mktemp("cache4")), args, options, timeout=120) as client:
        yield client


def test_best_of_8_spreads_evenly_over_four_replicas(four_replicas):
    for attempt in range(3):  # the first request may race replicas that are still starting
        r = four_replicas.post("/v1/generate/t2i", json={"prompt": "spread", "n": 8, "seed": 40, **SMALL})
        assert r.status_code == 200, r.text[:1000]
        d = r.json()
        replicas = d["debug"]["replicas"]
        if len(replicas) == 4:
            break
    assert len(replicas) == 4, replicas
    assert sorted(len(seeds) for seeds in replicas.values()) == [2, 2, 2, 2]
    assert sorted(s for seeds in replicas.values() for s in seeds) == list(range(40, 48))
    assert len(d["candidates"]) == 8

"""Four CPU generator replicas of the tiny model: best-of-8 fans out evenly (the CPU stand-in of the
multi-GPU scaling measurement, which needs a multi-GPU machine)."""

from __future__ import annotations

import os
import socket

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SMALL = {"width": 128, "height": 128, "exact_size": True, "steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_replicas(tmp_path_factory):
    from services.app import AppArgs, assemble

    env = {"HIDREAM_SERVE_CACHE": str(tmp_path_factory.mktemp("cache4")), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": env})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs(
            model="embedded:tiny", scorer_model="embedded:tiny-clip", device="cpu",
            defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4},
            router={"seeds_per_call": 2}, generator={"max_batch": 2, "torch_threads": 1},
            scorer={"torch_threads": 1},
        )  # fmt: skip
        app = assemble(args, {
            "Router": {"ray_actor_options": {"num_cpus": 0}},
            "Generator": {"num_replicas": 4, "max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 0.5}},
            "Scorer": {"ray_actor_options": {"num_cpus": 0.5}},
        })  # fmt: skip
        serve.run(app, name="hidream", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as client:
            yield client
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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

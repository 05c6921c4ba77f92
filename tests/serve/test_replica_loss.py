"""A generator replica killed mid-request: the router reruns its group on the other replica (same seeds, same
images) and the request returns 200 with every candidate."""

from __future__ import annotations

import base64
import threading
import time

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BODY = {"prompt": "a lighthouse at dusk", "n": 4, "seed": 11, "width": 256, "height": 256, "exact_size": True,
        "steps": 60, "return": "all"}  # fmt: skip


def generator_actors():
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "#Generator#" in a["name"]]  # fmt: skip


def test_killed_generator_replica_is_rerun_elsewhere(tmp_path):
    args = tiny_app_args(router={"seeds_per_call": 2, "generate_timeout_s": 120, "retry_after_s": 1},
                         defaults={"width": 128, "height": 128, "exact_size": True, "steps": 2},
                         limits={"max_pixels": 512 * 512, "max_steps": 100}, pickscore_model="none",
                         dino_model="none")  # fmt: skip
    options = cpu_options({"num_replicas": 2, "max_ongoing_requests": 1})
    with running_service(str(tmp_path / "cache"), args, options, timeout=180) as client:
        wait_ready(client, 90)
        reference = client.post("/v1/generate/t2i", json=BODY)
        assert reference.status_code == 200, reference.text
        started = time.perf_counter()
        client.post("/v1/generate/t2i", json={**BODY, "n": 2})  # time one group alone
        one_group_s = time.perf_counter() - started

        def kill_one_soon():
            time.sleep(one_group_s * 0.4)  # both groups are running by now
            ray.kill(generator_actors()[0], no_restart=True)

        killer = threading.Thread(target=kill_one_soon)
        killer.start()
        r = client.post("/v1/generate/t2i", json=BODY)
        killer.join()
        assert r.status_code == 200, r.text
        out = r.json()
        assert any("rerun" in w for w in out["warnings"]), out["warnings"]
        want = {c["seed"]: base64.b64decode(c["image"]) for c in reference.json()["candidates"]}
        got = {c["seed"]: base64.b64decode(c["image"]) for c in out["candidates"]}
        assert got.keys() == want.keys() == {11, 12, 13, 14}
        assert got == want  # the rerun group made the same images

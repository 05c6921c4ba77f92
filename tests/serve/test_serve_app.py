"""The whole service in-process on CPU: Ray Serve with the embedded tiny model and tiny scorers, over HTTP.

One Serve instance for the module (about 30 s to start on 2 cores): router + two generator replicas
(0.5 CPU each) + scorer, built from `services.app` exactly as the YAML does, with the embedded
models built into a temporary cache by the replicas themselves. HTTP goes to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from tests._images import b64, noise_image, solid_image
from tests._serve import cpu_options, running_service, tiny_app_args
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SMALL = {"width": 128, "height": 128, "exact_size": True, "steps": 2}
LIMITS = {"max_n": 8, "max_steps": 20, "max_pixels": 512 * 512, "max_refs": 4, "max_image_bytes": 200_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    args = tiny_app_args(
        router={"seeds_per_call": 2, "generate_timeout_s": 120, "score_timeout_s": 60, "retry_after_s": 3,
                "max_body_bytes": 2_000_000},
        defaults={"width": 128, "height": 128, "exact_size": True, "steps": 2}, limits=LIMITS,
    )  # fmt: skip
    options = cpu_options({"num_replicas": 2, "max_ongoing_requests": 1, "max_queued_requests": 4})
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), args, options) as client:
        yield client


def gen(client, mode, body, status=200):
    r = client.post(f"/v1/generate/{mode}", json=body)
    assert r.status_code == status, r.text[:2000]
    return r.json()


def png(b64s: str) -> tuple[np.ndarray, dict, bytes]:
    raw = base64.b64decode(b64s)
    img = Image.open(io.BytesIO(raw))
    img.load()
    return np.asarray(img.convert("RGB")), dict(img.text), raw


def ref(seed=0, w=64, h=48, role=None):
    d = {"image": b64(noise_image(w, h, seed), data_url=seed % 2 == 1)}
    if role:
        d["role"] = role
    return d


# -- probes and metadata --------------------------------------------------------------------------


def test_healthz_readyz_and_models(service):
    assert service.get("/healthz").json() == {"status": "ok"}
    r = service.get("/readyz")
    assert r.status_code == 200, r.text
    ready = r.json()
    assert ready["status"] == "ready" and ready["deployments"]["Generator"]["running_replicas"] == 2
    assert ready["deployments"]["Scorer"]["running_replicas"] == 1
    m = service.get("/v1/models").json()
    assert m["checkpoint"] == "embedded:tiny" and m["scorer"] == "embedded:tiny-clip"
    assert m["scorers"] == {"pickscore": "embedded:tiny-pickscore", "clip": "embedded:tiny-clip",
                            "dino": "embedded:tiny-dino"}  # fmt: skip
    assert m["modes"] == ["t2i", "edit", "ip", "skeleton", "layout"]
    assert set(m["recipes"]) == {"full", "dev"} and m["recipes"]["full"]["steps"] == 50
    assert m["limits"]["max_n"] == 8 and m["defaults"]["width"] == 128


# -- every mode end to end --------------------------------------------------------------------------------

MODES = {
    "t2i": {},
    "edit": {"refs": [ref(1)]},
    "ip": {"refs": [ref(2, role="face"), ref(3, w=40, h=64, role="garment")]},
    "skeleton": {"refs": [ref(4, role="face"), ref(5, role="background"), ref(6, role="pose")]},
    "layout": {"refs": [ref(7), ref(8)], "layout_boxes": [[0.0, 0.5, 0.0, 1.0], {"bbox": [0.5, 1.0, 0.2, 0.8],
                                                                              "text": "a cat"}]},
}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_end_to_end(service, mode):
    body = {"prompt": f"a {mode} test", "seed": 21, "n": 2, "return": "all", **SMALL, **MODES[mode]}
    d = gen(service, mode, body)
    assert d["mode"] == mode and d["scored"] and len(d["candidates"]) == 2
    assert [c["seed"] for c in d["candidates"]] == [21, 22]
    assert d["settings"]["width"] == 128 and d["settings"]["height"] == 128 and d["settings"]["steps"] == 2
    assert len(d["settings"]["ref_sizes"]) == len(MODES[mode].get("refs", [])) + (1 if mode == "layout" else 0)
    pixels, text, _ = png(d["winner"]["image"])
    assert pixels.shape == (128, 128, 3)
    assert text["prompt"] == f"a {mode} test" and text["mode"] == mode and text["seed"] == str(d["winner"]["seed"])
    assert json.loads(text["settings"])["steps"] == 2
    for c in d["candidates"]:
        assert isinstance(c["score"], float) and c["image"] and c["replica"].startswith("Generator#")
        check_breakdown(c, mode)
    assert d["steps_computed"] == d["steps_full"] == 4
    assert not any("not configured" in w or "failed" in w for w in d["warnings"]), d["warnings"]
    t = d["timings"]
    assert set(t) >= {"queued", "generate", "score", "total"} and t["total"] >= t["generate"] >= 0


def check_breakdown(c: dict, mode: str) -> None:
    """Every scorer the mode weights reports raw, z and weight, and the composite is their weighted sum."""
    want = {"pickscore", "clip", "sharpness", "exposure"} | ({"fidelity"} if mode != "t2i" else set())
    assert set(c["scores"]) == want, c["scores"]
    for name, d in c["scores"].items():
        assert isinstance(d["raw"], float) and isinstance(d["z"], float) and d["weight"] > 0, (name, d)
    assert c["score"] == pytest.approx(sum(d["weight"] * d["z"] for d in c["scores"].values()), abs=1e-6)


# -- best-of-N ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def best_of_4(service):
    return gen(service, "t2i", {"prompt": "a red fox in the snow", "seed": 100, "n": 4, "return": "all", **SMALL})


def test_best_of_4_returns_four_distinct_seeds_and_the_best_wins(best_of_4):
    d = best_of_4
    seeds = [c["seed"] for c in d["candidates"]]
    assert seeds == [100, 101, 102, 103]
    scores = {c["seed"]: c["score"] for c in d["candidates"]}
    best = max(scores.values())
    assert d["winner"]["score"] == best
    assert d["winner"]["seed"] == min(s for s, v in scores.items() if v == best)
    for c in d["candidates"]:
        check_breakdown(c, "t2i")
    # z-scores within the request: each scorer's z sums to 0 over the set
    for name in d["candidates"][0]["scores"]:
        assert sum(c["scores"][name]["z"] for c in d["candidates"]) == pytest.approx(0.0, abs=1e-6)
    images = [png(c["image"])[0] for c in d["candidates"]]
    assert all(not np.array_equal(images[0], im) for im in images[1:])  # distinct seeds, distinct images
    winner = next(c for c in d["candidates"] if c["seed"] == d["winner"]["seed"])
    assert winner["image"] == d["winner"]["image"]


def test_work_spreads_over_two_replicas(best_of_4):
    replicas = best_of_4["debug"]["replicas"]
    assert len(replicas) == 2, best_of_4["debug"]
    assert sorted(s for seeds in replicas.values() for s in seeds) == [100, 101, 102, 103]
    assert all(len(g["seeds"]) == 2 for g in best_of_4["debug"]["groups"])


def test_winner_only_response_omits_candidate_images(service):
    d = gen(service, "t2i", {"prompt": "a fox", "seed": 7, "n": 3, **SMALL})
    assert [c["seed"] for c in d["candidates"]] == [7, 8, 9]
    assert all(c["image"] is None for c in d["candidates"]) and d["winner"]["image"]


@pytest.fixture(scope="module")
def batch_and_solo(service, best_of_4):
    batch = next(c for c in best_of_4["candidates"] if c["seed"] == 103)
    solo = gen(service, "t2i", {"prompt": "a red fox in the snow", "seed": 103, **SMALL})
    return batch, solo


def test_candidate_equals_solo_request_with_its_seed(batch_and_solo):
    batch, solo = batch_and_solo
    assert len(solo["candidates"]) == 1 and solo["winner"]["seed"] == 103
    a, text_a, _ = png(batch["image"])
    b, text_b, _ = png(solo["winner"]["image"])
    assert text_a == text_b  # same prompt, seed, mode and effective settings
    diff = np.abs(a.astype(int) - b.astype(int))
    # Same image up to float rounding in the batched forward (see the strict test below).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).sum())
    # The composite is relative to the set (z-scores): alone, every z is 0. The raw scores are the image's own.
    assert solo["candidates"][0]["score"] == 0.0
    solo_scores = solo["candidates"][0]["scores"]
    assert set(solo_scores) == set(batch["scores"]) and all(d["z"] == 0.0 for d in solo_scores.values())
    for name, d in solo_scores.items():
        assert d["raw"] == pytest.approx(batch["scores"][name]["raw"], rel=0.01, abs=0.05), name


def test_best_of_8_with_pruning(service):
    body = {"prompt": "a fox", "seed": 300, "n": 8, "return": "all", **SMALL, "steps": 4,
            "prune": {"at": 0.5, "keep": 0.5}}  # fmt: skip
    d = gen(service, "t2i", body)
    assert [c["seed"] for c in d["candidates"]] == list(range(300, 308))
    pruned = [c for c in d["candidates"] if c["pruned"]]
    alive = [c for c in d["candidates"] if not c["pruned"]]
    assert len(pruned) == 4 and len(alive) == 4
    assert all(c["steps_computed"] == 2 and c["pruned_at_step"] == 1 and c["score"] is not None for c in pruned)
    for c in pruned + alive:  # pruned: the preview's breakdown (same composite scorer); alive: the final one
        check_breakdown(c, "t2i")
    assert all(c["steps_computed"] == 4 for c in alive)
    assert d["winner"]["seed"] in {c["seed"] for c in alive}
    assert d["winner"]["score"] == max(c["score"] for c in alive)
    assert d["steps_full"] == 32 and d["steps_computed"] <= 0.75 * d["steps_full"]
    # a survivor is still exactly its own seed's image: pruning others does not change it (up to rounding)
    survivor = alive[0]
    solo = gen(service, "t2i", {"prompt": "a fox", "seed": survivor["seed"], **SMALL, "steps": 4})
    diff = np.abs(png(survivor["image"])[0].astype(int) - png(solo["winner"]["image"])[0].astype(int))
    assert diff.max() <= 1


def test_pruning_judges_previews_against_the_refs_too(service):
    """Preview scoring gets the request's mode, refs and roles: a pruned ip candidate's breakdown has fidelity."""
    body = {"prompt": "the toy on a beach", "seed": 40, "n": 4, **SMALL, "steps": 4,
            "refs": [ref(2, role="subject"), ref(3, role="background")], "prune": {"at": 0.5, "keep": 0.5}}  # fmt: skip
    d = gen(service, "ip", body)
    pruned = [c for c in d["candidates"] if c["pruned"]]
    assert len(pruned) == 2 and d["winner"]["seed"] not in {c["seed"] for c in pruned}
    for c in d["candidates"]:
        check_breakdown(c, "ip")
    assert d["steps_computed"] == 2 * 2 + 2 * 4 and d["steps_full"] == 16


def test_explicit_seeds(service):
    d = gen(service, "t2i", {"prompt": "x", "seeds": [5, 900, 17], "return": "all", **SMALL})
    assert [c["seed"] for c in d["candidates"]] == [5, 900, 17]


def test_random_first_seed_when_omitted(service):
    d = gen(service, "t2i", {"prompt": "x", "n": 2, **SMALL})
    s = [c["seed"] for c in d["candidates"]]
    assert s[1] == s[0] + 1


def test_snapping_warning_is_reported(service):
    d = gen(service, "edit", {"prompt": "x", "refs": [ref(1)], "width": 128, "height": 128, "exact_size": True,
                              "steps": 3, "recipe": "dev"})  # fmt: skip
    assert d["settings"]["recipe"] == "dev" and any("fixed timesteps" in w for w in d["warnings"])


# -- validation over HTTP: 4xx naming the field, never a 500 or a hang ----------------------------------

BAD = [
    ("t2i", {"prompt": "x", "bogus": 1}, "bogus"),
    ("t2i", {"prompt": "x", "n": 0}, "n"),
    ("t2i", {"prompt": "x", "n": 9}, "n"),
    ("t2i", {"prompt": "x", "steps": 0}, "steps"),
    ("t2i", {"prompt": "x", "steps": 21}, "steps"),
    ("t2i", {"prompt": "x", "seed": 1, "seeds": [1, 2]}, "seeds"),
    ("t2i", {"prompt": "x", "seeds": [1, 2], "n": 3}, "n"),
    ("t2i", {"prompt": "x", "seeds": [4, 4]}, "seeds"),
    ("t2i", {"prompt": ""}, "prompt"),
    ("t2i", {"prompt": "x", "width": 1024, "height": 1024}, "width"),
    ("t2i", {"prompt": "x", "width": 130}, "width"),
    ("t2i", {"prompt": "x", "return": "best"}, "return"),
    ("edit", {"prompt": "x"}, "refs"),
    ("edit", {"prompt": "x", "refs": [ref(1), ref(2)]}, "refs"),
    ("edit", {"prompt": "x", "refs": [{"image": "not base64 ###"}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": base64.b64encode(b"GIF89a garbage").decode()}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": b64(noise_image(300, 300))}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": b64(solid_image(1500, 1000))}]}, "refs[0].image"),
    ("ip", {"prompt": "x", "refs": [ref(1), {"image": "AAAA", "role": "hat"}]}, "refs[1].role"),
    ("ip", {"prompt": "x", "refs": [ref(1), {"url": "http://example.com/a.png"}]}, "refs[1].image"),
    ("skeleton", {"prompt": "x", "refs": [ref(1)]}, "refs"),
    ("layout", {"prompt": "x", "refs": [ref(1)]}, "layout_boxes"),
    ("layout", {"prompt": "x", "refs": [ref(1)], "layout_boxes": [[0.7, 0.2, 0.0, 1.0]]}, "layout_boxes[0]"),
    ("layout", {"prompt": "x", "refs": [ref(1)], "layout_boxes": [[0.1, 0.2, 0.1, 0.2], [0, 1.2, 0, 1]]},
     "layout_boxes[1]"),
    ("paint", {"prompt": "x"}, "mode"),
    # the output would be about 2048x2048 (from the reference's aspect), over max_pixels = 512*512
    ("edit", {"prompt": "x", "refs": [ref(1)], "keep_original_aspect": True}, "keep_original_aspect"),
]  # fmt: skip


@pytest.mark.parametrize("mode, body, field", BAD, ids=[f"{m}-{f}" for m, _, f in BAD])
def test_bad_input_gets_a_named_4xx(service, mode, body, field):
    r = service.post(f"/v1/generate/{mode}", json={**SMALL, **body}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"] and err["type"] == "invalid_input"


def test_malformed_json_and_wrong_content(service):
    r = service.post("/v1/generate/t2i", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"]
    r = service.post("/v1/generate/t2i", json=[1, 2, 3])
    assert r.status_code == 422


def test_oversized_body_is_413_before_parsing(service):
    body = json.dumps({"prompt": "x", "refs": [{"image": "A" * 2_100_000}]}).encode()
    r = service.post("/v1/generate/edit", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_malformed_json_names_the_body(service):
    r = service.post("/v1/generate/t2i", content=b'{"prompt": x}', headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "body" and "not valid JSON" in err["message"] and err["request_id"]


def _chunks(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_chunked_upload_over_the_limit_is_413_too(service):
    """No Content-Length (chunked transfer): the limit holds on the bytes received."""
    body = json.dumps({"prompt": "x", "refs": [{"image": "A" * 2_100_000}]}).encode()
    r = service.post("/v1/generate/edit", content=_chunks(body), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text[:500]


def test_chunked_upload_under_the_limit_is_served(service):
    body = json.dumps({"prompt": "chunked", "seed": 3, **SMALL, "refs": [ref(1)]}).encode()
    r = service.post("/v1/generate/edit", content=_chunks(body, 1000), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["winner"]["seed"] == 3


def test_unknown_route_is_404(service):
    assert service.get("/v1/nothing").status_code == 404


def test_unknown_route_error_has_the_request_id(service):
    r = service.get("/v1/nothing")
    assert r.json()["error"]["type"] == "not_found" and r.json()["error"]["request_id"]


def test_overload_is_503_with_retry_after_and_never_500(service):
    """6 concurrent best-of-8 = 24 seed groups for 2 replicas and a queue of 4: some must be turned away."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        with httpx.Client(base_url=str(service.base_url), timeout=120, trust_env=False) as c:
            return c.post("/v1/generate/t2i", json={"prompt": "busy", "seed": 1000 + 10 * i, "n": 8, **SMALL})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 503 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "unavailable"


def test_service_still_healthy_after_bad_requests(service):
    d = gen(service, "t2i", {"prompt": "still alive", "seed": 1, **SMALL})
    assert d["winner"]["seed"] == 1

"""Bounded memory for reference decoding (issue 14 item 3), on the real service (Ray Serve in-process, tiny models).

The worst case of the issue: a ~42 KB `ip` body of ten 3 KB one-bit PNGs, each declared 5000x5000 (under the
per-image pixel limit), n=1, 2 steps, four at once. The Router and Jobs replicas' RSS must stay under the bound stated
in docs/reliability.md, and the memory must be given back once the requests are done."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")  # a Ray dependency

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MiB = 2**20
PEAK_RSS_BOUND = 1024 * MiB  # docs/reliability.md: the Router and Jobs replicas' RSS during four worst-case requests
AT_REST_GROWTH_BOUND = 150 * MiB  # over its RSS before them, once they are done
CONCURRENT = 4
LIMITS = {"max_n": 2, "max_steps": 4, "max_pixels": 128 * 128, "max_refs": 10, "max_image_bytes": 100_000,
          "max_image_pixels": 25_000_000, "max_prompt_chars": 200}  # fmt: skip
OPTIONS = cpu_options({"num_replicas": 1, "max_ongoing_requests": 1})


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "prune_group_size": 2, "generate_timeout_s": 120, "score_timeout_s": 60,
                "retry_after_s": 1},
        defaults={"width": 64, "height": 64, "exact_size": True, "steps": 2}, generator={"max_batch": 2}, limits=LIMITS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS, timeout=180) as c:
        wait_ready(c)
        yield c


def one_bit_png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def worst_case_body() -> dict:
    ref = one_bit_png(5000, 5000)
    return {"prompt": "a cat", "n": 1, "steps": 2, "seed": 7, "width": 128, "height": 128,
            "refs": [{"image": ref} for _ in range(10)]}


# -- reduction at decode time changes nothing the engine computes (no Ray) ---------------------------------


def encoded(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sample_images() -> dict[str, Image.Image]:
    from tests.conftest import make_image

    rgb = make_image(1031, 777, seed=3)  # odd sizes: halving floors, as fit_to_area does
    return {"RGB": rgb, "L": rgb.convert("L"), "1": rgb.convert("1"), "P": rgb.convert("P"),
            "RGBA": rgb.convert("RGBA"), "LA": rgb.convert("LA")}  # fmt: skip


@pytest.mark.parametrize("edge", [64, 96, 192, 384, 1024])
def test_reduced_refs_give_the_engine_the_same_pixels(edge):
    from hidream_serve.api.images import decode_image
    from hidream_serve.engine.sizing import fit_to_area

    for mode, img in sample_images().items():
        data = encoded(img)
        full = decode_image(data, "refs[0].image", 10**8, 10**8)
        reduced = decode_image(data, "refs[0].image", 10**8, 10**8, edge=edge)
        assert min(reduced.size) < 2 * edge, (mode, reduced.size)
        assert reduced.mode == "RGB"
        a, b = fit_to_area(full, edge), fit_to_area(reduced, edge)
        assert a.size == b.size and a.tobytes() == b.tobytes(), (mode, edge)


def test_engine_ref_edge_is_the_conditioning_edge():
    from hidream_serve.api.ref_edges import engine_ref_edge
    from hidream_serve.vocabulary import KEEP_ASPECT_EDGE

    assert engine_ref_edge("ip", 1, 128, 64, True, False, False) == 128
    assert engine_ref_edge("ip", 10, 1024, 1024, True, False, False) == 256
    assert engine_ref_edge("layout", 3, 512, 512, True, False, True) == 256  # 3 refs + the layout picture
    assert engine_ref_edge("edit", 1, 512, 512, True, True, False) == KEEP_ASPECT_EDGE
    assert engine_ref_edge("ip", 1, 100, 64, True, False, False) is None  # a size the checks refuse


def test_large_ref_gives_the_same_image(pipe):
    """The tiny pipeline on a ref four times the edge: the same image with the ref reduced at decode time."""
    from hidream_serve.api.protocol import GenerateRequest, Limits
    from tests.conftest import make_image

    body = GenerateRequest.model_validate({"prompt": "a cat", "width": 64, "height": 64, "exact_size": True,
                                           "steps": 2, "seed": 3, "refs": [{"image": encoded(make_image(300, 260))}]})
    limits = Limits(max_image_pixels=10**6)
    reduced, _ = body.to_engine("ip", limits)
    assert reduced.refs[0].size == (75, 65)  # halved twice: the short side is now under 2 * 64
    full = dataclasses.replace(reduced, refs=[decode_image_full(body)])
    assert full.refs[0].size == (300, 260)
    a, b = pipe(reduced, [3]).candidates[0].image, pipe(full, [3]).candidates[0].image
    assert a.tobytes() == b.tobytes()


def decode_image_full(body) -> Image.Image:
    from hidream_serve.api.images import decode_image

    return decode_image(body.refs[0].image, "refs[0].image", 10**8, 10**8)


def test_request_pixel_budget_names_the_ref():
    from hidream_serve.api.images import RefBudget
    from hidream_serve.api.protocol import GenerateRequest, Limits
    from hidream_serve.engine.errors import InvalidInput
    from tests.conftest import make_image

    ref = {"image": encoded(make_image(200, 200))}
    body = GenerateRequest.model_validate({"prompt": "a", "width": 512, "height": 512, "exact_size": True,
                                           "refs": [ref, ref]})  # fmt: skip
    with pytest.raises(InvalidInput) as err:
        body.to_engine("ip", Limits(), ref_budget=RefBudget(request_pixels=60_000))
    assert err.value.field == "refs[1].image" and "60000" in str(err.value)
    params, _ = body.to_engine("ip", Limits(), ref_budget=RefBudget(request_pixels=80_000))
    assert [r.size for r in params.refs] == [(200, 200), (200, 200)]


def test_decode_budget_refuses_after_its_wait():
    from hidream_serve.api.images import PixelBudget
    from hidream_serve.engine.errors import Overloaded

    budget = PixelBudget(1000, wait_s=0.05)
    with budget.hold(800, "refs[0].image"):
        with pytest.raises(Overloaded):
            with budget.hold(300, "refs[1].image"):
                pass
        with budget.hold(200, "refs[1].image"):
            assert budget.in_use == 1000
    with budget.hold(10**6, "refs[2].image"):  # larger than the whole budget: runs alone
        assert budget.in_use == 1000
    assert budget.in_use == 0


# -- the worst case on the real service ------------------------------------------------------------------


def replica_process(name: str) -> psutil.Process:
    """The one `name` replica of this test's Ray instance: a descendant of this process (ray.init started the
    raylet here), so other Ray instances on the machine are never looked at."""
    mine = [p for p in psutil.Process().children(recursive=True)
            if p.cmdline()[:1] and p.cmdline()[0].startswith(f"ray::ServeReplica:hidream:{name}")]  # fmt: skip
    assert len(mine) == 1, mine
    return mine[0]


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread; `peak` is the largest seen."""

    def __init__(self, proc: psutil.Process):
        self.proc, self.peak, self._stop = proc, proc.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("replica", ["Router", "Jobs"])  # both decode the refs: the router checks, the job runs
def test_worst_case_refs_keep_replica_memory_bounded(service, replica):
    body = worst_case_body()
    assert len(str(body)) < 45_000  # the issue's ~42 KB body
    proc = replica_process(replica)
    warm = service.post("/v1/generate/t2i", json={"prompt": "warm up", "n": 1})
    assert warm.status_code == 200, warm.text[:500]
    before = proc.memory_info().rss

    with PeakRss(proc) as rss, ThreadPoolExecutor(CONCURRENT) as pool:
        responses = list(pool.map(lambda _: service.post("/v1/generate/ip", json=body), range(CONCURRENT)))
    for r in responses:
        assert r.status_code == 200, r.text[:500]
        assert r.json()["winner"]["image"]
    print(f"{replica} RSS: before {before / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB")
    assert rss.peak < PEAK_RSS_BOUND, f"{replica} RSS peaked at {rss.peak / MiB:.0f} MiB"

    time.sleep(1.0)  # the last request's references are dropped after its response is sent
    after = proc.memory_info().rss
    print(f"{replica} RSS at rest: {after / MiB:.0f} MiB")
    assert after - before < AT_REST_GROWTH_BOUND, f"RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB at rest"

"""The sweep runner without Ray: JobRunner over a real SQLite store with a fake generator stream and scorer.
Resume keeps the stored cells and recomputes only the rest; cells are ordered by shape; the sweep-wide score
ranks cells on one scale; the contact sheet and tables are written."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest
from PIL import Image

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.api.sweeps_protocol import SweepRequest
from hidream_serve.jobs.store import JobStore
from hidream_serve.sweeps import SHEET, TABLE_CSV, expand, sweep_scores
from services.config import JobsConfig, RouterConfig
from services.job_runner import JobRunner
from services.messages import CandidateResult, GroupResult, ScoreResult, StepProgress
from services.sweeps import prepare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEFAULTS = Defaults(width=64, height=64, exact_size=True, steps=2)
LIMITS = Limits()


def png_of(shift: float, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (int(shift * 50) % 256, seed % 256, 7)).save(buf, "PNG")
    return buf.getvalue()


class FakeService:
    """The generator stream and the scorer: an image's raw quality is its shift (so higher shift cells win)."""

    def __init__(self):
        self.calls: list[tuple[float, tuple[int, ...], int]] = []

    async def stream(self, job):
        p = job.params
        shift = p.shift or 3.0
        self.calls.append((p.shift, tuple(job.seeds), p.width))
        for step in (1, 2):
            yield StepProgress(list(job.seeds), step, 2)
        yield GroupResult(replica=f"fake#{len(self.calls) % 2}",
                          candidates=[CandidateResult(seed=s, png=png_of(shift, s), steps_computed=2) for s in job.seeds],
                          settings={"shift": shift, "steps": 2, "width": p.width}, warnings=[])  # fmt: skip

    async def score(self, prompt, pngs, context):
        raws = [Image.open(io.BytesIO(b)).getpixel((0, 0))[0] / 50 for b in pngs]
        mean = sum(raws) / len(raws)
        return ScoreResult(composite=[r - mean for r in raws],
                           scores=[{"clip": {"raw": r, "z": r - mean, "weight": 1.0}} for r in raws])  # fmt: skip


def stored_request(axes, n=2, **base):
    body = SweepRequest.model_validate({"base": {"mode": "t2i", "prompt": "a cat", "seed": 5, **base}, "axes": axes,
                                        "n": n})  # fmt: skip
    return prepare(body, LIMITS, DEFAULTS, RouterConfig(seeds_per_call=1), has_scorer=True)


async def run_to_end(runner, store, job_id):
    runner.start()
    for _ in range(400):
        await asyncio.sleep(0.02)
        if store.get(job_id).status not in ("queued", "running"):
            break
    await runner.stop()
    return store.get(job_id)


def test_a_resumed_sweep_keeps_its_stored_cells_and_ranks_on_one_scale(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    spec = stored_request({"shift": [1.0, 3.0, 2.0]})
    job, _ = store.create(spec)
    cells = expand(spec["base"], spec["axes"], spec["n"])
    for seed in cells[0].seeds:  # a previous run stored cell 0 before the replica stopped
        store.save_candidate(job.id, cells[0].slot(seed), png_of(1.0, seed),
                             {"cell": 0, "seed": seed, "steps_computed": 2, "pruned_at_step": None, "replica": "old#0",
                              "settings": {"shift": 1.0, "steps": 2}, "warnings": [], "score": None, "scores": None})  # fmt: skip
    store.set_status(job.id, "running")
    fake = FakeService()
    runner = JobRunner(store, fake.stream, fake.score, JobsConfig(sweep_tile_size=32), RouterConfig(seeds_per_call=1),
                       LIMITS, DEFAULTS)  # fmt: skip

    done = asyncio.run(run_to_end(runner, store, job.id))
    assert done.status == "succeeded", done.error
    assert sorted(fake.calls) == [(2.0, (5,), 64), (2.0, (6,), 64), (3.0, (5,), 64), (3.0, (6,), 64)]  # not cell 0
    result = done.result
    assert [c["candidates"][0]["replica"] for c in result["cells"]][0] == "old#0"
    assert result["ranking"] == [1, 2, 0]  # shift 3 > 2 > 1, although each cell's own z-scores are all 0
    assert all(c["cell_score"] == 0.0 for cell in result["cells"] for c in cell["candidates"])
    assert result["cells"][1]["mean"] > result["cells"][2]["mean"] > result["cells"][0]["mean"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results" / job.id / TABLE_CSV).read_text())))
    assert [r["shift"] for r in rows] == ["1.0", "3.0", "2.0"] and [r["rank"] for r in rows] == ["3", "1", "2"]
    sheet = Image.open(tmp_path / "results" / job.id / SHEET)
    assert sheet.format == "PNG" and sheet.width > 3 * 2 * 32
    kinds = [e.kind for e in store.events(job.id)]
    assert kinds.count("cell") == 3 and kinds[-1] == "succeeded"


def test_cells_of_the_same_shape_are_sent_one_after_another(tmp_path):
    from tests._images import b64, noise_image

    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    refs = [{"image": b64(noise_image(64, 64))}, {"image": b64(noise_image(32, 96))}]
    body = SweepRequest.model_validate({"base": {"mode": "ip", "prompt": "a cat", "seed": 5, "refs": refs},
                                        "axes": {"refs": [[0], [1], [0], [1]]}, "n": 1})  # fmt: skip
    job, _ = store.create(prepare(body, LIMITS, DEFAULTS, RouterConfig(seeds_per_call=1), has_scorer=True))
    fake = FakeService()
    sizes = []
    stream = fake.stream

    async def recording(job):
        sizes.append(job.params.refs[0].size)
        async for msg in stream(job):
            yield msg

    runner = JobRunner(store, recording, fake.score, JobsConfig(), RouterConfig(seeds_per_call=1), LIMITS, DEFAULTS)
    assert asyncio.run(run_to_end(runner, store, job.id)).status == "succeeded"
    assert sorted(sizes) == [(32, 96), (32, 96), (64, 64), (64, 64)]
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3]  # not alternating, as the cells are


def test_sweep_scores_z_score_each_scorer_over_the_whole_sweep():
    cells = [[{"clip": {"raw": 1.0, "weight": 2.0}}, {"clip": {"raw": 3.0, "weight": 2.0}}], [None],
             [{"clip": {"raw": 2.0, "weight": 2.0}}]]  # fmt: skip
    scores = sweep_scores(cells)
    assert scores[1] == [None]
    assert scores[0][0] == pytest.approx(-2 * 1.2247, abs=1e-3) and scores[2][0] == pytest.approx(0.0)


def test_cancelling_a_sweep_stops_its_groups_and_keeps_the_finished_candidates(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create(stored_request({"shift": [1.0, 2.0]}, n=1))
    fake = FakeService()
    stopped = []

    async def stream(group):
        if group.params.shift == 2.0:  # the second cell never finishes on its own
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                stopped.append(group.seeds)
                raise
        async for msg in fake.stream(group):
            yield msg

    async def go():
        runner = JobRunner(store, stream, fake.score, JobsConfig(), RouterConfig(seeds_per_call=1), LIMITS, DEFAULTS)
        runner.start()
        for _ in range(200):
            await asyncio.sleep(0.02)
            if any(e.kind == "candidate" for e in store.events(job.id)):
                break
        assert await runner.cancel(job.id)
        await runner.stop()

    asyncio.run(go())
    done = store.get(job.id)
    assert done.status == "cancelled" and stopped == [[5]]
    assert done.result["candidates"] == [{"cell": 0, "seed": 5, "url": f"/v1/jobs/{job.id}/cells/0/images/5.png",
                                          "steps_computed": 2}]  # fmt: skip
    assert store.events(job.id)[-1].kind == "cancelled"

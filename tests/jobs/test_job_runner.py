"""JobRunner without Ray, over a real SQLite store and a fake generator stream: the progress heartbeat, and the
steps a cancelled job had done."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.jobs.store import JobStore
from services.config import JobsConfig, RouterConfig
from services.job_runner import JobRunner
from services.messages import CandidateResult, GroupResult, StepProgress

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEFAULTS = Defaults(width=64, height=64, exact_size=True, steps=4)
REQUEST = {"mode": "t2i", "prompt": "a fox", "seeds": [1, 2]}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    return buf.getvalue()


def runner_for(store, stream, every_s=2.0):
    return JobRunner(store, stream, None, JobsConfig(progress_every_s=every_s), RouterConfig(seeds_per_call=2),
                     Limits(), DEFAULTS)  # fmt: skip


def finished_group(group, steps=4) -> GroupResult:
    return GroupResult(replica="fake#0", settings={"steps": steps}, warnings=[],
                       candidates=[CandidateResult(seed=s, png=png(), steps_computed=steps) for s in group.seeds])  # fmt: skip


def run_until_done(store, job_id, stream, every_s=2.0, linger_s=0.0) -> None:
    """Start a runner, wait until the job has ended (then `linger_s` more), stop it."""

    async def go():
        runner = runner_for(store, stream, every_s)
        runner.start()
        await until(lambda: store.get(job_id).status not in ("queued", "running"))
        await asyncio.sleep(linger_s)
        await runner.stop()

    asyncio.run(go())


async def until(predicate, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_stalled_job_still_reports_progress_at_the_set_interval(tmp_path):
    """A group waiting for a replica, then a slow step: the heartbeat repeats each candidate's last progress
    (step 0 before the first step) every `progress_every_s`, and nothing after the final event."""
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create(REQUEST)

    async def stream(group):
        await asyncio.sleep(0.35)  # queued on a busy replica
        yield StepProgress(list(group.seeds), 1, 4)
        await asyncio.sleep(0.35)  # a slow step
        for step in (2, 3, 4):
            yield StepProgress(list(group.seeds), step, 4)
        yield finished_group(group)

    run_until_done(store, job.id, stream, every_s=0.1, linger_s=0.3)  # a heartbeat would fire in the 0.3 s
    events = [(e.kind, e.data) for e in store.events(job.id)]
    kinds = [k for k, _ in events]
    assert kinds[-1] == "succeeded" and "progress" not in kinds[kinds.index("candidate"):]
    progress = [(d["seed"], d["step"]) for k, d in events if k == "progress"]
    first_step = progress.index((1, 1))
    assert progress[:first_step].count((1, 0)) >= 2 and progress[:first_step].count((2, 0)) >= 2
    stalled = progress[first_step : progress.index((1, 2))]
    assert stalled.count((1, 1)) >= 3 and stalled.count((2, 1)) >= 3
    assert all(d["steps"] == 4 for k, d in events if k == "progress")


def test_a_fast_job_gets_no_repeated_progress(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create(REQUEST)

    async def stream(group):
        for step in (1, 2, 3, 4):
            yield StepProgress(list(group.seeds), step, 4)
        yield finished_group(group)

    run_until_done(store, job.id, stream)
    progress = [(e.data["seed"], e.data["step"]) for e in store.events(job.id) if e.kind == "progress"]
    assert progress == [(s, step) for step in (1, 2, 3, 4) for s in (1, 2)]


def test_a_cancelled_job_keeps_the_steps_its_candidates_had_done(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create(REQUEST)

    async def stream(group):
        for step in (1, 2, 3):
            yield StepProgress(list(group.seeds), step, 50)
        await asyncio.sleep(3600)  # cancelled here
        yield None

    async def go():
        runner = runner_for(store, stream)
        runner.start()
        await until(lambda: sum(e.kind == "progress" for e in store.events(job.id)) >= 6)
        assert await runner.cancel(job.id)
        await runner.stop()

    asyncio.run(go())
    done = store.get(job.id)
    assert done.status == "cancelled" and done.result["candidates"] == []
    assert {(p["seed"], p["step"]) for p in done.result["progress"]} == {(1, 3), (2, 3)}
    assert done.result["steps"] == 50


def test_a_job_warns_of_input_without_effect_as_the_synchronous_call_does(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create({"mode": "t2i", "prompt": "a fox", "seeds": [1], "prune": {"at": 0.5, "keep": 0.5}})

    async def stream(group):
        yield finished_group(group)

    run_until_done(store, job.id, stream)
    warning = "prune has no effect with a single candidate: there is nothing to rank"
    assert warning in store.get(job.id).result["warnings"]


def test_a_job_runs_with_the_router_settings_it_was_submitted_with(tmp_path):
    """The stored request carries the router's live fan-out settings: a reconfigured router reaches the jobs
    submitted after it, and a resumed job splits its seeds as before."""
    store = JobStore(tmp_path / "db.sqlite3", tmp_path / "results")
    job, _ = store.create({**REQUEST, "router": RouterConfig(seeds_per_call=1).model_dump(mode="json")})
    groups = []

    async def stream(group):
        groups.append(list(group.seeds))
        yield finished_group(group)

    run_until_done(store, job.id, stream)  # the runner's own RouterConfig has seeds_per_call=2
    assert sorted(groups) == [[1], [2]]

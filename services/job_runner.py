"""Runs the stored jobs, the synchronous calls' included: `fanout.best_of_n` over streaming generator
calls, with progress, previews, per-candidate results as files, cancel and resume. Plain asyncio over
injected calls (no Ray): `generate_stream(GroupJob)` yields `StepProgress` / `PreviewImage` messages then
the `GroupResult`; `score(prompt, pngs, context)`.

Rules, beyond fanout's:
- jobs start in submission order, at most `max_running` at once; a job that a synchronous call
  (`POST /v1/generate/{mode}`) waits for starts at once, as the router admitted it against the
  generator replicas' capacity;
- a job's seed groups are fixed by its request (the same split whenever it runs), and a group's
  candidates are stored (PNG file + row) as soon as the group returns; on resume (a restarted Jobs
  replica or service) the stored groups are kept and only the others recomputed, so the seeds give
  identical images;
- a job retries back-pressure or a lost replica for `jobs.retry_unavailable_s` (an accepted job is never
  dropped for load); a synchronous call's job follows fanout's rules (a lost replica's group rerun within
  `router.replica_retries`, back-pressure a 503); bad input fails the job naming the field;
- cancelling stops the running groups at their next step; the job ends `cancelled` with the
  candidates that had finished.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from hidream_serve.api.checks import precheck
from hidream_serve.api.errors import ServiceError, Unavailable, classify
from hidream_serve.api.images import PixelBudget, RefBudget, release_after
from hidream_serve.api.jobs_protocol import TERMINAL, CandidateProgress, JobCandidate, JobResult, JobWinner, image_url
from hidream_serve.api.protocol import Defaults, GenerateRequest, Limits, Timings
from hidream_serve.jobs.store import JobStore
from hidream_serve.scoring.context import ScoreContext

from . import metrics
from .config import JobsConfig, RouterConfig
from .fanout import Outcome, best_of_n, debug_of
from .messages import (
    CandidateResult,
    GroupJob,
    GroupResult,
    PreviewImage,
    PreviewScore,
    ProgressPlan,
    ScoreResult,
    StepProgress,
)  # fmt: skip

log = logging.getLogger("ray.serve.hidream.jobs")

GenerateStream = Callable[[GroupJob], AsyncIterator[object]]
ScoreFn = Callable[[str, list[bytes], ScoreContext], Awaitable[ScoreResult]]


@dataclass
class Live:
    """What a running job shows beyond its row: per-candidate progress, settings and warnings so far."""

    steps: int = 0
    candidates: dict[int, CandidateProgress] = field(default_factory=dict)
    settings: dict | None = None
    warnings: list[str] = field(default_factory=list)


def _candidate_key(data: dict) -> tuple:
    """A candidate in an event's data: (cell, seed), cell None outside a sweep."""
    return data.get("cell"), data["seed"]


class JobRunner:
    def __init__(self, store: JobStore, generate_stream: GenerateStream, score: ScoreFn | None, config: JobsConfig,
                 router_config: RouterConfig, limits: Limits, defaults: Defaults):  # fmt: skip
        self.store, self.generate_stream, self.score = store, generate_stream, score
        self.config, self.router_config, self.limits, self.defaults = config, router_config, limits, defaults
        self.live: dict[str, Live] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._loop_task: asyncio.Task | None = None
        self.on_event: Callable[[str, str, dict], None] | None = None  # the Jobs deployment's webhooks
        # per running job: each unfinished candidate's last progress, keyed (cell, seed), and when the job's
        # last progress event was sent (the heartbeat repeats them when no step ends for progress_every_s)
        self.unfinished: dict[str, dict[tuple, dict]] = {}
        self._last_progress: dict[str, float] = {}
        self._heartbeats: dict[str, asyncio.Task] = {}
        self._waited_for: set[str] = set()  # running jobs that a synchronous call waits for
        self.decode_budget = PixelBudget(router_config.ref_decode_pixels, router_config.ref_decode_wait_s)

    # 1. lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume: a job that was running when the last replica stopped is queued again (its stored
        candidates are kept), then every queued job runs in order."""
        for job in self.store.active():
            if job.status == "running":
                self.store.set_status(job.id, "queued")
        self._loop_task = asyncio.ensure_future(self._schedule())
        self._wake.set()

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for t in list(self.tasks.values()):
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            queued = [j for j in self.store.active() if j.status == "queued" and j.id not in self.tasks]
            # a synchronous call starts at once: the router admitted it against the replicas' capacity
            waited_for = [j for j in queued if j.request.get("sync")]
            running_jobs = sum(1 for job_id in self.tasks if job_id not in self._waited_for)
            others = [j for j in queued if not j.request.get("sync")]
            self._waited_for.update(j.id for j in waited_for)
            for job in waited_for + others[: max(0, self.config.max_running - running_jobs)]:
                self.tasks[job.id] = asyncio.ensure_future(self._run(job.id))
                self.tasks[job.id].add_done_callback(lambda _t, jid=job.id: self._finished(jid))
                self._heartbeats[job.id] = asyncio.ensure_future(self._heartbeat(job.id))
            metrics.jobs_active(sum(j.id not in self.tasks for j in queued), len(self.tasks))

    def _finished(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        self._waited_for.discard(job_id)
        self.live.pop(job_id, None)
        beat = self._heartbeats.pop(job_id, None)
        if beat is not None:
            beat.cancel()
        self.unfinished.pop(job_id, None)
        self._last_progress.pop(job_id, None)
        self._wake.set()

    def submitted(self) -> None:
        self._wake.set()

    # 2. events ----------------------------------------------------------------------------------------
    async def event(self, job_id: str, kind: str, data: dict) -> None:
        if kind == "progress":
            self._last_progress[job_id] = time.monotonic()
            self.expect_progress(job_id, data)
        elif kind == "candidate":
            self.unfinished.get(job_id, {}).pop(_candidate_key(data), None)
        elif kind in TERMINAL:
            self.unfinished.pop(job_id, None)  # the heartbeat sends nothing after the final event
        self.store.append_event(job_id, kind, data)
        metrics.job_event(kind)
        async with self._changed:
            self._changed.notify_all()
        if self.on_event is not None:
            try:
                self.on_event(job_id, kind, data)
            except Exception:  # noqa: BLE001 - a webhook problem never fails the job
                log.exception("job %s: event hook failed on %s", job_id, kind)

    def expect_progress(self, job_id: str, data: dict) -> None:
        """A candidate the job will compute (`{seed, step: 0, steps}`, and `cell` in a sweep): the heartbeat
        reports it before its first step; a progress event updates it."""
        self.unfinished.setdefault(job_id, {})[_candidate_key(data)] = data

    async def _heartbeat(self, job_id: str) -> None:
        """Progress at least every `progress_every_s` while the job runs: each unfinished candidate's last
        progress again when no step ended since, so a client sees the job is alive while a group waits for a
        replica, a step is slow or the candidates are scored."""
        every = self.config.progress_every_s
        self._last_progress[job_id] = time.monotonic()
        while True:
            await asyncio.sleep(max(0.01, self._last_progress.get(job_id, 0.0) + every - time.monotonic()))
            if time.monotonic() - self._last_progress.get(job_id, 0.0) < every:
                continue
            for key, data in list(self.unfinished.get(job_id, {}).items()):
                if key in self.unfinished.get(job_id, {}):  # not finished (or the job ended) meanwhile
                    await self.event(job_id, "progress", data)
            self._last_progress[job_id] = time.monotonic()

    async def wait_for_events(self, job_id: str, after: int, timeout_s: float) -> list:
        """Events after `after`, waiting up to `timeout_s` for the first new one."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.store.events(job_id, after)
            left = deadline - time.monotonic()
            if events or left <= 0:
                return events
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    # 3. cancel ----------------------------------------------------------------------------------------
    async def cancel(self, job_id: str) -> bool:
        """True if the job was queued or running (it ends cancelled); False if it had already ended."""
        job = self.store.get(job_id)
        if job is None or job.status not in ("queued", "running"):
            return False
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return True
        self.store.set_status(job_id, "cancelled", result=None)
        await self.event(job_id, "cancelled", {"candidates": []})
        return True

    # 4. one job ---------------------------------------------------------------------------------------
    async def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.request.get("kind") == "sweep":
            from . import sweeps

            return await sweeps.run(self, job_id)
        body = dict(job.request)
        mode = body.pop("mode")
        body.pop("webhook", None)
        waited_for = body.pop("sync", False)  # a synchronous call waits for it (POST /v1/generate/{mode})
        # the router's fan-out settings when the job was submitted (its groups are the same on every run)
        rc = RouterConfig.model_validate(body.pop("router")) if "router" in body else self.router_config
        request = GenerateRequest.model_validate(body)
        prune = request.prune_plan()
        budget = self.ref_budget()
        try:
            params, seeds = await asyncio.to_thread(request.to_engine, mode, self.limits, self.defaults, budget)
            release_after(params, budget)
            pre = precheck(params, seeds, self.limits, prune)
        except Exception as e:  # noqa: BLE001 - validated at submission; a changed limit can still refuse it
            await self._fail(job_id, classify(e))
            return
        live = self.live.setdefault(job_id, Live())
        live.candidates = {s: CandidateProgress(seed=s) for s in seeds}
        live.steps = pre["steps"]  # the recipe's when the request leaves steps unset
        # what the synchronous call warns of: refs a preset dropped, then every input that will have no effect
        for w in request.effective(mode).warnings + pre["warnings"]:
            if w not in live.warnings:
                live.warnings.append(w)
        self.store.set_status(job_id, "running")
        metrics.queue_wait("job", time.time() - job.created_at)
        await self.event(job_id, "started", {"seeds": seeds})
        t0 = time.perf_counter()
        stored = self.store.candidates(job_id)
        for seed, meta in stored.items():
            live.candidates[seed] = CandidateProgress(seed=seed, step=meta["steps_computed"],
                                                      pruned=meta["pruned_at_step"] is not None)  # fmt: skip
        for s in seeds:
            if s not in stored:
                self.expect_progress(job_id, {"seed": s, "step": 0, "steps": live.steps})
        groups: set[asyncio.Task] = set()  # the group calls running, to wait for when cancelled

        async def generate(p, group: list[int]) -> GroupResult:
            if all(s in stored for s in group):  # stored before a restart: the same seeds give the same images
                return await asyncio.to_thread(self._stored_group, job_id, group, stored)
            groups.add(asyncio.current_task())
            try:
                # a synchronous call fails fast on back-pressure (503) as the router admitted it; a job waits
                return await self._group(job_id, live, p, group, prune, retry_for_s=0.0 if waited_for else None,
                                         router_config=rc)  # fmt: skip
            finally:
                groups.discard(asyncio.current_task())

        context = ScoreContext.for_params(params)
        score = None
        if self.score is not None:
            async def score(prompt, pngs):
                return await self.score(prompt, pngs, context)
        try:
            out = await best_of_n(params, seeds, generate, score, rc, pruning=bool(prune),
                                  bounded=bool(waited_for))  # fmt: skip
        except asyncio.CancelledError:  # cancel(): best_of_n has cancelled the groups; wait until they stopped
            await asyncio.gather(*groups, return_exceptions=True)
            await self._finish_cancelled(job_id, seeds, live)
            return
        except Exception as e:  # noqa: BLE001 - bad input, back-pressure of a synchronous call, every group failed
            await self._fail(job_id, classify(e, rc.retry_after_s))
            return
        metrics.groups_waited(out.groups)
        timings = Timings(total=time.perf_counter() - t0, **out.timings)
        warnings = list(dict.fromkeys(live.warnings + out.warnings))
        result = self._result(job_id, mode, out, warnings, int(out.settings.get("steps") or pre["steps"]), timings)
        result["settings"] = {**result["settings"], **request.settings_notes(mode)}
        await self.event(job_id, "scored", {"scored": out.scored, "winner": out.winner.seed,
                                            "candidates": [{"seed": c.seed, "score": c.score}
                                                           for c in out.candidates]})  # fmt: skip
        self.store.set_status(job_id, "succeeded", result=result)
        await self.event(job_id, "succeeded", {"winner": result["winner"]})

    def ref_budget(self) -> RefBudget:
        """A job's reference-decoding budget, as the router's (hidream_serve/api/images.py)."""
        rc = self.router_config
        return RefBudget(rc.ref_pixels_per_request, self.decode_budget, rc.release_memory_pixels)

    def _stored_group(self, job_id: str, seeds: list[int], stored: dict[int, dict]) -> GroupResult:
        """A group stored by an earlier run of the job, as the generator returned it."""
        metas = [stored[s] for s in seeds]
        candidates = [
            CandidateResult(seed=s, png=self.store.image_path(job_id, s).read_bytes(),
                            steps_computed=m["steps_computed"], pruned_at_step=m["pruned_at_step"],
                            preview=PreviewScore(m["score"], m["scores"]) if m["pruned_at_step"] is not None else None)
            for s, m in zip(seeds, metas)
        ]  # fmt: skip
        return GroupResult(replica=metas[0]["replica"], candidates=candidates, settings=metas[0]["settings"],
                           warnings=list(metas[0].get("warnings", [])))  # fmt: skip

    async def _group(self, job_id: str, live: Live, params, seeds: list[int], prune, stream=None,
                     retry_for_s: float | None = None, router_config: RouterConfig | None = None) -> GroupResult:  # fmt: skip
        """One seed group; back-pressure or a lost replica is retried for `retry_for_s` (default
        `jobs.retry_unavailable_s`), then the error is raised as it came, so that the fan-out's rules can tell
        a lost replica from back-pressure. `stream` handles the generator's messages (default: a generate job's)."""
        cfg = self.config
        plan = ProgressPlan(tuple(cfg.preview_at), cfg.preview_size, cfg.preview_format)
        rc = router_config or self.router_config
        job = GroupJob(params, seeds, prune, rc.score_timeout_s, plan, compute_timeout_s=rc.generate_timeout_s)
        deadline = time.monotonic() + (cfg.retry_unavailable_s if retry_for_s is None else retry_for_s)
        while True:
            try:
                bound = rc.queue_timeout_s + rc.generate_timeout_s  # the replica enforces the compute deadline
                return await asyncio.wait_for((stream or self._stream_group)(job_id, live, job), bound)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                err = classify(e, rc.retry_after_s)
                if isinstance(err, Unavailable) and time.monotonic() < deadline:
                    log.info("job %s seeds %s: %s; retrying", job_id, seeds, err.message)
                    await asyncio.sleep(max(0.2, getattr(err, "retry_after_s", 1.0) or 1.0))
                    continue
                raise

    async def _stream_group(self, job_id: str, live: Live, job: GroupJob) -> GroupResult:
        result = None
        async for msg in self.generate_stream(job):
            if isinstance(msg, StepProgress):
                live.steps = msg.steps
                for s in msg.seeds:
                    live.candidates[s].step = msg.step
                    await self.event(job_id, "progress", {"seed": s, "step": msg.step, "steps": msg.steps})
            elif isinstance(msg, PreviewImage):
                await self.event(job_id, "preview", {"seed": msg.seed, "step": msg.step, "media_type": msg.media_type,
                                                     "image": base64.b64encode(msg.image).decode()})  # fmt: skip
            elif isinstance(msg, GroupResult):
                result = msg
        if result is None:
            raise ServiceError("the generator's stream ended without a result")
        live.settings = result.settings
        live.warnings.extend(w for w in result.warnings if w not in live.warnings)
        for c in result.candidates:
            preview = c.preview if c.pruned_at_step is not None else None
            meta = {"seed": c.seed, "steps_computed": c.steps_computed, "pruned_at_step": c.pruned_at_step,
                    "replica": result.replica, "settings": result.settings, "warnings": result.warnings,
                    "score": preview.score if preview else None, "scores": preview.breakdown if preview else None}  # fmt: skip
            if c.png is not None:
                await asyncio.to_thread(self.store.save_candidate, job_id, c.seed, c.png, meta)
            live.candidates[c.seed] = CandidateProgress(seed=c.seed, step=c.steps_computed,
                                                        pruned=c.pruned_at_step is not None,
                                                        score=meta["score"])  # fmt: skip
            await self.event(job_id, "candidate", {"seed": c.seed, "pruned": c.pruned_at_step is not None,
                                                   "pruned_at_step": c.pruned_at_step,
                                                   "steps_computed": c.steps_computed,
                                                   "url": image_url(job_id, c.seed)})  # fmt: skip
        return result

    # 5. endings ---------------------------------------------------------------------------------------
    def _result(self, job_id: str, mode: str, out: Outcome, warnings: list[str], steps: int, timings: Timings) -> dict:
        """The generate response's body, with image URLs."""
        cands = [JobCandidate(seed=c.seed, score=c.score, scores=c.scores, url=image_url(job_id, c.seed),
                              pruned=c.pruned_at_step is not None, pruned_at_step=c.pruned_at_step,
                              steps_computed=c.steps_computed, replica=c.replica) for c in out.candidates]  # fmt: skip
        winner = JobWinner(seed=out.winner.seed, score=out.winner.score, url=image_url(job_id, out.winner.seed))
        res = JobResult(id=job_id, mode=mode, scored=out.scored, winner=winner, candidates=cands,
                        settings=dict(out.settings), warnings=warnings,
                        steps_computed=sum(c.steps_computed for c in out.candidates),
                        steps_full=steps * len(out.candidates), timings=timings, debug=debug_of(out))  # fmt: skip
        return res.model_dump(mode="json", by_alias=True)

    async def _fail(self, job_id: str, err: ServiceError) -> None:
        error = {"type": err.type if hasattr(err, "type") else "error", "message": err.message,
                 "field": getattr(err, "field", None)}  # fmt: skip
        self.store.set_status(job_id, "failed", error=error)
        await self.event(job_id, "failed", {"error": error})

    async def _finish_cancelled(self, job_id: str, seeds: list[int], live: Live) -> None:
        stored = self.store.candidates(job_id)  # the candidates that finished (their rows; the PNGs stay on disk)
        done = [{"seed": s, "url": image_url(job_id, s), "steps_computed": stored[s]["steps_computed"]}
                for s in seeds if s in stored]  # fmt: skip
        # the steps every candidate had done, finished or not, for the job's steps_done once it is no longer live
        progress = [c.model_dump() for c in live.candidates.values()]
        self.store.set_status(job_id, "cancelled", result={"candidates": done, "progress": progress,
                                                                   "steps": live.steps})  # fmt: skip
        await self.event(job_id, "cancelled", {"candidates": done})

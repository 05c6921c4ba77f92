"""Jobs deployment (one replica, named `Jobs`): owns the job store and runs every job's fan-out.

Routers stay stateless and forward here. The store (SQLite in WAL mode, result PNGs as files) outlives
the replica: a restarted replica, or a restarted service, resumes the jobs that were queued or running
(`JobRunner.start`). Generator calls are Serve streaming calls (`Generator.generate_stream`), so
progress and previews arrive while the engine runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from hidream_serve.api.errors import BadRequest, Conflict, NotFound
from hidream_serve.api.jobs_protocol import TERMINAL, CandidateProgress, JobError, JobView, job_urls
from hidream_serve.embedded import cache_dir
from hidream_serve.jobs.store import IdempotencyConflict, Job, JobStore

from . import sweeps
from .config import JobsConfig, JobStoreOptions, RouterConfig
from .job_runner import JobRunner
from .webhooks import WebhookSender
from .messages import AppInfo, GroupJob, ScoreJob

log = logging.getLogger("ray.serve.hidream.jobs")


@serve.deployment(name="Jobs", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Jobs:
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle | None, info: AppInfo,
                 store: JobStoreOptions, router_config: RouterConfig):  # fmt: skip
        root = cache_dir() / "jobs"
        self.store = JobStore(store.db_path or root / "jobs.sqlite3", store.results_dir or root / "results")
        self.generator, self.scorer, self.info = generator, scorer, info
        self.config = JobsConfig()
        self.runner = JobRunner(self.store, self._generate_stream, self._score if scorer is not None else None,
                                self.config, router_config, info.limits, info.defaults)  # fmt: skip
        self.runner.on_event = self._webhook
        self.webhooks: WebhookSender | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._started = False
        self._retention: asyncio.Task | None = None
        log.info("jobs store %s (%d active)", self.store.db_path, len(self.store.active()))

    def reconfigure(self, user_config: dict) -> None:
        self.config = JobsConfig.model_validate(user_config or {})
        self.runner.config = self.config
        secret = self.config.webhook_secret or os.environ.get("HIDREAM_WEBHOOK_SECRET")
        self.webhooks = None if not secret else WebhookSender(secret, self.config.webhook_attempts,
                                                              self.config.webhook_backoff_s)  # fmt: skip

    def _webhook(self, job_id: str, kind: str, data: dict) -> None:
        """Send this event to the job's webhook if it asked for it: the job's body for a final event, else
        {id, event, data}. Delivery runs beside the job and never delays it."""
        job = self.store.get(job_id)
        hook = (job.request.get("webhook") if job else None) or {}
        if not hook or kind not in hook.get("events", ()) or self.webhooks is None:
            return
        payload = self._view(job).model_dump(mode="json", by_alias=True) if kind in TERMINAL else {
            "id": job_id, "event": kind, "data": data}
        task = asyncio.ensure_future(self.webhooks.send(hook["url"], kind, payload))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _ensure_started(self) -> None:
        """Start the runner and retention on the replica's event loop (the first call gets here)."""
        if not self._started:
            self._started = True
            self.runner.start()
            self._retention = asyncio.ensure_future(self._retain())

    async def check_health(self) -> None:
        self._ensure_started()

    async def _retain(self) -> None:
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.enforce_retention, self.config.retention_ttl_s,
                                                  self.config.retention_quota_bytes)  # fmt: skip
                if deleted:
                    log.info("retention deleted %d job(s)", len(deleted))
            except Exception:  # noqa: BLE001 - retention must never stop the service
                log.exception("retention failed")
            await asyncio.sleep(self.config.retention_interval_s)

    # -- calls to the other deployments ----------------------------------------------------------------
    async def _generate_stream(self, job: GroupJob):
        stream = self.generator.options(stream=True).generate_stream.remote(job)
        try:
            async for msg in stream:
                yield msg
        except asyncio.CancelledError:
            stream.cancel()  # stops the engine at its next step
            raise

    async def _score(self, prompt, pngs, context):
        response = self.scorer.score.remote(ScoreJob(prompt, pngs, context))
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise

    # -- the API the router forwards to -----------------------------------------------------------------
    async def submit(self, request: dict, idempotency_key: str | None = None, key_body: dict | None = None) -> dict:
        """Store a validated request (its seeds resolved) as a queued job; the same key and body give the same job."""
        self._ensure_started()
        if request.get("webhook") and self.webhooks is None:
            raise BadRequest("this server has no webhook secret configured (jobs.webhook_secret or "
                             "$HIDREAM_WEBHOOK_SECRET), so it cannot sign webhooks", field="webhook")  # fmt: skip
        try:
            job, created = self.store.create(request, idempotency_key, key_body)
        except IdempotencyConflict as e:
            raise Conflict(str(e), field="Idempotency-Key") from None
        if created:
            await self.runner.event(job.id, "queued", {"position": self.store.queue_position(job.id)})
            self.runner.submitted()
        return self._view(job).model_dump(mode="json", by_alias=True)

    async def get(self, job_id: str) -> dict:
        self._ensure_started()
        return self._view(self._job(job_id)).model_dump(mode="json", by_alias=True)

    async def list(self, status: str | None, limit: int, cursor: int | None) -> dict:
        self._ensure_started()
        jobs, next_cursor = self.store.list(status=status, limit=limit, cursor=cursor)
        return {"data": [self._view(j).model_dump(mode="json", by_alias=True) for j in jobs],
                "next_cursor": None if next_cursor is None else str(next_cursor)}  # fmt: skip

    async def cancel(self, job_id: str) -> dict:
        self._ensure_started()
        self._job(job_id)
        await self.runner.cancel(job_id)
        return await self.get(job_id)

    async def wait(self, job_id: str, timeout_s: float) -> dict | None:
        """The job once it has ended, waiting up to `timeout_s`; None if it is still queued or running."""
        self._ensure_started()
        deadline = time.monotonic() + timeout_s
        after = 0
        while True:
            job = self._job(job_id)
            if job.status in TERMINAL:
                return self._view(job).model_dump(mode="json", by_alias=True)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            events = await self.runner.wait_for_events(job_id, after, min(left, self.config.events_wait_s))
            after = events[-1].id if events else after

    async def events(self, job_id: str, after: int = 0) -> list[dict]:
        """Events after `after` (an event id), waiting up to `events_wait_s` for the first new one."""
        self._ensure_started()
        self._job(job_id)
        events = await self.runner.wait_for_events(job_id, after, self.config.events_wait_s)
        return [{"id": e.id, "kind": e.kind, "data": e.data} for e in events]

    async def image(self, job_id: str, seed: int) -> bytes:
        self._ensure_started()
        self._job(job_id)
        path = self.store.image_path(job_id, seed)
        if not path.is_file():
            raise NotFound(f"job {job_id} has no image for seed {seed}", field="seed")
        return await asyncio.to_thread(Path(path).read_bytes)

    async def sweep_file(self, job_id: str, name: str) -> bytes:
        """A sweep's contact sheet or table (services/sweeps.py:FILES)."""
        self._ensure_started()
        return await asyncio.to_thread(sweeps.read_file, self.store, self._job(job_id), name)

    async def sweep_image(self, job_id: str, cell: int, seed: int) -> bytes:
        self._ensure_started()
        return await asyncio.to_thread(sweeps.read_image, self.store, self._job(job_id), cell, seed)

    # -- views ------------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="id")
        return job

    def _view(self, job: Job) -> JobView:
        live = self.runner.live.get(job.id)
        if job.request.get("kind") == "sweep":
            return sweeps.view(job, live, self.store, self.info.defaults)
        request = job.request
        seeds = request.get("seeds") or []
        if live is not None:
            candidates = [live.candidates.get(s, CandidateProgress(seed=s)) for s in seeds]
            steps, settings, warnings = live.steps, live.settings, list(live.warnings)
        else:
            stored = self.store.candidates(job.id)
            kept = {p["seed"]: CandidateProgress(**p) for p in (job.result or {}).get("progress", [])}  # cancelled
            candidates = [
                kept.get(s) or CandidateProgress(seed=s, step=stored[s]["steps_computed"] if s in stored else 0,
                                                 pruned=s in stored and stored[s]["pruned_at_step"] is not None)
                for s in seeds
            ]  # fmt: skip
            settings = (job.result or {}).get("settings")
            steps = int((settings or {}).get("steps") or (job.result or {}).get("steps") or request.get("steps") or 0)
            warnings = list((job.result or {}).get("warnings") or [])
        result = job.result if job.status == "succeeded" else None
        if result is not None:
            scores = {c["seed"]: c["score"] for c in result["candidates"]}
            for c in candidates:
                c.score = scores.get(c.seed)
        error = JobError(**job.error) if job.error else None
        return JobView(id=job.id, mode=request["mode"], status=job.status,
                       queue_position=self.store.queue_position(job.id), candidates=candidates,
                       steps_done=sum(c.step for c in candidates), steps_total=steps * len(seeds),
                       created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                       settings=settings, warnings=warnings, error=error, result=result, urls=job_urls(job.id))  # fmt: skip

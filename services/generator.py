"""Generator deployment: one HiDream pipeline per replica (one GPU in production), loaded once.

`generate(GroupJob)` denoises one group of seeds as a batch (the engine chunks it by `max_batch`) in a
worker thread, so the replica keeps answering health checks while it works, and returns a `GroupResult`:
PNGs (encoded in parallel) whose text chunks carry the prompt, seed, mode, layout boxes and effective
settings, so that a file reproduces its image.
A cancelled call (deadline, client gone, a sibling group failed) stops the engine at its next step, and
the call ends only once the engine is free, so Serve never hands a new group to a replica still busy.
Engine errors are converted to the service's picklable errors before they leave the replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from hidream_serve.api.errors import DeadlineExceeded, Unavailable, classify
from hidream_serve.api.images import encode_png
from hidream_serve.models import load_pipeline
from hidream_serve.scoring.context import ScoreContext

from .config import GeneratorConfig, pick_device, pick_dtype, replica_name
from . import metrics
from .fanout import cancel_with_caller
from .messages import CandidateResult, GroupJob, GroupResult, GroupTimings, ScoreJob, ScoreResult
from .progress import ProgressHook
from .pruning import GenerationCancelled, PruningHook

log = logging.getLogger("ray.serve.hidream.generator")  # under Serve's logger: replica logs


def cap_gpu_memory(torch, device: str, gib: float) -> None:
    """Limit the caching allocator of this process to `gib` on `device` (engine.gpu_memory_gib)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise ValueError(f"engine.gpu_memory_gib {gib} is more than the GPU has ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)
    log.info("GPU memory of this replica capped at %.1f GiB of %.1f", gib, total / 2**30)


@serve.deployment(name="Generator", max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto",
                 scorer: DeploymentHandle | None = None, engine: dict | None = None):  # fmt: skip
        import torch

        self.config = GeneratorConfig()
        self.device = pick_device(device)
        t0 = time.perf_counter()
        options = dict(max_batch=self.config.max_batch, **(engine or {}))
        warm_up_size = options.pop("warm_up_size", None)
        memory_gib = options.pop("gpu_memory_gib", None)
        if memory_gib and self.device.startswith("cuda"):
            cap_gpu_memory(torch, self.device, memory_gib)
        self.pipe, self.path = load_pipeline(model, self.device, pick_dtype(dtype, self.device), **options)
        self.replica = replica_name()
        self._lock = threading.Lock()  # one engine call at a time, whatever max_ongoing_requests says
        self._broken: str | None = None
        # a group's images on one pool, each image's row bands deflated on the other (hidream_serve/png.py)
        self._png_pool = concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), "png")
        self._band_pool = concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)), "png-band")
        self._torch = torch
        self.scorer = scorer  # scores previews when a request asks for early pruning
        log.info("%s loaded %s on %s in %.1fs (attention %s)", self.replica, self.path, self.device,
                 time.perf_counter() - t0, self.pipe.attention)  # fmt: skip
        if warm_up_size:
            secs = self.pipe.warm_up(warm_up_size, warm_up_size)
            log.info("%s warmed up at %dx%d in %.1fs", self.replica, warm_up_size, warm_up_size, secs)

    def reconfigure(self, user_config: dict) -> None:
        self.config = GeneratorConfig.model_validate(user_config or {})
        self.pipe.max_batch = self.config.max_batch
        if self.config.torch_threads:
            self._torch.set_num_threads(self.config.torch_threads)

    def check_health(self) -> None:
        if self._broken:
            raise RuntimeError(f"generator replica is unusable: {self._broken}")

    async def generate_stream(self, job: GroupJob):
        """Streaming `generate`: yields `StepProgress` and `PreviewImage` messages as the engine runs (as
        `job.progress` asks), then the `GroupResult`. Cancelling the stream stops the engine at its next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        work = asyncio.ensure_future(self.generate(job, emit=lambda m: loop.call_soon_threadsafe(queue.put_nowait, m)))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                    continue
                get.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield work.result()  # raises the call's error
                return
        finally:
            if not work.done():
                work.cancel()  # generate() stops the engine and waits for it
                await asyncio.wait({work})

    async def generate(self, job: GroupJob, emit=None) -> GroupResult:
        started_at, t0 = time.time(), time.perf_counter()
        cancel = threading.Event()
        hook = None
        if job.prune is not None and self.scorer is not None:
            context = ScoreContext.for_params(job.params)  # previews are judged like final images

            async def score_previews(pngs: list[bytes]) -> ScoreResult:
                return await cancel_with_caller(self.scorer.score.remote(ScoreJob(job.params.prompt, pngs, context)))

            hook = PruningHook(job.prune, score_previews, asyncio.get_running_loop(), job.score_timeout_s, cancel)
        progress = ProgressHook(job.progress, emit) if emit is not None and job.progress is not None else None
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, job, hook, cancel, progress))
        try:
            out = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be interrupted, only asked to stop: the step hook raises at the next step.
            # Wait until it has (and let go of the engine) before this call counts as finished.
            cancel.set()
            if hook is not None:
                hook.abort()
            work.add_done_callback(lambda w: w.cancelled() or w.exception())  # its error is of no interest now
            await asyncio.wait({work})
            raise
        except Exception as e:  # noqa: BLE001 - every error leaves as a picklable ServiceError
            raise self._convert(e) from None
        out.timings.busy_s = time.perf_counter() - t0
        out.timings.started_at, out.timings.finished_at = started_at, time.time()
        metrics.generated(job.params.mode, out, self.device, self._torch)
        return out

    def _generate(self, job: GroupJob, hook: PruningHook | None, cancel: threading.Event,
                  progress: ProgressHook | None = None) -> GroupResult:  # fmt: skip
        params, seeds = job.params, list(job.seeds)

        timed_out = threading.Event()

        def on_step(state):  # every step: stop if cancelled or past the compute deadline, report, then prune
            if cancel.is_set():
                raise GenerationCancelled()
            if timed_out.is_set():
                raise DeadlineExceeded(f"the seed group took more than {job.compute_timeout_s:g}s of compute "
                                       "(router generate_timeout_s)")  # fmt: skip
            if progress is not None:
                progress(state)
            return None if hook is None else hook(state)

        warnings: list[str] = []
        with self._lock:
            if cancel.is_set():  # cancelled while waiting for the engine
                raise GenerationCancelled()
            deadline = None
            if job.compute_timeout_s is not None:  # counted from here: time queued does not count
                deadline = threading.Timer(job.compute_timeout_s, timed_out.set)
                deadline.daemon = True
                deadline.start()
            if hook is not None:
                warnings += self._unpruned_warning(seeds)
            t0 = time.perf_counter()
            try:
                result = self.pipe(params, seeds, on_step=on_step)
            finally:
                if deadline is not None:
                    deadline.cancel()
            engine_s = time.perf_counter() - t0
        settings = dict(result.settings)
        text = {"prompt": params.prompt, "mode": params.mode, "settings": settings,
                "ref_roles": list(params.ref_roles) or None, "layout_boxes": params.layout_boxes}  # fmt: skip
        t1 = time.perf_counter()
        pngs = self._encode_all([c.image if c.image is not None else c.preview for c in result.candidates],
                                [{**text, "seed": str(c.seed)} for c in result.candidates])  # fmt: skip
        png_s = time.perf_counter() - t1
        previews = hook.previews if hook is not None else {}
        candidates = [
            CandidateResult(seed=c.seed, png=png, steps_computed=c.steps_computed, pruned_at_step=c.pruned_at_step,
                            preview=previews.get(c.seed) if c.pruned_at_step is not None else None)  # fmt: skip
            for c, png in zip(result.candidates, pngs)
        ]
        warnings = list(result.warnings) + warnings + (hook.warnings if hook is not None else [])
        return GroupResult(replica=self.replica, candidates=candidates, settings=settings, warnings=warnings,
                           timings=GroupTimings(engine_s=engine_s, png_s=png_s,
                                                preview_score_s=hook.seconds if hook is not None else 0.0))  # fmt: skip

    def _encode_all(self, images: list, texts: list[dict]) -> list[bytes | None]:
        """PNG-encode a group's images in parallel, and each one's row bands too (zlib releases the GIL): a
        2048x2048 PNG takes ~1 s on one core."""
        level = self.config.png_compress_level

        def one(img, text):
            return None if img is None else encode_png(img, text, level, self._band_pool)

        if len(images) < 2:
            return [one(img, t) for img, t in zip(images, texts)]
        return list(self._png_pool.map(one, images, texts))

    def _unpruned_warning(self, seeds: list[int]) -> list[str]:
        """The engine denoises `max_batch` candidates at a time and pruning ranks within one such batch, so a
        candidate alone in its batch is never pruned: say so rather than prune silently less (or not at all)."""
        if len(seeds) < 2:
            return []  # one candidate: nothing to rank, nothing to say
        size = self.pipe.max_batch
        alone = [seeds[i] for i in range(0, len(seeds), size) if len(seeds[i : i + size]) == 1]
        if not alone:
            return []
        return [f"pruning skipped for seeds {alone}: the generator denoises at most {size} candidate(s) at a time "
                "(generator max_batch) and pruning ranks the candidates of one batch"]  # fmt: skip

    def _convert(self, e: Exception):
        torch = self._torch
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            log.warning("%s: out of memory on a batch of %s", self.replica, self.pipe.max_batch)
            return Unavailable("the generator ran out of GPU memory; retry, or ask for fewer candidates")
        if "CUDA error" in str(e) or "device-side assert" in str(e):
            self._broken = f"{type(e).__name__}: {e}"  # the context is poisoned; let Serve replace the replica
        err = classify(e)
        if err.status >= 500:
            log.exception("%s: generation failed", self.replica, exc_info=e)
        return err

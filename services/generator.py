"""Generator deployment: one HiDream pipeline per replica (one GPU in production), loaded once.

`generate(params, seeds, meta)` denoises one group of seeds as a batch (the engine chunks it by
`max_batch`) in a worker thread, so the replica keeps answering health checks while it works, and
returns PNGs whose text chunks carry the prompt, seed, mode and effective settings.
A cancelled call (deadline, client gone, a sibling group failed) stops the engine at its next step, and
the call ends only once the engine is free, so Serve never hands a new group to a replica still busy.
Engine errors are converted to the service's picklable errors before they leave the replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from hidream_serve.api.errors import Unavailable, classify
from hidream_serve.api.images import encode_png
from hidream_serve.embedded import model_dir
from hidream_serve.engine.params import GenerationParams
from hidream_serve.scoring.pruning import stage_steps, survivors

from .config import GeneratorConfig, pick_device, pick_dtype, replica_name
from .fanout import cancel_with_caller, score_context

log = logging.getLogger("ray.serve.hidream.generator")  # under Serve's logger: replica logs


class GenerationCancelled(Exception):
    """Raised from the engine's step hook when the call was cancelled: ends the engine call early."""


@serve.deployment(name="Generator", max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto",
                 scorer: DeploymentHandle | None = None, engine: dict | None = None):  # fmt: skip
        import torch

        from hidream_serve.engine.pipeline import HiDreamPipeline
        from hidream_serve.random_model import RANDOM_FULL_SPEC, random_full_pipeline

        self.config = GeneratorConfig()
        self.device = pick_device(device)
        t0 = time.perf_counter()
        options = dict(max_batch=self.config.max_batch, **(engine or {}))
        warm_up_size = options.pop("warm_up_size", None)
        if model == RANDOM_FULL_SPEC:  # benchmarks: the full-size architecture with random weights, no download
            self.path = model
            self.pipe = random_full_pipeline(self.device, pick_dtype(dtype, self.device), **options)
        else:
            self.path = model_dir(model)
            self.pipe = HiDreamPipeline.from_pretrained(self.path, device=self.device,
                                                        dtype=pick_dtype(dtype, self.device), **options)  # fmt: skip
        self.replica = replica_name()
        self._lock = threading.Lock()  # one engine call at a time, whatever max_ongoing_requests says
        self._broken: str | None = None
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

    async def generate(self, params: GenerationParams, seeds: list[int], meta: dict | None = None) -> dict:
        t0 = time.perf_counter()
        meta = dict(meta or {})
        meta["loop"] = asyncio.get_running_loop()
        cancel = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, params, list(seeds), meta, cancel))
        try:
            out = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be interrupted, only asked to stop: the step hook raises at the next step.
            # Wait until it has (and let go of the engine) before this call counts as finished.
            cancel.set()
            work.add_done_callback(lambda w: w.cancelled() or w.exception())  # its error is of no interest now
            await asyncio.wait({work})
            raise
        except Exception as e:  # noqa: BLE001 - every error leaves as a picklable ServiceError
            raise self._convert(e) from None
        out["busy_s"] = time.perf_counter() - t0
        return out

    def _generate(self, params: GenerationParams, seeds: list[int], meta: dict, cancel: threading.Event) -> dict:
        warnings: list[str] = []
        preview_scores: dict[int, float] = {}
        prune = self._pruning_hook(params, meta, preview_scores, warnings, cancel) if meta.get("prune") else None

        def on_step(state):  # every step: stop if cancelled, then prune if asked
            if cancel.is_set():
                raise GenerationCancelled()
            return None if prune is None else prune(state)

        with self._lock:
            if cancel.is_set():  # cancelled while waiting for the engine
                raise GenerationCancelled()
            if prune is not None:
                warnings += self._unpruned_warning(seeds)
            result = self.pipe(params, seeds, on_step=on_step)
        settings = dict(result.settings)
        text = {"prompt": params.prompt, "mode": params.mode, "settings": settings,
                "ref_roles": list(params.ref_roles) or None}  # fmt: skip
        candidates = []
        for c in result.candidates:
            img = c.image if c.image is not None else c.preview
            png = None if img is None else encode_png(img, {**text, "seed": str(c.seed)}, self.config.png_compress_level)
            preview, preview_breakdown = preview_scores.get(c.seed, (None, None))
            candidates.append({"seed": c.seed, "png": png, "pruned_at_step": c.pruned_at_step,
                               "steps_computed": c.steps_computed, "preview_score": preview,
                               "preview_scores": preview_breakdown})  # fmt: skip
        return {"replica": self.replica, "candidates": candidates, "settings": settings,
                "warnings": list(result.warnings) + warnings}  # fmt: skip

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

    def _pruning_hook(self, params: GenerationParams, meta: dict, preview_scores: dict, warnings: list,
                      cancel: threading.Event):  # fmt: skip
        """Engine step hook: at each stage's step, score the previews (scorer deployment) and keep the best."""
        loop, stages, timeout = meta["loop"], meta["prune"], float(meta.get("score_timeout_s", 120))
        context = score_context(params)  # previews are judged like final images: same mode, refs and roles
        schedule: dict[int, float] | None = None

        def hook(state):
            nonlocal schedule
            if schedule is None:
                schedule = stage_steps(stages, state.num_steps)
            keep = schedule.get(state.step)
            if keep is None or len(state.seeds) < 2:
                return None
            pngs = [encode_png(state.preview(i), compress_level=1) for i in range(len(state.seeds))]
            fut = asyncio.run_coroutine_threadsafe(self._score(params.prompt, pngs, context), loop)
            deadline = time.monotonic() + timeout
            while not concurrent.futures.wait([fut], timeout=min(0.05, max(0.0, deadline - time.monotonic())))[0]:
                if cancel.is_set():  # cancelled while the previews are scored: stop waiting
                    fut.cancel()
                    raise GenerationCancelled()
                if time.monotonic() >= deadline:
                    break
            try:
                if not fut.done():
                    fut.cancel()
                    raise TimeoutError(f"no preview scores after {timeout:g}s")
                res = fut.result()
                scores = [float(s) for s in res["composite"]]
                if len(scores) != len(pngs):
                    raise ValueError(f"scorer returned {len(scores)} scores for {len(pngs)} previews")
            except Exception as e:  # noqa: BLE001 - a failed preview score means no pruning, not a failed request
                log.warning("%s: preview scoring failed: %r", self.replica, e)
                warnings.append(f"pruning skipped at step {state.step + 1}: preview scoring failed")
                return None
            for w in res.get("warnings") or []:
                if w not in warnings:
                    warnings.append(w)
            breakdown = res.get("scores") or [None] * len(scores)
            kept = survivors(scores, state.seeds, keep)
            for i, seed in enumerate(state.seeds):
                preview_scores[seed] = (scores[i], breakdown[i])
            return kept

        return hook

    async def _score(self, prompt: str, pngs: list[bytes], context: dict) -> dict:
        return await cancel_with_caller(self.scorer.score.remote(prompt, pngs, context))

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

"""Scorer deployment: judges a whole candidate set (one prompt, N images, the request's refs) in batched forwards.

The composite of `hidream_serve.scoring.composite`: PickScore (human preference), CLIP (prompt
alignment), reference fidelity (DINOv2, else CLIP image embeddings) for edit/ip/skeleton/layout, and
the weight-free quality guard, z-scored within the set and weighted per mode (`user_config.weights`).
Each model loads from a local directory (or an embedded tiny one); one that is not configured or fails
to load is reported with every score and the others decide. Runs on CPU or a fraction of a GPU, as the
YAML places it (`scorer_device`, `ray_actor_options.num_gpus`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time

from ray import serve

from hidream_serve.api.errors import classify
from hidream_serve.api.images import decode_png
from hidream_serve.embedded import optional_model_dir
from hidream_serve.scoring.random_full import is_random_full

from . import metrics
from .config import ScorerConfig, pick_device, pick_dtype, replica_name
from .messages import ScoreJob, ScoreResult

log = logging.getLogger("ray.serve.hidream.scorer")  # under Serve's logger: replica logs


@serve.deployment(name="Scorer", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Scorer:
    def __init__(self, models: dict, device: str = "auto", dtype: str = "auto"):
        """`models`: {"pickscore", "clip", "dino": spec or None, "pickscore_processor": dir or None}."""
        import torch

        from hidream_serve.scoring.composite import MODEL_SCORERS, CompositeScorer

        self.config = ScorerConfig()
        self.device = pick_device(device)
        dt = None if dtype == "auto" else pick_dtype(dtype, self.device)
        dirs, missing = {}, {}
        for name in MODEL_SCORERS:
            spec = models.get(name)
            try:
                dirs[name] = spec if is_random_full(spec) else optional_model_dir(spec)
            except Exception as e:  # noqa: BLE001 - reported with every score; the other scorers still run
                log.error("scorer %s: %s", name, e)
                dirs[name], missing[name] = None, f"{type(e).__name__}: {e}"
        try:  # resolved as calibrate-pruning does; a missing one leaves PickScore unavailable, reported as such
            processor = optional_model_dir(models.get("pickscore_processor"))
        except Exception as e:  # noqa: BLE001
            processor = None
            if dirs["pickscore"] is not None:
                log.error("scorer pickscore: pickscore_processor: %s", e)
                dirs["pickscore"], missing["pickscore"] = None, f"pickscore_processor: {type(e).__name__}: {e}"
        t0 = time.perf_counter()
        self.scorer = CompositeScorer.load(**dirs, pickscore_processor=processor, device=self.device, dtype=dt,
                                           batch_size=self.config.batch_size)  # fmt: skip
        self.scorer.unavailable.update(missing)
        self.replica = replica_name()
        self._lock = threading.Lock()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), "png-decode")
        self._torch = torch
        log.info("%s loaded scorers %s on %s in %.1fs", self.replica, self.scorer.describe(), self.device,
                 time.perf_counter() - t0)  # fmt: skip

    def reconfigure(self, user_config: dict) -> None:
        self.config = ScorerConfig.model_validate(user_config or {})
        with self._lock:
            self.scorer.set_batch_size(self.config.batch_size)
            self.scorer.weights = self.config.weights
            self.scorer.role_weights = self.config.role_weights
            self.scorer.ref_cache_size = self.config.ref_cache_size
        if self.config.torch_threads:
            self._torch.set_num_threads(self.config.torch_threads)

    def check_health(self) -> None:
        return None

    async def score(self, job: ScoreJob) -> ScoreResult:
        try:
            return await asyncio.to_thread(self._score, job)
        except Exception as e:
            log.exception("%s: scoring failed", self.replica)
            raise classify(e) from None

    def _score(self, job: ScoreJob) -> ScoreResult:
        t0 = time.perf_counter()
        pil = list(self._decode_pool.map(decode_png, job.images))  # zlib releases the GIL: ~0.2 s each at 2048x2048
        with self._lock:
            out = self.scorer.score(job.prompt, pil, job.context)
        metrics.scored(job.context.mode, time.perf_counter() - t0)
        return ScoreResult(composite=out["composite"], scores=out["scores"], warnings=out["warnings"],
                           replica=self.replica, seconds=time.perf_counter() - t0)  # fmt: skip

"""Scorer deployment: scores a whole candidate set (one prompt, N images) in batched forwards.

CLIP prompt-image alignment from a local directory (CPU or a fraction of a GPU, as configured).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from hidream_serve.api.errors import classify
from hidream_serve.api.images import decode_png
from hidream_serve.embedded import model_dir

from .config import ScorerConfig, pick_device, pick_dtype, replica_name

log = logging.getLogger("hidream_serve.scorer")


@serve.deployment(name="Scorer", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Scorer:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto"):
        import torch

        from hidream_serve.scoring.clip import ClipScorer

        self.config = ScorerConfig()
        self.device = pick_device(device)
        dt = None if dtype == "auto" else pick_dtype(dtype, self.device)
        self.path = model_dir(model)
        self.clip = ClipScorer.from_pretrained(self.path, device=self.device, dtype=dt,
                                               batch_size=self.config.batch_size)  # fmt: skip
        self.replica = replica_name()
        self._lock = threading.Lock()
        self._torch = torch

    def reconfigure(self, user_config: dict) -> None:
        self.config = ScorerConfig.model_validate(user_config or {})
        self.clip.batch_size = self.config.batch_size
        if self.config.torch_threads:
            self._torch.set_num_threads(self.config.torch_threads)

    def check_health(self) -> None:
        return None

    async def info(self) -> dict:
        return {"replica": self.replica, "scorers": [self.clip.name], "checkpoint": str(self.path)}

    async def score(self, prompt: str, images: list[bytes]) -> dict:
        try:
            return await asyncio.to_thread(self._score, prompt, images)
        except Exception as e:
            log.exception("%s: scoring failed", self.replica)
            raise classify(e) from None

    def _score(self, prompt: str, images: list[bytes]) -> dict:
        t0 = time.perf_counter()
        pil = [decode_png(b) for b in images]
        with self._lock:
            clip = self.clip.score(prompt, pil)
        return {"scores": [{"clip": s} for s in clip], "composite": clip, "replica": self.replica,
                "seconds": time.perf_counter() - t0}  # fmt: skip

"""A request's `PrunePlan` as the engine's step hook, on a generator replica.

At each stage's step the hook encodes the active candidates' previews, has them scored (an awaited Serve
call to the scorer, run on the replica's event loop while the engine thread waits for it), and tells the
engine which candidates to keep. A failed or late preview score means no pruning at that stage, never a
failed request. A cancelled call cancels the pending score, which wakes the engine thread at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from hidream_serve.api.images import encode_png
from hidream_serve.scoring.composite import scoring_view
from hidream_serve.scoring.pruning import PrunePlan, survivors

from .messages import PreviewScore, ScoreResult

log = logging.getLogger("ray.serve.hidream.generator")

ScorePreviews = Callable[[list[bytes]], Awaitable[ScoreResult]]


class GenerationCancelled(Exception):
    """Raised from the engine's step hook when the call was cancelled: ends the engine call early."""


class PruningHook:
    """`hook(state)` for `HiDreamPipeline(on_step=...)`; `previews` holds each pruned seed's preview score."""

    def __init__(self, plan: PrunePlan, score: ScorePreviews, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 cancel: threading.Event):  # fmt: skip
        self.plan, self.score, self.loop, self.timeout_s, self.cancel = plan, score, loop, timeout_s, cancel
        self.previews: dict[int, PreviewScore] = {}
        self.warnings: list[str] = []
        self.pending: concurrent.futures.Future | None = None  # the score call in flight, for `abort`
        self.seconds = 0.0  # encoding previews and waiting for their scores, over every stage
        self._schedule: dict[int, float] | None = None

    def abort(self) -> None:
        """From the event loop, when the call is cancelled: stop waiting for preview scores."""
        if self.pending is not None:
            self.pending.cancel()

    def __call__(self, state):
        if self._schedule is None:
            self._schedule = self.plan.schedule(state.num_steps)
        keep = self._schedule.get(state.step)
        if keep is None or len(state.seeds) < 2:
            return None
        t0 = time.perf_counter()
        try:
            return self._prune(state, keep)
        finally:
            self.seconds += time.perf_counter() - t0

    def _prune(self, state, keep: float):
        # at the size the scorer reduces them to anyway (a 2048x2048 preview: 12 MB to encode and send, 0.8 MB)
        pngs = [encode_png(scoring_view(state.preview(i)), compress_level=1) for i in range(len(state.seeds))]
        self.pending = asyncio.run_coroutine_threadsafe(self.score(pngs), self.loop)
        if self.cancel.is_set():  # cancelled before `pending` was set, so `abort` had nothing to cancel
            self.pending.cancel()
        try:
            res = self.pending.result(timeout=self.timeout_s)
            if len(res.composite) != len(pngs):
                raise ValueError(f"scorer returned {len(res.composite)} scores for {len(pngs)} previews")
            scores = [float(s) for s in res.composite]
        except concurrent.futures.CancelledError:
            raise GenerationCancelled() from None
        except Exception as e:  # noqa: BLE001 - a failed preview score means no pruning, not a failed request
            if self.cancel.is_set():
                raise GenerationCancelled() from None
            self.pending.cancel()
            reason = f"no preview scores after {self.timeout_s:g}s" if isinstance(e, TimeoutError) else repr(e)
            log.warning("preview scoring failed: %s", reason)
            self.warnings.append(f"pruning skipped at step {state.step + 1}: preview scoring failed")
            return None
        finally:
            self.pending = None
        self.warnings.extend(w for w in res.warnings if w not in self.warnings)
        for i, seed in enumerate(state.seeds):
            self.previews[seed] = PreviewScore(scores[i], res.scores[i])
        return survivors(scores, state.seeds, keep)

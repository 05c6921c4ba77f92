"""A streaming generator call's step hook: progress after every step, small x0 previews at set fractions.

The engine thread calls the hook; `emit` hands each message to the replica's event loop without waiting,
so reporting never stalls the step loop (a preview costs one device-to-host copy and a JPEG encode of a
downscaled image, at three steps of fifty by default).
"""

from __future__ import annotations

import io
from collections.abc import Callable

from .messages import PreviewImage, ProgressPlan, StepProgress

MEDIA_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp"}


def preview_steps(plan: ProgressPlan, num_steps: int) -> set[int]:
    """0-based step indices (after which a preview is taken) for the plan's fractions."""
    return {min(num_steps - 1, max(0, round(f * num_steps) - 1)) for f in plan.preview_at}


def encode_preview(image, size: int, fmt: str) -> bytes:
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), quality=80)
    return buf.getvalue()


class ProgressHook:
    def __init__(self, plan: ProgressPlan, emit: Callable[[object], None]):
        self.plan, self.emit = plan, emit
        self._at: set[int] | None = None

    def __call__(self, state) -> None:
        if self._at is None:
            self._at = preview_steps(self.plan, state.num_steps)
        self.emit(StepProgress(list(state.seeds), state.step + 1, state.num_steps))
        if state.step in self._at:
            media = MEDIA_TYPES[self.plan.preview_format]
            for i, seed in enumerate(state.seeds):
                img = encode_preview(state.preview(i), self.plan.preview_size, self.plan.preview_format)
                self.emit(PreviewImage(seed, state.step + 1, img, media))

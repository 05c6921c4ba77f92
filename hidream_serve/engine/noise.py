"""Per-candidate step noise for stochastic samplers, drawn one step ahead on a worker thread.

The noise must come from each candidate's CPU generator (so a seed gives the same image on any
device and in any batch), but drawing ~12M normals on the CPU every step would stall the GPU.
A worker draws (and clips) the next step's noise while the GPU runs the current step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hidream-noise")


def draw_noise(gen: torch.Generator, shape: tuple[int, ...], clip_std: float) -> torch.Tensor:
    """(1, *shape) standard normal noise from `gen`; with clip_std > 0, clipped to +-clip_std * its own std."""
    noise = torch.randn((1, *shape), generator=gen, device=gen.device, dtype=torch.float32)
    if clip_std > 0:
        limit = clip_std * noise.std().item()
        noise = noise.clamp(min=-limit, max=limit)
    return noise


class PrefetchedNoise:
    """Stands in for a candidate's generator: `take()` returns what `draw_noise` would, in the same order."""

    def __init__(self, gen: torch.Generator, shape: tuple[int, ...], clip_std: float, pin: bool = False):
        self.gen, self.shape, self.clip_std, self.pin = gen, tuple(shape), clip_std, pin
        self._next: Future = _POOL.submit(self._draw)

    def _draw(self) -> torch.Tensor:
        noise = draw_noise(self.gen, self.shape, self.clip_std)
        return noise.pin_memory() if self.pin else noise

    def take(self, shape: tuple[int, ...], clip_std: float) -> torch.Tensor:
        if tuple(shape) != self.shape or clip_std != self.clip_std:
            raise ValueError(f"prefetched noise is {self.shape} clip {self.clip_std}, asked {tuple(shape)} clip {clip_std}")
        noise = self._next.result()
        self._next = _POOL.submit(self._draw)
        return noise

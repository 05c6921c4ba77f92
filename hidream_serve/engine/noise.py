"""Per-candidate step noise for stochastic samplers, drawn one step ahead on a worker thread.

The noise must come from each candidate's CPU generator (so a seed gives the same image on any
device and in any batch), but drawing ~12M normals on the CPU every step would stall the GPU.
A worker draws (and clips) the next step's noise while the GPU runs the current step. For a CUDA
target the noise lands in one of two pinned buffers, so the copy to the GPU is asynchronous; a
buffer is refilled only after the GPU's copy out of it has finished.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .images import patchify

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hidream-noise")


def draw_noise(gen: torch.Generator, shape: tuple[int, ...], clip_std: float, out: torch.Tensor | None = None):
    """(1, *shape) standard normal noise from `gen`; with clip_std > 0, clipped to +-clip_std * its own std."""
    if out is None:
        noise = torch.randn((1, *shape), generator=gen, device=gen.device, dtype=torch.float32)
    else:
        noise = torch.randn(out.shape, generator=gen, out=out)
    if clip_std > 0:
        limit = clip_std * noise.std().item()
        noise.clamp_(min=-limit, max=limit)
    return noise


def _initial_noise_one(seed: int, height: int, width: int, scale: float) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    return patchify(scale * torch.randn((1, 3, height, width), generator=gen))


def initial_noise(seeds: list[int], height: int, width: int, scale: float) -> torch.Tensor:
    """(len(seeds), L, 3072) patchified starting noise, candidate i from a CPU generator seeded with
    seeds[i] + 1 (the same on every device); candidates are drawn in parallel (torch releases the GIL)."""
    return torch.cat(list(_POOL.map(lambda sd: _initial_noise_one(sd, height, width, scale), seeds)))


class PrefetchedNoise:
    """Stands in for a candidate's generator: `take()` returns what `draw_noise` would, in the same order,
    for at most `draws` takes (no draw is prepared beyond the last)."""

    def __init__(self, gen: torch.Generator, shape: tuple[int, ...], clip_std: float, device: torch.device, draws: int):
        self.gen, self.shape, self.clip_std, self.device = gen, tuple(shape), clip_std, torch.device(device)
        self._left = draws  # takes still to come
        self.pinned = self.device.type == "cuda"
        self._bufs = [torch.empty((1, *self.shape), pin_memory=True) for _ in range(2)] if self.pinned else []
        self._copied: list = [None, None]  # CUDA event per buffer: the GPU finished copying out of it
        self._slot = 0
        self._next: Future | None = _POOL.submit(self._draw, 0) if draws > 0 else None

    def _draw(self, slot: int) -> torch.Tensor:
        if not self.pinned:
            return draw_noise(self.gen, self.shape, self.clip_std)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        return draw_noise(self.gen, self.shape, self.clip_std, out=self._bufs[slot])

    def take(self, shape: tuple[int, ...], clip_std: float) -> torch.Tensor:
        """This step's noise on the target device."""
        if tuple(shape) != self.shape or clip_std != self.clip_std:
            raise ValueError(f"prefetched noise is {self.shape} clip {self.clip_std}, asked {tuple(shape)} clip {clip_std}")
        if self._next is None:
            raise RuntimeError("all prefetched draws were taken")
        host = self._next.result()
        slot = self._slot
        if self.pinned:
            noise = host.to(self.device, non_blocking=True)  # runs on the target device's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # that stream, whatever the current device is
            self._copied[slot] = event
        else:
            noise = host.to(self.device)
        self._slot = 1 - slot
        self._left -= 1
        self._next = _POOL.submit(self._draw, self._slot) if self._left > 0 else None
        return noise

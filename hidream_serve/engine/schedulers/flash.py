"""Stochastic flow-matching Euler sampler (the reference's `flash` scheduler).

Each step predicts x0 and re-noises it to the next noise level with fresh Gaussian noise:
x_next = sigma_next * noise * noise_scale + (1 - sigma_next) * x0.
"""

from __future__ import annotations


import torch

from ..noise import draw_noise
from .base import Scheduler
from .flow_match import euler_default_schedule


class FlashFlowMatchScheduler(Scheduler):
    """Flash sampler; needs one `torch.Generator` per candidate for its per-step noise."""

    name = "flash"

    def _default_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return euler_default_schedule(num_steps, self.shift)

    def _step(self, index, model_output, sample, *, generators, noise_scale, noise_clip_std) -> torch.Tensor:
        if index >= self.num_steps:
            # Reference quirk: with a custom list longer than num_steps, the extra steps leave
            # the sample unchanged (and draw no noise).
            return sample
        gens = _per_candidate(generators, sample.shape[0])
        sigma = self.sigmas[index]
        sigma_next = self.sigmas[index + 1]
        denoised = sample - model_output * sigma
        noise = torch.cat([_candidate_noise(g, sample.shape[1:], noise_clip_std).to(sample.device) for g in gens])
        return sigma_next * noise * noise_scale + (1.0 - sigma_next) * denoised


def _per_candidate(generators, batch: int) -> list:
    """One noise source per candidate: a torch.Generator, or an object with `take(shape, clip_std)`
    (hidream_serve.engine.noise.PrefetchedNoise)."""
    if isinstance(generators, torch.Generator):
        generators = [generators]
    if generators is None or len(generators) != batch:
        got = "None" if generators is None else f"{len(generators)} generator(s)"
        raise ValueError(f"flash scheduler needs one torch.Generator per candidate ({batch}), got {got}")
    return list(generators)


def _candidate_noise(source, shape: torch.Size, clip_std: float) -> torch.Tensor:
    """Noise of shape (1, L, D) for one candidate, clipped per candidate (its own std), as for a lone run."""
    if isinstance(source, torch.Generator):
        return draw_noise(source, tuple(shape), clip_std)
    return source.take(tuple(shape), clip_std)

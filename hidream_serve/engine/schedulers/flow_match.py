"""Deterministic flow-matching Euler sampler (the reference's `flow_match` scheduler)."""

from __future__ import annotations

import numpy as np
import torch

from .base import NUM_TRAIN_TIMESTEPS, Scheduler, shift_sigmas


def euler_default_schedule(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 timesteps and sigmas of the Euler samplers when no custom list is given.

    The shift is applied twice: once (in float32) to the training grid whose ends bound the
    schedule, then again (in float64) to the evenly spaced inference sigmas between those ends.
    """
    grid_ends = torch.tensor([float(NUM_TRAIN_TIMESTEPS), 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    sigma_max, sigma_min = shift_sigmas(grid_ends, shift).tolist()
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = torch.from_numpy(shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift)).to(torch.float32)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return timesteps, torch.cat([sigmas, torch.zeros(1)])


class FlowMatchEulerScheduler(Scheduler):
    """x_next = x + (sigma_next - sigma) * v, one Euler step per timestep."""

    name = "flow_match"

    def _default_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return euler_default_schedule(num_steps, self.shift)

    def _step(self, index, model_output, sample, **_unused) -> torch.Tensor:
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return sample + dt * model_output

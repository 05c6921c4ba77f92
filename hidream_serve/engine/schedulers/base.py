"""Common surface of the denoising schedulers (one instance per denoising run)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """Resolution-independent timestep shift; works on float32 tensors and float64 arrays alike.

    The expression shape is kept fixed because the reference evaluates it in exactly this order.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class Scheduler(ABC):
    """A flow-matching sampler stepping a batch of B independent candidates over shared timesteps.

    After `set_timesteps`, `timesteps` has the dtype and values the reference pipeline iterates
    over (the loop derives the network's t and the velocity sigma from them) and `sigmas` holds
    one float32 noise level per timestep plus a trailing 0.
    """

    name: str = ""

    def __init__(self, shift: float) -> None:
        self.shift = float(shift)
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_steps: int = 0
        self._step_index = 0

    def set_timesteps(
        self,
        num_steps: int,
        timesteps: list[int] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        """Build the schedule and reset the run state.

        `timesteps`, when given, replaces the computed schedule (sigma_i = t_i / 1000, then 0), as the
        reference pipeline does after its own `set_timesteps(num_steps)`; `num_steps` is still
        recorded because the flash sampler consults it. `device` mirrors where the reference keeps
        the schedule: timesteps always there, sigmas only for a custom list (default schedules keep
        sigmas on CPU).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if timesteps is None:
            ts, sigmas = self._default_schedule(num_steps)
            ts = ts.to(device) if device is not None else ts
        else:
            ts, sigmas = _custom_schedule(timesteps)
            if device is not None:
                ts, sigmas = ts.to(device), sigmas.to(device)
        first = ts[0]
        if int((ts == first).sum()) > 1:
            # The reference locates its start index by value and would begin at the second copy.
            raise ValueError(f"the first timestep {first.item()} appears more than once in the schedule")
        self.timesteps, self.sigmas, self.num_steps = ts, sigmas, num_steps
        self._step_index = 0
        self._reset_state()

    @property
    def step_index(self) -> int:
        """Number of `step` calls made since `set_timesteps`."""
        return self._step_index

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        generators: Sequence[torch.Generator] | torch.Generator | None = None,
        noise_scale: float = 1.0,
        noise_clip_std: float = 0.0,
    ) -> torch.Tensor:
        """Advance every candidate of `sample` (B, L, D) by one timestep and return the new sample.

        `generators`, `noise_scale` and `noise_clip_std` are only used by stochastic samplers.
        """
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps before step")
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(
                f"{type(self).__name__}.step called after all {len(self.timesteps)} steps were taken;"
                " call set_timesteps to start a new run"
            )
        if model_output.shape != sample.shape or sample.dim() != 3:
            raise ValueError(
                f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)}"
                " must both have shape (B, L, D)"
            )
        if model_output.dtype != torch.float32 or sample.dtype != torch.float32:
            raise ValueError("model_output and sample must be float32")
        out = self._step(
            self._step_index,
            model_output,
            sample,
            generators=generators,
            noise_scale=noise_scale,
            noise_clip_std=noise_clip_std,
        )
        self._step_index += 1
        return out

    def select(self, rows: Sequence[int]) -> None:
        """Keep only the per-candidate state of batch `rows` (call after pruning the sample batch).

        Stochastic samplers take their generators per call, so the caller selects those itself.
        """
        rows = [int(r) for r in rows]
        if not rows:
            raise ValueError("select needs at least one row")
        self._select_state(rows)

    def _select_state(self, rows: list[int]) -> None:
        """Subset per-candidate run state; stateless samplers have none."""

    @abstractmethod
    def _default_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas incl. the trailing 0) for `num_steps` without a custom list."""

    @abstractmethod
    def _step(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        *,
        generators: Sequence[torch.Generator] | torch.Generator | None,
        noise_scale: float,
        noise_clip_std: float,
    ) -> torch.Tensor:
        """Compute the sample after timestep `index`."""

    def _reset_state(self) -> None:
        """Clear per-run state (multistep history and the like)."""


def _custom_schedule(timesteps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    values = list(timesteps)
    if not values:
        raise ValueError("timesteps must not be empty")
    for t in values:
        if isinstance(t, bool) or int(t) != t or not 0 <= int(t) <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"timesteps must be integers in [0, {NUM_TRAIN_TIMESTEPS}], got {t!r}")
    ts = torch.tensor([int(t) for t in values], dtype=torch.long)
    # Divide in float64 and round once to float32, as the reference does.
    sigmas = torch.tensor([t / float(NUM_TRAIN_TIMESTEPS) for t in ts.tolist()] + [0.0], dtype=torch.float32)
    return ts, sigmas

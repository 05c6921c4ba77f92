"""Flow-matching UniPC multistep sampler (the reference's default scheduler).

Configuration fixed to the one the reference pipeline uses: order-2 UniP predictor with a UniC
corrector, x0 ("data") parameterisation, B(h) = expm1(-h) ("bh2"), the first step and the last
step at order 1, corrector on every step after the first, no thresholding.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import NUM_TRAIN_TIMESTEPS, Scheduler, shift_sigmas


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (+inf at sigma = 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCScheduler(Scheduler):
    """UniPC-2 on x0 predictions; state holds the last two x0 predictions and the last sample."""

    name = "unipc"
    order = 2

    def _default_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Upper end: the top training sigma (1 - 1/1000), shifted in float32; lower end: 0.
        top = torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64).to(torch.float32)
        sigma_max = shift_sigmas(top, self.shift).item()
        sigmas = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
        sigmas = shift_sigmas(sigmas, self.shift)  # second shift, float64
        # Timesteps truncate toward zero, so t_i / 1000 is generally not sigmas[i].
        timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        return timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))

    def _reset_state(self) -> None:
        self._x0_prev: torch.Tensor | None = None  # x0 prediction two steps back
        self._x0_last: torch.Tensor | None = None  # x0 prediction of the previous step
        self._last_sample: torch.Tensor | None = None  # sample the previous predictor started from
        self._last_order = 0

    def _select_state(self, rows: list[int]) -> None:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, torch.tensor(rows, device=t.device))

        self._x0_prev, self._x0_last, self._last_sample = map(pick, (self._x0_prev, self._x0_last, self._last_sample))

    def _step(self, index, model_output, sample, **_unused) -> torch.Tensor:
        x0 = sample - self.sigmas[index] * model_output
        if index > 0:
            sample = self._correct(index, x0, sample)
        self._x0_prev, self._x0_last = self._x0_last, x0
        # Warm-up from order 1, and drop back to order 1 for the final step.
        order = min(self.order, index + 1, len(self.timesteps) - index)
        self._last_order = order
        self._last_sample = sample
        return self._predict(index, sample, order)

    def _predict(self, index: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: from sigmas[index] to sigmas[index + 1]."""
        sigma_t, sigma_s0 = self.sigmas[index + 1], self.sigmas[index]
        alpha_t = 1 - sigma_t
        lambda_s0 = _log_snr(sigma_s0)
        h = _log_snr(sigma_t) - lambda_s0
        neg_h = -h
        b_h = torch.expm1(neg_h)  # also h * phi_1(-h)
        m0 = self._x0_last
        x_t = sigma_t / sigma_s0 * x - alpha_t * b_h * m0
        if order == 2:
            rk = (_log_snr(self.sigmas[index - 1]) - lambda_s0) / h
            d1 = (self._x0_prev - m0) / rk
            # rho = 1/2 for the order-2 predictor.
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t

    def _correct(self, index: int, x0: torch.Tensor, this_sample: torch.Tensor) -> torch.Tensor:
        """UniC: redo the previous step (sigmas[index-1] -> sigmas[index]) using the new x0."""
        order = self._last_order
        sigma_t, sigma_s0 = self.sigmas[index], self.sigmas[index - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _log_snr(sigma_s0)
        h = _log_snr(sigma_t) - lambda_s0
        neg_h = -h
        b_h = torch.expm1(neg_h)
        m0 = self._x0_last
        x_t = sigma_t / sigma_s0 * self._last_sample - alpha_t * b_h * m0
        d1_t = x0 - m0
        if order == 1:
            corr = 0.5 * d1_t
        else:
            rk = (_log_snr(self.sigmas[index - 2]) - lambda_s0) / h
            d1 = (self._x0_prev - m0) / rk
            rhos = _corrector_weights(rk, neg_h, b_h, this_sample.device)
            corr = rhos[0] * d1 + rhos[1] * d1_t
        return x_t - alpha_t * b_h * corr


def _corrector_weights(rk: torch.Tensor, neg_h: torch.Tensor, b_h: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Solve the order-2 UniC system [[1, 1], [rk, 1]] rho = g, on the sample's device like the reference."""
    # Right-hand side g_1 = p_1 / B(h), g_2 = 2 * p_2 / B(h) with p_1 = expm1(-h) / (-h) - 1 and
    # p_2 = p_1 / (-h) - 1/2; evaluated in float32 in the reference's op order.
    p = b_h / neg_h - 1
    g1 = p * 1 / b_h
    p = p / neg_h - 1 / 2
    g2 = p * 2 / b_h
    lhs = torch.tensor([[1.0, 1.0], [rk.item(), 1.0]], dtype=torch.float32)
    rhs = torch.tensor([g1.item(), g2.item()], dtype=torch.float32)
    if device.type == "cuda":
        # Same solve on the GPU, but without stalling the host: pinned async copies, and solve_ex skips
        # the singularity check (a device-to-host read); the system is never singular (rk != 1).
        lhs, rhs = lhs.pin_memory().to(device, non_blocking=True), rhs.pin_memory().to(device, non_blocking=True)
        return torch.linalg.solve_ex(lhs, rhs).result
    return torch.linalg.solve(lhs.to(device), rhs.to(device))

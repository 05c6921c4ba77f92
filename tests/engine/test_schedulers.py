"""Our schedulers against golden numbers recorded from the reference HiDream-O1 schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hidream_serve.engine.schedulers import Scheduler, make_scheduler

GOLDEN = np.load(Path(__file__).parents[1] / "data" / "scheduler_golden.npz")
CASES = {c["key"]: c for c in json.loads(str(GOLDEN["cases_json"]))}


def pseudo_model_output(z: torch.Tensor, x0: torch.Tensor, step_t: torch.Tensor) -> torch.Tensor:
    """What the golden run fed the schedulers: -velocity of a fixed x0 prediction, as the pipeline computes it."""
    sigma = (step_t.float() / 1000.0).to(torch.float32).clamp_min(0.001)
    return -((x0 - z) / sigma)


def noise_scales(case: dict, n: int) -> list[float]:
    a, b = case.get("ns_start", 1.0), case.get("ns_end", 1.0)
    return [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]


def build(case: dict) -> Scheduler:
    sched = make_scheduler(case["name"], case["shift"])
    sched.set_timesteps(case["steps"], case["timesteps"])
    return sched


def run(case: dict, z0: torch.Tensor, x0s: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
    """Trajectory (steps + 1, B, L, D); x0s is (steps, B, L, D); one generator per seed for flash."""
    sched = build(case)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds] if seeds is not None else None
    scales = noise_scales(case, len(sched.timesteps))
    z, traj = z0.clone(), [z0.clone()]
    for i, step_t in enumerate(sched.timesteps):
        mo = pseudo_model_output(z, x0s[i], step_t)
        z = sched.step(mo, z, generators=gens, noise_scale=scales[i], noise_clip_std=case.get("clip", 0.0))
        traj.append(z.clone())
    return torch.stack(traj)


def platform_matches_golden(key: str) -> bool:
    """Whether this machine's scalar float32 log/expm1 reproduce the golden machine's for this case.

    UniPC's coefficients go through torch.log/expm1 on 0-d tensors, whose last bit depends on the
    platform's math library; a 1-ulp difference there moves the trajectory by up to a few 1e-6
    (seen between torch 2.13 CPU on AMD and torch 2.11 on Intel). Euler and flash steps use only
    exactly rounded arithmetic and need no probe.
    """
    probe_key = f"{key}/scalar_probe"
    if probe_key not in GOLDEN.files:
        return True
    sigmas = torch.from_numpy(GOLDEN[f"{key}/sigmas"])
    lam = [torch.log(1 - s) - torch.log(s) for s in sigmas]
    em = [torch.expm1(-(lam[i + 1] - lam[i])) for i in range(len(lam) - 1)]
    return np.array_equal(torch.stack(lam + em).numpy(), GOLDEN[probe_key])


def golden_atol(key: str) -> float:
    # Exact agreement is expected (and observed) where the scalar math matches; 1e-6 leaves room only
    # for the sign of zero and similar. Elsewhere allow the measured libm drift with margin.
    return 1e-6 if platform_matches_golden(key) else 1e-5


def golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(GOLDEN["z0"]), torch.from_numpy(GOLDEN["x0s"])


def seeds_for(case: dict, offset: int = 0) -> list[int] | None:
    return [case["seed"] + offset] if case["name"] == "flash" else None


@pytest.mark.parametrize("key", sorted(CASES))
def test_schedule_matches_reference(key: str) -> None:
    case = CASES[key]
    sched = build(case)
    want_t = GOLDEN[f"{key}/timesteps"]
    assert str(sched.timesteps.dtype) == f"torch.{case['timesteps_dtype']}"
    assert np.array_equal(sched.timesteps.numpy(), want_t)
    assert sched.sigmas.dtype == torch.float32
    assert np.array_equal(sched.sigmas.numpy(), GOLDEN[f"{key}/sigmas"])


@pytest.mark.parametrize("key", sorted(CASES))
def test_trajectory_matches_reference(key: str) -> None:
    """Flash noise comes from a generator seeded like the reference's global RNG."""
    case = CASES[key]
    z0, x0s = golden_inputs()
    got = run(case, z0, x0s, seeds_for(case)).numpy()
    want = GOLDEN[f"{key}/traj"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=golden_atol(key))


def three_candidates(case: dict, seed: int):
    """The golden candidate plus two random ones: initial samples, x0 sequences and noise seeds."""
    z0, x0s = golden_inputs()
    g = torch.Generator("cpu").manual_seed(seed)
    zs = [z0] + [7.5 * torch.randn(z0.shape, generator=g) for _ in range(2)]
    x0_sets = [x0s] + [torch.tanh(torch.randn(x0s.shape, generator=g)) for _ in range(2)]
    return zs, x0_sets, [seeds_for(case, k) for k in range(3)]


@pytest.mark.parametrize("key", ["unipc_50_s3", "unipc_custom", "flow_match_default", "flash_75_20_clip25"])
def test_batch_candidates_are_independent(key: str) -> None:
    case = CASES[key]
    zs, x0_sets, seed_sets = three_candidates(case, 99)

    batch_seeds = None if seed_sets[0] is None else [s[0] for s in seed_sets]
    batched = run(case, torch.cat(zs), torch.cat(x0_sets, dim=1), batch_seeds)
    for k in range(3):
        alone = run(case, zs[k], x0_sets[k], seed_sets[k])
        assert torch.equal(batched[:, k : k + 1], alone), f"candidate {k} differs from its solo run"
    np.testing.assert_allclose(batched[:, :1].numpy(), GOLDEN[f"{key}/traj"], rtol=0, atol=golden_atol(key))


def test_flash_leaves_global_rng_alone() -> None:
    case = CASES["flash_75_75_clip25"]
    z0, x0s = golden_inputs()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    run(case, z0, x0s, seeds_for(case))
    assert torch.equal(torch.get_rng_state(), before)


def test_flash_requires_one_generator_per_candidate() -> None:
    sched = build(CASES["flash_75_75_clip0"])
    x = torch.zeros(2, 6, 12)
    with pytest.raises(ValueError, match="Generator"):
        sched.step(x, x)
    with pytest.raises(ValueError, match="Generator"):
        sched.step(x, x, generators=[torch.Generator()])


@pytest.mark.parametrize("name", ["unipc", "flow_match", "flash"])
def test_step_past_the_end_raises(name: str) -> None:
    sched = make_scheduler(name, 3.0)
    sched.set_timesteps(3)
    x = torch.zeros(1, 4, 5)
    gens = [torch.Generator().manual_seed(0)]
    for _ in range(3):
        sched.step(x, x, generators=gens)
    with pytest.raises(RuntimeError, match="after all 3 steps"):
        sched.step(x, x, generators=gens)


def test_set_timesteps_restarts_the_run() -> None:
    case = CASES["unipc_8_s3"]
    z0, x0s = golden_inputs()
    sched = build(case)
    for i, step_t in enumerate(sched.timesteps[:3]):
        sched.step(pseudo_model_output(z0, x0s[i], step_t), z0)
    sched.set_timesteps(case["steps"])
    assert sched.step_index == 0
    z = z0
    for i, step_t in enumerate(sched.timesteps):
        z = sched.step(pseudo_model_output(z, x0s[i], step_t), z)
    np.testing.assert_allclose(z.numpy(), GOLDEN["unipc_8_s3/traj"][-1], rtol=0, atol=golden_atol("unipc_8_s3"))


def test_step_before_set_timesteps_raises() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        make_scheduler("flow_match", 1.0).step(x, x)


def test_unknown_scheduler_name() -> None:
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("default", 3.0)


@pytest.mark.parametrize(
    "timesteps",
    [[], [999, 999, 500], [999, 500.5], [1001, 500], [-1]],
)
def test_bad_custom_timesteps(timesteps: list) -> None:
    with pytest.raises(ValueError):
        make_scheduler("unipc", 3.0).set_timesteps(5, timesteps)


def test_bad_step_inputs() -> None:
    sched = make_scheduler("flow_match", 1.0)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="float32"):
        sched.step(torch.zeros(1, 2, 3, dtype=torch.bfloat16), torch.zeros(1, 2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("key", ["unipc_50_s3", "unipc_8_s3", "flow_match_default", "flash_75_20_clip25"])
def test_select_prunes_candidates(key: str) -> None:
    """Dropping candidates mid-run leaves the survivors exactly on their solo trajectories."""
    case = CASES[key]
    zs, x0_sets, seed_sets = three_candidates(case, 5)
    gens = None if seed_sets[0] is None else [torch.Generator().manual_seed(s[0]) for s in seed_sets]
    keep = [0, 2]

    sched = build(case)
    scales = noise_scales(case, len(sched.timesteps))
    z, x0_batch, rows = torch.cat(zs), torch.cat(x0_sets, dim=1), [0, 1, 2]
    for i, step_t in enumerate(sched.timesteps):
        if i == 3:
            z, rows = z[keep], keep
            sched.select(keep)
        mo = pseudo_model_output(z, x0_batch[i, rows], step_t)
        step_gens = None if gens is None else [gens[r] for r in rows]
        z = sched.step(mo, z, generators=step_gens, noise_scale=scales[i], noise_clip_std=case.get("clip", 0.0))
    for pos, k in enumerate(keep):
        alone = run(case, zs[k], x0_sets[k], seed_sets[k])
        assert torch.equal(z[pos : pos + 1], alone[-1])


def test_prefetched_noise_matches_the_generator_and_stops_after_its_draws() -> None:
    """Prefetched step noise equals drawing from the candidate's generator in order, and nothing is drawn
    beyond the last step (a draw nobody takes would hold a worker the next request needs)."""
    from hidream_serve.engine.noise import PrefetchedNoise, draw_noise

    shape = (4, 12)
    pre = PrefetchedNoise(torch.Generator().manual_seed(7), shape, 2.0, "cpu", draws=2)
    want = torch.Generator().manual_seed(7)
    for _ in range(2):
        assert torch.equal(pre.take(shape, 2.0), draw_noise(want, shape, 2.0))
    assert pre._next is None
    with pytest.raises(RuntimeError, match="all prefetched draws"):
        pre.take(shape, 2.0)

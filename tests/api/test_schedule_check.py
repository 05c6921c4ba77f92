"""A `shift` that breaks the scheduler's schedule is a 422 naming `shift` in precheck, not a 500 on a GPU."""

import pytest

from hidream_serve.api.checks import check_schedule
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import GenerationParams, resolve_sampler
from hidream_serve.engine.schedulers import make_scheduler


@pytest.mark.parametrize("steps,shift", [(50, 30.0), (100, 15.0), (20, 60.0)])
def test_breaking_shift_is_named_with_the_largest_working_value(steps, shift):
    sampler, _ = resolve_sampler(GenerationParams(mode="t2i", prompt="a", steps=steps, shift=shift))
    with pytest.raises(InvalidInput) as exc:
        check_schedule(sampler)
    assert exc.value.field == "shift"
    largest = float(exc.value.message.rsplit(" ", 1)[-1])
    make_scheduler(sampler.scheduler, largest).set_timesteps(steps)  # the value quoted works
    with pytest.raises(ValueError):
        make_scheduler(sampler.scheduler, largest + 0.01).set_timesteps(steps)


def test_default_shift_passes():
    sampler, _ = resolve_sampler(GenerationParams(mode="t2i", prompt="a"))
    check_schedule(sampler)

"""Denoising schedulers of the HiDream-O1-Image pipeline, reimplemented on torch + numpy."""

from __future__ import annotations

from .base import Scheduler
from .flash import FlashFlowMatchScheduler
from .flow_match import FlowMatchEulerScheduler
from .unipc import UniPCScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "unipc": UniPCScheduler,
    "flow_match": FlowMatchEulerScheduler,
    "flash": FlashFlowMatchScheduler,
}


def make_scheduler(name: str, shift: float) -> Scheduler:
    """A fresh scheduler by name ("unipc", "flow_match" or "flash"); call `set_timesteps` next."""
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}") from None
    return cls(shift)


__all__ = [
    "SCHEDULERS",
    "FlashFlowMatchScheduler",
    "FlowMatchEulerScheduler",
    "Scheduler",
    "UniPCScheduler",
    "make_scheduler",
]

"""The service's shared words and bounds, defined once and free of torch, so that the CPU-only ingress, the
engine, the scorers and the config all import the same ones.

Tuples hold the values (for membership tests and listings); the `Literal` aliases built from them are the
types that pydantic models and signatures use.
"""

from __future__ import annotations

from typing import Literal

MODES = ("t2i", "edit", "ip", "skeleton", "layout")
Mode = Literal[MODES]  # type: ignore[valid-type]

# What a reference is for. The model itself has no roles (a ref is a ref); they steer scoring and presets.
ROLES = ("face", "subject", "garment", "background", "pose", "style")
Role = Literal[ROLES]  # type: ignore[valid-type]

RECIPES = ("full", "dev")
RecipeName = Literal[RECIPES]  # type: ignore[valid-type]

SCHEDULERS = ("unipc", "flow_match", "flash")
SchedulerName = Literal[SCHEDULERS]  # type: ignore[valid-type]

# Modes whose result is judged against its references (reference fidelity).
FIDELITY_MODES = ("edit", "ip", "skeleton", "layout")

MAX_SEED = 2**63 - 2  # seeds seed a torch.Generator (int64); seed + 1 must still fit
MAX_STEPS = 200  # the most denoising steps the engine accepts
PATCH_SIZE = 32  # pixel patch edge of the generated image: exact sizes are multiples of it
KEEP_ASPECT_EDGE = 2048  # keep_original_aspect: the output has about this edge squared, at the ref's aspect

# Bounds of the protocol itself; the operator's `Limits` are at most these.
HARD_MAX_N = 256
HARD_MAX_REFS = 64
HARD_MAX_PROMPT = 20_000
HARD_MAX_EDGE = 8192

"""One place that turns a model spec into a loaded pipeline: a checkpoint directory, `embedded:tiny`, or
`random:full-size` (the full-size architecture with random weights, for benchmarks)."""

from __future__ import annotations

from .embedded import model_dir


def load_pipeline(spec: str, device: str, dtype, **options):
    """(pipeline, what was loaded: the directory or the spec)."""
    from .engine.pipeline import HiDreamPipeline
    from .random_model import RANDOM_FULL_SPEC, random_full_pipeline

    if spec == RANDOM_FULL_SPEC:
        return random_full_pipeline(device, dtype, **options), spec
    path = model_dir(spec)
    return HiDreamPipeline.from_pretrained(path, device=device, dtype=dtype, **options), path

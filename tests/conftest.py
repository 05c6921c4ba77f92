"""Shared fixtures: one tiny checkpoint per session, small images made on the fly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_serve.tiny import write_tiny_checkpoint

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    from hidream_serve.engine.pipeline import HiDreamPipeline

    return HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, max_batch=4)


def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, seed-dependent RGB test image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.28)
        chans.append(127.5 + 127.5 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph))
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8))


class FakeResponse:
    """Stands in for a Ray Serve DeploymentResponse: awaitable after `seconds`, with cancel()."""

    def __init__(self, value=None, seconds: float = 0.0):
        self.value, self.seconds, self.cancelled = value, seconds, False

    def __await__(self):
        yield from asyncio.sleep(self.seconds).__await__()
        return self.value

    def cancel(self):
        self.cancelled = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

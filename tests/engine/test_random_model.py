"""The `random:full-size` model spec used by the GPU benchmarks, checked here at tiny dimensions."""

from __future__ import annotations

import pytest
import torch

from hidream_serve import random_model
from hidream_serve.engine.params import GenerationParams
from hidream_serve.tiny import TINY_TEXT, TINY_VISION


@pytest.fixture
def tiny_dims(monkeypatch):
    monkeypatch.setattr(random_model, "FULL_TEXT", dict(TINY_TEXT))
    monkeypatch.setattr(random_model, "FULL_VISION", dict(TINY_VISION))


def test_random_pipeline_generates(tiny_dims):
    pipe = random_model.random_full_pipeline("cpu", torch.float32)
    r = pipe(GenerationParams(mode="t2i", prompt="x", width=64, height=64, exact_size=True, steps=2), [1])
    assert r.candidates[0].image.size == (64, 64)
    assert all((p != 0).all() for p in pipe.model.parameters())


def test_full_size_config_is_qwen3_vl_8b():
    cfg = random_model.load_config_dict(random_model.config_dict(random_model.FULL_TEXT, random_model.FULL_VISION))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size) == (36, 4096, 32, 8, 128, 12288)  # fmt: skip
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["rope_theta"] == 5000000
    assert (v.depth, v.hidden_size, v.patch_size, v.spatial_merge_size, list(v.deepstack_visual_indexes)) == (
        27, 1152, 16, 2, [8, 16, 24])  # fmt: skip


def test_generator_serves_the_random_spec(tiny_dims):
    pytest.importorskip("ray")
    from services.generator import Generator

    gen = Generator.func_or_class(random_model.RANDOM_FULL_SPEC, device="cpu", dtype="float32")
    assert gen.path == random_model.RANDOM_FULL_SPEC and gen.pipe.model.dtype == torch.float32


@pytest.mark.parametrize("size", [None, 64])
def test_generator_warms_up_when_configured(tiny_dims, monkeypatch, size):
    """`engine.warm_up_size` runs the pipeline's warm-up at start and is not passed on as a pipeline option."""
    pytest.importorskip("ray")
    from hidream_serve.engine.pipeline import HiDreamPipeline
    from services.generator import Generator

    calls = []
    monkeypatch.setattr(HiDreamPipeline, "warm_up", lambda self, w, h: calls.append((w, h)) or 0.0)
    engine = {"fuse": True} if size is None else {"fuse": True, "warm_up_size": size}
    Generator.func_or_class(random_model.RANDOM_FULL_SPEC, device="cpu", dtype="float32", engine=engine)
    assert calls == ([] if size is None else [(64, 64)])


def test_warm_up_generates_with_and_without_cfg(tiny_dims, monkeypatch):
    from hidream_serve.engine.pipeline import HiDreamPipeline

    pipe = random_model.random_full_pipeline("cpu", torch.float32)
    seen = []
    original = HiDreamPipeline.__call__

    def spy(self, params, seeds, on_step=None):
        seen.append((params.recipe, params.width, params.height, len(seeds)))
        return original(self, params, seeds, on_step)

    monkeypatch.setattr(HiDreamPipeline, "__call__", spy)
    assert pipe.warm_up(64, 96) > 0
    assert seen == [("full", 64, 96, 1), ("full", 64, 96, 2), ("dev", 64, 96, 1), ("dev", 64, 96, 2)]

"""End-to-end engine behaviour on the tiny checkpoint: modes, seeds, batching, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import GenerationParams
from tests.conftest import make_image

SMALL = dict(width=128, height=128, exact_size=True, steps=3)


def arr(img):
    return np.asarray(img, dtype=np.int16)


def test_t2i_is_reproducible_and_seed_dependent(pipe):
    p = GenerationParams(mode="t2i", prompt="a red fox", **SMALL)
    a = pipe(p, [5]).candidates[0].image
    b = pipe(p, [5]).candidates[0].image
    c = pipe(p, [6]).candidates[0].image
    assert a.size == (128, 128)
    assert np.array_equal(arr(a), arr(b))
    assert np.abs(arr(a) - arr(c)).mean() > 5


@pytest.mark.parametrize("recipe", ["full", "dev"])
def test_candidate_is_independent_of_batch_position(pipe, recipe):
    steps = None if recipe == "dev" else 3
    p = GenerationParams(mode="ip", prompt="a toy", refs=[make_image(96, 64, 1)], width=128, height=128,
                         exact_size=True, recipe=recipe, steps=steps)  # fmt: skip
    solo = pipe(p, [11]).candidates[0].image
    batch = pipe(p, [3, 11, 7]).candidates
    assert [c.seed for c in batch] == [3, 11, 7]
    diff = np.abs(arr(solo) - arr(batch[1].image))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_every_mode_runs(pipe):
    refs = [make_image(64 + 16 * i, 96, i) for i in range(4)]
    cases = {
        "t2i": dict(),
        "edit": dict(refs=refs[:1]),
        "ip": dict(refs=refs[:3]),
        "skeleton": dict(refs=refs[:4]),
        "layout": dict(refs=refs[:2], layout_boxes=[{"bbox": [0.1, 0.4, 0.1, 0.9], "text": "a"}, [0.5, 0.9, 0.2, 0.8]]),
    }
    for mode, extra in cases.items():
        r = pipe(GenerationParams(mode=mode, prompt="test", **SMALL, **extra), [1])
        assert r.candidates[0].image.size == (128, 128), mode
        n_refs = len(extra.get("refs", [])) + (1 if mode == "layout" else 0)
        assert len(r.settings["ref_sizes"]) == n_refs, mode


def test_uncond_keeps_refs_and_swaps_caption(pipe):
    p = GenerationParams(mode="edit", prompt="make it blue", refs=[make_image(64, 64)], **SMALL)
    prep = pipe.prepare(p)
    cond, uncond = prep.cond.captions
    image_pad = pipe.model.config.image_token_id
    assert (cond.prefix_ids == image_pad).sum() == (uncond.prefix_ids == image_pad).sum() > 0
    assert uncond.caption == " " and cond.caption == "make it blue"
    assert torch.equal(cond.gen_positions[:, 1:], uncond.gen_positions[:, 1:])


def test_no_uncond_pass_without_guidance(pipe):
    prep = pipe.prepare(GenerationParams(mode="t2i", prompt="x", guidance=1.0, **SMALL))
    assert len(prep.prefixes) == 1


def test_step_hook_sees_x0_and_can_prune(pipe):
    seen = []

    def hook(state):
        seen.append((state.step, list(state.seeds), tuple(state.x0.shape)))
        if state.step == 0:
            return [0, 2]
        return None

    p = GenerationParams(mode="t2i", prompt="x", **SMALL)
    r = pipe(p, [1, 2, 3], on_step=hook)
    assert seen[0] == (0, [1, 2, 3], (3, 16, 3072))
    assert seen[1][1] == [1, 3]
    pruned = [c for c in r.candidates if c.pruned_at_step is not None]
    assert [c.seed for c in pruned] == [2] and pruned[0].image is None and pruned[0].preview.size == (128, 128)
    assert [c.steps_computed for c in r.candidates] == [3, 1, 3]
    # survivors equal their unpruned runs
    full = pipe(p, [3]).candidates[0].image
    assert np.abs(arr(full) - arr(r.candidates[2].image)).max() <= 1


def test_settings_report_snapping_and_tokens(pipe):
    p = GenerationParams(mode="t2i", prompt="x", width=1000, height=1500, steps=1)
    prep = pipe.prepare(p)
    s = prep.settings()
    assert (s["width"], s["height"]) == (1664, 2496)
    assert any("snapped from 1000x1500 to trained size 1664x2496" in w for w in prep.warnings)
    assert s["target_tokens"] == (1664 // 32) * (2496 // 32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="edit", refs=[]), "refs"),
        (dict(mode="skeleton", refs=["one"]), "refs"),
        (dict(mode="t2i", steps=0), "steps"),
        (dict(mode="t2i", scheduler="ddim"), "scheduler"),
        (dict(mode="t2i", recipe="turbo"), "recipe"),
        (dict(mode="t2i", width=100, height=128, exact_size=True), "width"),
        (dict(mode="t2i", guidance=-1.0), "guidance"),
        (dict(mode="layout", refs=["one"]), "layout_boxes"),
        (dict(mode="layout", refs=["one"], layout_boxes=[[0.5, 0.2, 0.1, 0.9]]), "layout_boxes[0]"),
        (dict(mode="ip", refs=["one", "two"], keep_original_aspect=True), "keep_original_aspect"),
    ],
)
def test_bad_input_names_the_field(pipe, kwargs, field):
    kwargs = dict(kwargs)
    kwargs["refs"] = [make_image(64, 64, i) for i, _ in enumerate(kwargs.get("refs", []))]
    base = dict(prompt="x", width=128, height=128, exact_size=True)
    base.update(kwargs)
    with pytest.raises(InvalidInput) as e:
        pipe(GenerationParams(**base), [1])
    assert e.value.field == field


def test_bad_seeds(pipe):
    p = GenerationParams(mode="t2i", prompt="x", **SMALL)
    for seeds, field in (([], "seeds"), ([1, 1], "seeds"), ([1, -3], "seeds[1]")):
        with pytest.raises(InvalidInput) as e:
            pipe(p, seeds)
        assert e.value.field == field


def test_invalid_input_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(InvalidInput("refs[2]", "bad image")))
    assert isinstance(e, InvalidInput) and e.field == "refs[2]" and e.message == "bad image"


def test_compiled_layer_is_not_recompiled_per_prompt_size_or_batch(tiny_dir, pipe):
    """A service sees every prompt length, image size and batch: sizes are symbolic in the compiled layer,
    so after the warm-up (with and without CFG, one and two candidates) nothing compiles again, and the
    compiled results match eager."""
    from torch._dynamo.utils import counters

    from hidream_serve.engine.pipeline import HiDreamPipeline

    torch._dynamo.reset()
    counters.clear()
    compiled = HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, compile=True)
    compiled.warm_up(64, 64)
    warm = counters["stats"]["unique_graphs"]
    assert 2 <= warm <= 8, warm  # (layer, last layer) x (CFG or not) x (one candidate or more)
    requests = [
        ("a fox", 96, 64, [3], "full"),
        ("a red fox sitting in deep snow under a full moon, oil painting", 64, 128, [3, 4, 5], "full"),
        ("a red fox in deep snow", 128, 96, [3, 4], "dev"),
    ]
    for prompt, w, h, seeds, recipe in requests:
        p = GenerationParams(mode="t2i", prompt=prompt, width=w, height=h, exact_size=True, recipe=recipe,
                             steps=2 if recipe == "full" else None)  # fmt: skip
        got = compiled(p, seeds).candidates
        want = pipe(p, seeds).candidates
        for a, b in zip(got, want):
            diff = np.abs(arr(a.image) - arr(b.image))
            assert diff.max() <= 1, diff.max()
    p = GenerationParams(mode="ip", prompt="a toy", refs=[make_image(96, 64, 1)], width=64, height=64,
                         exact_size=True, steps=2)  # fmt: skip
    compiled(p, [1])
    assert counters["stats"]["unique_graphs"] == warm


def test_compiled_layers_with_different_attention_do_not_share_graphs(tiny_dir):
    """A compiled graph fixes the SDPA kernel chosen when it was traced, so a pipeline preferring another
    attention backend must trace its own graphs rather than reuse the first pipeline's."""
    from torch._dynamo.utils import counters

    from hidream_serve.engine.pipeline import HiDreamPipeline

    torch._dynamo.reset()
    counters.clear()
    p = GenerationParams(mode="t2i", prompt="a fox", width=64, height=64, exact_size=True, steps=1)
    graphs = []
    for attention in ("cudnn", "flash", "cudnn"):
        pipe = HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, compile=True,
                                               attention=attention)  # fmt: skip
        pipe(p, [1])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] and graphs[2] == graphs[1], graphs


def test_attention_preference_is_resolved_and_checked(tiny_dir):
    from hidream_serve.engine.pipeline import HiDreamPipeline

    ck = HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)
    assert ck.attention == "cudnn"  # "auto" without FlashAttention-3 for this device
    with pytest.raises(ValueError, match="FlashAttention-3"):
        HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, attention="fa3")
    with pytest.raises(ValueError, match="attention must be one of"):
        HiDreamPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, attention="xformers")


def test_fa3_support_follows_the_build(monkeypatch):
    """FlashAttention-3 counts as available only on Hopper, for the dtypes and head sizes its build holds."""
    import sys
    import types

    from hidream_serve.engine import network

    monkeypatch.setattr(network, "_fa3_func", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    config = types.ModuleType("flash_attn_config")  # what scripts/build-fa3.sh's build writes
    flags = {f"FLASHATTENTION_DISABLE_HDIM{d}": d != 128 for d in (64, 96, 128, 192, 256)}
    config.CONFIG = {"build_flags": {**flags, "FLASHATTENTION_DISABLE_FP16": True}}
    monkeypatch.setitem(sys.modules, "flash_attn_config", config)
    cuda = torch.device("cuda")
    assert network.fa3_supports(cuda, torch.bfloat16, 128)
    assert network.fa3_supports(cuda, torch.bfloat16, 16)  # runs on the 128 kernel
    assert not network.fa3_supports(cuda, torch.bfloat16, 192)
    assert not network.fa3_supports(cuda, torch.bfloat16, 20)  # not a multiple of 8
    assert not network.fa3_supports(cuda, torch.float16, 128)
    assert not network.fa3_supports(cuda, torch.float32, 128)
    assert not network.fa3_supports(torch.device("cpu"), torch.bfloat16, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not network.fa3_supports(cuda, torch.bfloat16, 128)


def test_fa3_choice_routes_attention_and_does_not_leak_to_a_pipeline_sharing_the_model(tiny_dir, monkeypatch):
    """With FlashAttention-3 available, `auto`/`fa3` pipelines call it and a `cudnn` pipeline on the same model
    does not, whichever was made last (FA3 stood in for by SDPA, so the images agree)."""
    import torch.nn.functional as F

    from hidream_serve.engine import network, pipeline
    from hidream_serve.engine.checkpoint import load_checkpoint

    calls = []

    def fake_fa3(q, k, v, causal=False):  # (B, T, H, hd) in and out, like FA3
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=True)  # fmt: skip
        return out.transpose(1, 2)

    monkeypatch.setattr(network, "_fa3_func", fake_fa3)
    monkeypatch.setattr(pipeline, "fa3_supports", lambda *args: True)
    ck = load_checkpoint(tiny_dir, "cpu", torch.float32)
    sdpa = pipeline.HiDreamPipeline(ck, attention="cudnn")
    fa3 = pipeline.HiDreamPipeline(ck, attention="fa3")
    assert pipeline.HiDreamPipeline(ck).attention == "fa3"  # auto
    p = GenerationParams(mode="t2i", prompt="a fox", width=64, height=64, exact_size=True, steps=2)
    a = arr(sdpa(p, [1]).candidates[0].image)
    assert calls == []
    b = arr(fa3(p, [1]).candidates[0].image)
    n = len(calls)
    assert n > 0
    c = arr(sdpa(p, [1]).candidates[0].image)
    assert len(calls) == n
    assert np.abs(a - b).max() <= 1 and np.array_equal(a, c)


def test_compile_tuning_is_on_by_default_and_can_be_turned_off(tiny_dir):
    from hidream_serve.engine.checkpoint import load_checkpoint
    from hidream_serve.engine.pipeline import COMPILE_TUNING, HiDreamPipeline

    ck = load_checkpoint(tiny_dir, "cpu", torch.float32)
    assert HiDreamPipeline(ck, compile=True).layer_fn.options == COMPILE_TUNING
    assert HiDreamPipeline(ck, compile=True, compile_tuning=False).layer_fn.options is None
    assert HiDreamPipeline(ck).layer_fn is None

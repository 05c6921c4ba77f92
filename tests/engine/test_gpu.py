"""GPU-only checks (skipped without CUDA): device independence and the bf16 fast path on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidream_serve.engine.params import GenerationParams
from hidream_serve.engine.pipeline import HiDreamPipeline
from tests.conftest import make_image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _img(pipe, params, seed):
    return np.asarray(pipe(params, [seed]).candidates[0].image, dtype=np.int16)


@pytest.mark.parametrize("recipe", ["full", "dev"])
def test_same_image_on_cpu_and_cuda(tiny_dir, pipe, recipe):
    """A seed's image does not depend on the device (float32 on both)."""
    gpu = HiDreamPipeline.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32)
    p = GenerationParams(mode="ip", prompt="a toy", refs=[make_image(96, 64)], width=128, height=128,
                         exact_size=True, recipe=recipe, steps=None if recipe == "dev" else 4)  # fmt: skip
    diff = np.abs(_img(pipe, p, 3) - _img(gpu, p, 3))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_bf16_compiled_path_runs_and_tracks_float32(tiny_dir):
    fast = HiDreamPipeline.from_pretrained(tiny_dir, device="cuda", dtype=torch.bfloat16, compile=True)
    ref = HiDreamPipeline.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32)
    p = GenerationParams(mode="t2i", prompt="x", width=256, height=256, exact_size=True, steps=4)
    a, b = _img(fast, p, 1), _img(ref, p, 1)
    assert np.abs(a - b).mean() < 8, np.abs(a - b).mean()


def test_pruned_run_on_cuda_matches_cpu(tiny_dir, pipe):
    """Pruning, previews and the decode (done on the GPU) give the CPU's images."""
    gpu = HiDreamPipeline.from_pretrained(tiny_dir, device="cuda", dtype=torch.float32)
    p = GenerationParams(mode="t2i", prompt="a fox", width=128, height=128, exact_size=True, steps=4)

    def keep_first(state):
        return [0] if state.step == 1 else None

    a = pipe(p, [1, 2], on_step=keep_first).candidates
    b = gpu(p, [1, 2], on_step=keep_first).candidates
    assert a[1].pruned_at_step == b[1].pruned_at_step == 1 and b[1].image is None
    for x, y in ((a[0].image, b[0].image), (a[1].preview, b[1].preview)):
        diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def _head_dim_128_layer():
    from hidream_serve.engine.checkpoint import load_config_dict
    from hidream_serve.engine.network import DecoderLayer
    from hidream_serve.tiny import config_dict

    text = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    cfg = load_config_dict(config_dict(text)).text_config
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    return layer, cfg


def test_flash_attention_3_matches_sdpa():
    """FlashAttention-3 (where built for this GPU) gives SDPA's outputs, causal prefix pass and generated pass."""
    from hidream_serve.engine.network import LayerKV, fa3_supports

    if not fa3_supports(torch.device("cuda"), torch.bfloat16, 128):
        pytest.skip("FlashAttention-3 is not built for this GPU (scripts/build-fa3.sh)")
    layer, cfg = _head_dim_128_layer()
    dev, hd = "cuda", cfg.head_dim

    def run(kernel):
        layer.self_attn.kernel = kernel
        g = torch.Generator(dev).manual_seed(1)
        x = torch.randn(1, 37, cfg.hidden_size, device=dev, generator=g, dtype=torch.bfloat16)
        cos, sin = torch.randn(2, 1, 37, hd, device=dev, generator=g, dtype=torch.bfloat16)
        prefix, kv = layer.forward_prefix(x, cos, sin)
        xg = torch.randn(4, 300, cfg.hidden_size, device=dev, generator=g, dtype=torch.bfloat16)
        cg, sg = torch.randn(2, 4, 300, hd, device=dev, generator=g, dtype=torch.bfloat16)
        short = LayerKV(kv.k[:, :20], kv.v[:, :20])  # two captions with prefixes of different lengths
        gen = layer.forward_generated(xg, cg, sg, [kv, short], torch.arange(1, 300, device=dev))
        return prefix.float(), gen.float()

    with torch.no_grad():
        for a, b in zip(run("fa3"), run("sdpa")):
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < 1e-2, rel

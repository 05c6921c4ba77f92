"""FP8 (e4m3) decoder projections: the quantize math, device refusal, and the FP8 checkpoint round trip
on the tiny model (emulated on the CPU)."""

from __future__ import annotations

import pytest
import torch

from hidream_serve.engine.checkpoint import load_checkpoint
from hidream_serve.engine.errors import EngineError
from hidream_serve.engine.fp8 import FP8_DTYPE, FP8Linear, dequantize, quantize_rowwise, save_fp8_checkpoint


def test_rowwise_quantize_error_bound():
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitude
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and s.shape == (64, 1) and s.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), 448.0))  # each row's amax maps to 448
    rel = (dequantize(q, s) - x).abs() / x.abs().amax(dim=1, keepdim=True)
    assert rel.max() <= 2**-4 + 1e-6  # e4m3: 3 mantissa bits, half-ulp of the largest binade
    zq, zs = quantize_rowwise(torch.zeros(2, 8))
    assert torch.isfinite(zs).all() and (dequantize(zq, zs) == 0).all()


def test_fp8_linear_matches_float_and_fuses():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(128, n) for n in (64, 32)]
    x = torch.randn(3, 5, 128)
    parts = [FP8Linear.from_linear(lin) for lin in lins]
    for p in parts:
        p.emulate = True
    ref = torch.cat([lin(x) for lin in lins], dim=-1)
    out = torch.cat([p(x) for p in parts], dim=-1)
    fused = FP8Linear.concat(parts)(x)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05
    assert torch.equal(fused, out)


def test_fp8_refused_on_cpu_naming_quantize_and_device(tiny_dir):
    with pytest.raises(EngineError, match=r"quantize.*device cpu"):
        load_checkpoint(tiny_dir, quantize="fp8")


def test_checkpoint_round_trip(tiny_dir, tmp_path):
    at_load = load_checkpoint(tiny_dir, quantize="fp8", fp8_emulate=True)
    out = tmp_path / "fp8"
    save_fp8_checkpoint(at_load.model, tiny_dir, out)
    with pytest.raises(EngineError, match="quantize"):
        load_checkpoint(out)  # an FP8 checkpoint is refused on the CPU too
    stored = load_checkpoint(out, fp8_emulate=True)
    a, b = at_load.model.state_dict(), stored.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    proj = stored.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(proj, FP8Linear) and proj.weight.dtype == FP8_DTYPE
    # the same network output, and close to the unquantized one
    plain = load_checkpoint(tiny_dir).model
    x = torch.randn(1, 7, plain.config.text_config.hidden_size)
    layer = lambda m: m.model.language_model.layers[0].mlp  # noqa: E731
    for model in (at_load.model, stored.model, plain):
        model.fuse_projections(True)
    y_q, y_s, y_p = layer(at_load.model)(x), layer(stored.model)(x), layer(plain)(x)
    assert torch.equal(y_q, y_s)
    assert (y_q - y_p).norm() / y_p.norm() < 0.1


def test_quantize_skips_layers_and_projections_and_unfuses_bf16(tiny_dir):
    from hidream_serve.engine.fp8 import quantize_decoder

    model = load_checkpoint(tiny_dir).model
    model.fuse_projections(True)  # a fused bf16 model: its fused tensors must go
    layers = model.model.language_model.layers
    quantize_decoder(model, emulate=True, skip_layers={0}, skip_projections=("down_proj",))
    assert all(isinstance(getattr(layers[0].self_attn, n), torch.nn.Linear) for n in ("q_proj", "o_proj"))
    assert isinstance(layers[1].self_attn.q_proj, FP8Linear) and isinstance(layers[1].mlp.up_proj, FP8Linear)
    assert all(isinstance(layer.mlp.down_proj, torch.nn.Linear) for layer in layers)
    assert layers[1].self_attn.qkv_weight is None and layers[1].mlp.gate_up is None
    model.fuse_projections(True)  # the FP8 layers fuse as FP8, the skipped one as bf16
    assert layers[1].self_attn.qkv_fp8 is not None and layers[0].self_attn.qkv_weight is not None
    x = torch.randn(1, 5, model.config.text_config.hidden_size)
    assert torch.isfinite(layers[1].mlp(x)).all()
    with pytest.raises(ValueError, match="fused together"):
        quantize_decoder(model, emulate=True, skip_projections=("q_proj",))
    with pytest.raises(ValueError, match="unknown"):
        quantize_decoder(model, emulate=True, skip_projections=("lm_head",))

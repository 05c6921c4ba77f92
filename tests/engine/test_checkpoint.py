"""Loading the official checkpoint layout: sharded, legacy config, strict weights, real special tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hidream_serve.engine.checkpoint import load_checkpoint
from hidream_serve.engine.errors import CheckpointError
from hidream_serve.tiny import write_tiny_checkpoint


def test_sharded_equals_single(tiny_dir, tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=0, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    a = load_checkpoint(tiny_dir).model.state_dict()
    b = load_checkpoint(sharded).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_config_and_real_layout(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and "rope_scaling" in cfg["text_config"]
    keys = load_file(str(tiny_dir / "model.safetensors")).keys()
    for k in ("model.x_embedder.proj1.weight", "model.x_embedder.proj2.bias", "model.t_embedder1.mlp.0.weight",
              "model.t_embedder1.mlp.2.bias", "model.final_layer2.linear.weight", "lm_head.weight",
              "model.language_model.layers.0.self_attn.q_norm.weight", "model.visual.deepstack_merger_list.0.norm.weight"):  # fmt: skip
        assert k in keys, k
    ck = load_checkpoint(tiny_dir)
    rope = ck.model.model.language_model.rotary_emb
    assert rope.mrope_section == [4, 2, 2]
    assert ck.model.config.text_config.rope_parameters["rope_theta"] == 5000000


def test_lm_head_is_not_loaded(tiny_dir):
    model = load_checkpoint(tiny_dir).model
    assert not any("lm_head" in k for k in model.state_dict())


def test_every_weight_comes_from_the_file(tiny_dir):
    ref = load_file(str(tiny_dir / "model.safetensors"))
    sd = load_checkpoint(tiny_dir).model.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, ref[k].float()), k
        assert (v != 0).all(), f"{k} has zeros"


def test_special_tokens_come_from_tokenizer(tiny_dir):
    ck = load_checkpoint(tiny_dir)
    tok = ck.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|boi_token|>", "<|bor_token|>", "<|eor_token|>",
                                                       "<|bot_token|>", "<|tms_token|>", "<|image_pad|>")}  # fmt: skip
    assert ids == {"<|boi_token|>": 151669, "<|bor_token|>": 151670, "<|eor_token|>": 151671,
                   "<|bot_token|>": 151672, "<|tms_token|>": 151673, "<|image_pad|>": 151655}  # fmt: skip


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_is_an_error(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.final_layer2.linear.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 weights.*final_layer2.linear.bias"):
        load_checkpoint(d)


def test_unexpected_and_misshaped_weights_are_errors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "u")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.extra.weight"] = torch.ones(2)
    sd["model.x_embedder.proj2.bias"] = torch.ones(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert "model.extra.weight" in str(e.value) and "model.x_embedder.proj2.bias" in str(e.value)


def test_missing_files_are_errors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "f")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "nowhere")


def test_bfloat16_load(tiny_dir):
    model = load_checkpoint(tiny_dir, dtype=torch.bfloat16).model
    assert model.dtype == torch.bfloat16


def test_every_module_moves_the_output(tiny_dir):
    """Perturbing any module of the tiny model changes the prediction (nothing is dead weight)."""
    from hidream_serve.engine.params import GenerationParams
    from hidream_serve.engine.pipeline import HiDreamPipeline
    from tests.conftest import make_image

    pipe = HiDreamPipeline.from_pretrained(tiny_dir, fuse=False)
    p = GenerationParams(mode="ip", prompt="x", refs=[make_image(64, 64)], width=64, height=64, exact_size=True,
                         steps=1, guidance=1.0)  # fmt: skip

    def predict():
        prep = pipe.prepare(p)
        z = torch.zeros(1, 4, 3072)
        ropes = [pipe.model.gen_rope(c.gen_positions[:, None]) for c in prep.cond.captions]
        return pipe._predict(prep, z, prep.cond.ref_patches, torch.tensor([0.5]), ropes)[0]

    base = predict()
    m = pipe.model.model
    modules = {
        "visual.merger": m.visual.merger, "visual.deepstack_merger_list.2": m.visual.deepstack_merger_list[2],
        "visual.patch_embed": m.visual.patch_embed, "visual.pos_embed": m.visual.pos_embed,
        "language_model.layers.3": m.language_model.layers[3], "t_embedder1": m.t_embedder1,
        "x_embedder": m.x_embedder, "final_layer2": m.final_layer2, "language_model.norm": m.language_model.norm,
        "language_model.embed_tokens": m.language_model.embed_tokens,
    }  # fmt: skip
    for name, mod in modules.items():
        saved = {k: v.clone() for k, v in mod.state_dict().items()}
        with torch.no_grad():
            for prm in mod.parameters():
                prm.mul_(1.5).add_(0.01)
        moved = (predict() - base).abs().max().item()
        mod.load_state_dict(saved)
        assert moved > 1e-4, f"{name} does not affect the output"


def test_fused_projections_match_separate(tiny_dir):
    from hidream_serve.engine.params import GenerationParams
    from hidream_serve.engine.pipeline import HiDreamPipeline

    p = GenerationParams(mode="t2i", prompt="x", width=64, height=64, exact_size=True, steps=2)
    a = HiDreamPipeline.from_pretrained(tiny_dir, fuse=False)(p, [1]).candidates[0].image
    fused = HiDreamPipeline.from_pretrained(tiny_dir, fuse=True)
    b = fused(p, [1]).candidates[0].image
    import numpy as np

    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    attn = fused.model.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()

"""The full-size HiDream-O1-Image architecture with random bf16 weights, for benchmarks.

Qwen3-VL-8B text decoder (36 layers, hidden 4096, 32 heads / 8 KV heads, head_dim 128, intermediate
12288, rope theta 5e6, interleaved mrope 24/20/20), the 27-layer vision tower with DeepStack at 8/16/24,
and the pixel heads. The weights are drawn on the device in seconds, so the cost of every kernel is the
real cost without downloading 16 GB. The model spec `random:full-size` makes a generator replica serve it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .engine.checkpoint import LoadedCheckpoint, build_model, load_config_dict, load_tokenizer
from .engine.pipeline import HiDreamPipeline
from .engine.vlm_inputs import VisionPreprocessConfig
from .tiny import config_dict, scale_init, write_processor_files, write_tokenizer_files

RANDOM_FULL_SPEC = "random:full-size"

FULL_TEXT = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, rope_theta=5000000,
    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
)  # fmt: skip
FULL_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)  # fmt: skip


def random_full_model(device: torch.device, dtype=torch.bfloat16):
    cfg = load_config_dict(config_dict(FULL_TEXT, FULL_VISION))
    model = build_model(cfg, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    hidden = cfg.text_config.hidden_size
    state = {}
    for key, ref in model.state_dict().items():
        noise = torch.randn(tuple(ref.shape), generator=gen, device=device, dtype=torch.float32)
        state[key] = scale_init(key, noise, hidden, bias_std=0.02, norm_std=0.05).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), cfg


def tokenizer_dir() -> Path:
    """Tokenizer, chat template and processor files (the real special-token ids) for the random model."""
    d = Path(tempfile.mkdtemp(prefix="hidream-random-full-"))  # one per process: replicas may share a host
    write_tokenizer_files(d)
    write_processor_files(d)
    return d


def make_pipeline(model, tok_dir: Path, **options) -> HiDreamPipeline:
    ck = LoadedCheckpoint(model, load_tokenizer(tok_dir), VisionPreprocessConfig.from_dir(tok_dir), tok_dir)
    return HiDreamPipeline(ck, **options)


def random_full_pipeline(device="cuda", dtype=torch.bfloat16, **options) -> HiDreamPipeline:
    model, _ = random_full_model(torch.device(device), dtype)
    return make_pipeline(model, tokenizer_dir(), **options)

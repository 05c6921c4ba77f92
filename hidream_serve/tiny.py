"""Build a tiny random-weight HiDream-O1-Image checkpoint in exactly the official on-disk layout.

It is the embedded default model (the service starts on a laptop CPU with nothing downloaded) and
the fixture of the tests: stock `qwen3_vl` config in the legacy transformers-4.57 form, safetensors
with the real key names (including the unused `lm_head.weight`), a byte-level tokenizer whose
special tokens sit at the real Qwen3-VL / HiDream ids, a Qwen3-VL-style chat template, and the
real processor configs. Every weight is random and nonzero, scaled so that every module (the
DeepStack mergers and pixel heads included) moves the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

# Special tokens of the Qwen3-VL tokenizer from id 151643 on, then HiDream's five (151669-151673).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|boi_token|>", "<|bor_token|>", "<|eor_token|>", "<|bot_token|>", "<|tms_token|>",
)  # fmt: skip
FIRST_SPECIAL_ID = 151643
NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}  # fmt: skip
VOCAB_SIZE = 151936

# Qwen3-VL's chat format. transformers renders templates with trim_blocks/lstrip_blocks, so every
# newline that must appear in the output is written as an expression.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    rope_theta=5000000, rms_norm_eps=1e-6, max_position_embeddings=262144,
)  # fmt: skip
TINY_VISION = dict(
    depth=4, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
    deepstack_visual_indexes=[0, 1, 2], out_hidden_size=64,
)  # fmt: skip


def config_dict(text: dict | None = None, vision: dict | None = None) -> dict:
    """A stock qwen3_vl config.json as transformers 4.57 writes it (legacy `rope_scaling`)."""
    text_cfg = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen3_vl_text",
        "use_cache": True, "vocab_size": VOCAB_SIZE, **TINY_TEXT, **(text or {}),
    }  # fmt: skip
    vision_cfg = {
        "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02, "model_type": "qwen3_vl",
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, **TINY_VISION, **(vision or {}),
    }  # fmt: skip
    vision_cfg["out_hidden_size"] = text_cfg["hidden_size"]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
        "text_config": text_cfg, "tie_word_embeddings": False, "transformers_version": "4.57.1",
        "video_token_id": 151656, "vision_config": vision_cfg, "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }  # fmt: skip


def scale_init(key: str, noise: torch.Tensor, hidden: int, bias_std: float = 0.05, norm_std: float = 0.1):
    """Standard-normal `noise` scaled for the weight named `key`, so activations stay O(1) through the
    network: small biases, norm scales near 1, embeddings at 0.5, fan-in scaling for linears and convs."""
    shape = noise.shape
    if key.endswith("bias"):
        return bias_std * noise
    if len(shape) == 1:  # norm scales
        return 1.0 + norm_std * noise
    if "embed_tokens" in key or "pos_embed" in key or key == "lm_head.weight":
        return 0.5 * noise
    if "final_layer2" in key:
        return noise * (0.6 / math.sqrt(hidden))
    return noise / math.sqrt(math.prod(shape[1:]))


def random_state_dict(config_json: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every key of the architecture (plus lm_head), in bfloat16 like the release."""
    from .engine.checkpoint import build_model, load_config_dict

    config = load_config_dict(config_json)
    shapes = {k: tuple(v.shape) for k, v in build_model(config, torch.device("cpu"), torch.float32).state_dict().items()}
    hidden = config.text_config.hidden_size
    shapes["lm_head.weight"] = (config.text_config.vocab_size, hidden)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        t = scale_init(key, torch.randn(shapes[key], generator=gen), hidden)
        t = t.to(torch.bfloat16)
        t[t == 0] = 1e-3  # every weight nonzero
        out[key] = t.contiguous()
    return out


def write_tokenizer_files(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    # Unused filler entries keep ids contiguous, so the special tokens land on their real ids.
    i = 0
    while len(vocab) < FIRST_SPECIAL_ID:
        vocab[f"\u0120\u0120unused{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    added = {
        str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": t not in NON_SPECIAL}
        for i, t in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    tokenizer_config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 262144, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def write_processor_files(out: Path) -> None:
    pre = {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
    }  # fmt: skip
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def write_tiny_checkpoint(out: str | Path, seed: int = 0, shards: int = 1, text: dict | None = None,
                          vision: dict | None = None) -> Path:  # fmt: skip
    """Write the checkpoint directory; `shards` > 1 writes an index and several safetensors files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_dict(text, vision)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = random_state_dict(cfg, seed)
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata=meta)
    else:
        keys = sorted(state)
        per = math.ceil(len(keys) / shards)
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
            save_file(part, str(out / name), metadata=meta)
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tokenizer_files(out)
    write_processor_files(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643]}))
    return out

"""Load a HiDream-O1-Image checkpoint directory in the official layout.

- `config.json`: stock `qwen3_vl` config (the legacy `rope_scaling` form is converted by transformers);
- weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- tokenizer files with the chat template, and `preprocessor_config.json`.

Every weight the network needs must be present with the right shape; `lm_head.weight` (text
generation only) is skipped and never leaves the disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen3VLConfig

from .errors import CheckpointError
from .fp8 import FP8_DTYPE, FP8Linear, QUANTIZE_FILE, check_fp8_device, quantize_decoder
from .network import HiDreamO1
from .vlm_inputs import VisionPreprocessConfig

UNUSED_PREFIXES = ("lm_head.",)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(directory: str | Path) -> Qwen3VLConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    return load_config_dict(raw, str(path))


def load_config_dict(raw: dict, source: str = "config") -> Qwen3VLConfig:
    if raw.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, expected 'qwen3_vl'")
    config = Qwen3VLConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def weight_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    index = d / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return [d / s for s in shards]
    if (d / WEIGHTS_FILE).is_file():
        return [d / WEIGHTS_FILE]
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_weights(model: HiDreamO1, directory: str | Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill the (meta-initialised) model from the checkpoint; strict about names and shapes."""
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(UNUSED_PREFIXES):
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}")
                    continue
                keep = expected[key].dtype == FP8_DTYPE or key.endswith(".weight_scale")  # FP8 checkpoint
                loaded[key] = tensor.to(device=device, dtype=expected[key].dtype if keep else dtype)
    missing = sorted(set(expected) - set(loaded))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weights, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} weights, e.g. {sorted(unexpected)[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped weights: {mismatched[:5]}")
    if problems:
        raise CheckpointError(f"{directory}: " + "; ".join(problems))
    model.load_state_dict(loaded, strict=True, assign=True)


def _non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", set()):
            out[f"{mod_name}.{name}" if mod_name else name] = getattr(mod, name)
    return out


def build_model(config: Qwen3VLConfig, device: torch.device, dtype: torch.dtype) -> HiDreamO1:
    """Instantiate without allocating parameter storage; the loader fills every weight.

    Non-persistent buffers (rope inverse frequencies) are computed on CPU in float32 and moved.
    """
    with torch.device("meta"):
        model = HiDreamO1(config)
    reference = None
    for name, buf in _non_persistent_buffers(model).items():
        if buf.is_meta:
            if reference is None:
                with torch.device("cpu"):
                    reference = _rope_buffers(config)
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            setattr(mod, attr, reference[name].to(device))
    return model


def _rope_buffers(config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextRotaryEmbedding,
        Qwen3VLVisionRotaryEmbedding,
    )

    text = Qwen3VLTextRotaryEmbedding(config.text_config)
    vision = Qwen3VLVisionRotaryEmbedding(config.vision_config)
    out = {}
    for prefix, mod in (("model.language_model.rotary_emb", text), ("model.visual.rotary_pos_emb", vision)):
        for name, buf in mod.named_buffers():
            out[f"{prefix}.{name}"] = buf.float()
    return out


@dataclass
class LoadedCheckpoint:
    model: HiDreamO1
    tokenizer: object
    vision_cfg: VisionPreprocessConfig
    path: Path


def load_tokenizer(directory: str | Path):
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise CheckpointError(f"{directory}: cannot load tokenizer: {e}") from e
    if not getattr(tok, "chat_template", None):
        template = Path(directory) / "chat_template.json"
        if template.is_file():
            tok.chat_template = json.loads(template.read_text())["chat_template"]
        else:
            raise CheckpointError(f"{directory}: tokenizer has no chat template")
    return tok


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    fp8_emulate: bool = False,
):
    """`quantize="fp8"`: decoder projections in FP8, quantized at load from a bf16 checkpoint, or read as they
    are from one written by `hidream-serve quantize` (which loads as fp8 whatever `quantize` says).
    `fp8_emulate` lets fp8 run on devices without FP8 tensor cores (tests only)."""
    directory = Path(directory)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantize not in (None, "fp8"):
        raise CheckpointError(f"quantize must be 'fp8' or unset, got {quantize!r}")
    stored_fp8 = (directory / QUANTIZE_FILE).is_file()
    if (quantize or stored_fp8) and not fp8_emulate:
        check_fp8_device(device)
    config = load_config(directory)
    model = build_model(config, device, dtype)
    if stored_fp8:
        quantize_decoder(model, emulate=fp8_emulate)  # meta FP8 modules: the checkpoint fills them
        for mod in model.modules():
            if isinstance(mod, FP8Linear):
                mod.out_dtype = dtype
    load_weights(model, directory, device, dtype)
    if quantize and not stored_fp8:
        quantize_decoder(model, emulate=fp8_emulate)
    model.eval().requires_grad_(False)
    if not (directory / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{directory}: no preprocessor_config.json")
    return LoadedCheckpoint(model, load_tokenizer(directory), VisionPreprocessConfig.from_dir(directory), directory)

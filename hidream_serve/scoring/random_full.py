"""Full-size scorers with random weights, for benchmarks: the model spec `random:full-size` for any scorer.

PickScore_v1 (a CLIP-ViT-H/14), CLIP-ViT-L/14 and DINOv2-base are built from their published configs
(transformers config objects, random init on the target device, nothing read or downloaded), so every
forward costs what the real one costs. The tokenizer is the tiny byte-level BPE of the embedded CLIP
(prompts tokenize into more pieces than with CLIP's 49408-token vocabulary, still cut at 77 tokens); the
image processors are the real ones' settings (224 crops; PIL backend). The scores themselves mean nothing.
torch is imported only to build: the spec check is torch-free (the services import it).
"""

from __future__ import annotations

import math

RANDOM_FULL_SPEC = "random:full-size"

CLIP_VOCAB = 49408
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, which yuvalkirstain/PickScore_v1 fine-tunes
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      max_position_embeddings=77, hidden_act="gelu")  # fmt: skip
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu")  # fmt: skip
PICKSCORE_PROJECTION = 1024
# openai/clip-vit-large-patch14
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu")  # fmt: skip
CLIP_L_PROJECTION = 768
# facebook/dinov2-base
DINO_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518,
                 patch_size=14, layerscale_value=1.0)  # fmt: skip


def is_random_full(spec) -> bool:
    return str(spec) == RANDOM_FULL_SPEC


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    from .clip import _tiny_bpe

    vocab, merges = _tiny_bpe()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)


def _build(model_cls, config, device, dtype):
    """Random init on the device itself (seconds on a GPU), in float32, then cast."""
    import torch

    torch.manual_seed(0)
    with device:
        model = model_cls(config)
    return model.to(dtype).eval().requires_grad_(False)


def _clip_model(text: dict, vision: dict, projection: int, device, dtype, logit_scale=None):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from .pickscore import CLIP_H_PREPROCESS

    tokenizer = _tiny_tokenizer()
    eos = tokenizer.eos_token_id
    text_cfg = {**text, "vocab_size": CLIP_VOCAB, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
                "pad_token_id": eos, "projection_dim": projection}  # fmt: skip
    extra = {} if logit_scale is None else {"logit_scale_init_value": logit_scale}
    config = CLIPConfig(text_config=text_cfg, vision_config={**vision, "projection_dim": projection},
                        projection_dim=projection, **extra)  # fmt: skip
    return _build(CLIPModel, config, device, dtype), tokenizer, CLIPImageProcessorPil(**CLIP_H_PREPROCESS)


def random_full_model(name: str, device: str = "cpu", dtype=None):
    """(model, tokenizer or None, image processor) of scorer `name` ("pickscore", "clip" or "dino"), full size,
    random weights (float16 on CUDA, else float32, unless `dtype`)."""
    import torch

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if name == "pickscore":
        return _clip_model(PICKSCORE_TEXT, PICKSCORE_VISION, PICKSCORE_PROJECTION, device, dtype, math.log(100.0))
    if name == "clip":
        return _clip_model(CLIP_L_TEXT, CLIP_L_VISION, CLIP_L_PROJECTION, device, dtype)
    if name == "dino":
        from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

        from .dino import DINO_PREPROCESS

        return _build(Dinov2Model, Dinov2Config(**DINO_BASE), device, dtype), None, BitImageProcessorPil(**DINO_PREPROCESS)
    raise ValueError(f"no full-size random model for scorer {name!r}")


def random_full_scorer(name: str, device: str = "cpu", dtype=None, batch_size: int = 16):
    """The scorer `name` over `random_full_model`, ready to score."""
    from .clip import ClipScorer
    from .dino import DinoEmbedder
    from .pickscore import PickScorer

    model, tokenizer, processor = random_full_model(name, device, dtype)
    if name == "dino":
        scorer = DinoEmbedder(model, processor, batch_size=batch_size)
    else:
        scorer = (PickScorer if name == "pickscore" else ClipScorer)(model, tokenizer, processor, batch_size=batch_size)
    scorer.path = RANDOM_FULL_SPEC
    return scorer

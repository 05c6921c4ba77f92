"""PickScore human-preference score: logit_scale.exp() * cosine(text embedding, image embedding).

`yuvalkirstain/PickScore_v1` is a CLIP-H fine-tuned on Pick-a-Pic preferences; it loads as a
`transformers` `CLIPModel` and shares the CLIP code path (`ClipEmbedder`). Its processor is
CLIP-ViT-H-14's (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`): resize the shortest side to 224 (bicubic),
centre-crop 224, OpenAI CLIP mean and std, CLIP BPE tokenizer with 77 tokens. The tokenizer and
`preprocessor_config.json` are read from the PickScore directory, or from a separate processor
directory; without a `preprocessor_config.json` the CLIP-H values above are used (`CLIP_H_PREPROCESS`).

The score is the one of the PickScore paper and model card: the learned temperature times the cosine
(about 18-23 for real images). `write_tiny_pickscore` writes a tiny random one in the same layout.
"""

from __future__ import annotations

import math
from pathlib import Path

from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipEmbedder, write_tiny_clip

# CLIP-ViT-H-14's preprocessor_config.json, as `CLIPImageProcessorPil` constructor kwargs
CLIP_H_PREPROCESS = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                         image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))  # fmt: skip


class PickScorer(ClipEmbedder):
    """Batched PickScore: `score(prompt, images)` -> logit_scale.exp() * cosine per image."""

    default_preprocess = CLIP_H_PREPROCESS

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self._scale = float(model.logit_scale.detach().float().exp().item())  # once: .item() syncs the GPU

    def scale(self) -> float:
        return self._scale


def write_tiny_pickscore(out: str | Path, seed: int = 1) -> Path:
    """A tiny random PickScore: a tiny CLIPModel (same classes and files as PickScore_v1 plus its processor)
    whose logit scale starts at 100, as PickScore_v1's is."""
    return write_tiny_clip(out, seed=seed, logit_scale_init=math.log(100.0))

"""PickScore human-preference score: logit_scale.exp() * cosine(text embedding, image embedding).

`yuvalkirstain/PickScore_v1` is a CLIP-H fine-tuned on Pick-a-Pic preferences; it loads as a
`transformers` `CLIPModel` and shares the CLIP code path (`ClipEmbedder`). Its processor is
CLIP-ViT-H-14's (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`): resize the shortest side to 224 (bicubic),
centre-crop 224, OpenAI CLIP mean and std, CLIP BPE tokenizer with 77 tokens. The tokenizer and
`preprocessor_config.json` are read from the PickScore directory, or from a separate processor
directory; without a `preprocessor_config.json` the CLIP-H values above are used.

The score is the one of the PickScore paper and model card: the learned temperature times the cosine
(about 18-23 for real images). `write_tiny_pickscore` writes a tiny random one in the same layout.
"""

from __future__ import annotations

import math
from pathlib import Path

from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipEmbedder, ClipPreprocess, write_tiny_clip

CLIP_H_PREPROCESS = ClipPreprocess(shortest_edge=224, crop_height=224, crop_width=224, mean=OPENAI_CLIP_MEAN,
                                   std=OPENAI_CLIP_STD, resample=3)  # fmt: skip


class PickScorer(ClipEmbedder):
    """Batched PickScore: `score(prompt, images)` -> logit_scale.exp() * cosine per image."""

    name = "pickscore"
    default_preprocess = CLIP_H_PREPROCESS

    def scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())


def write_tiny_pickscore(out: str | Path, seed: int = 1) -> Path:
    """A tiny random PickScore: a tiny CLIPModel (same classes and files as PickScore_v1 plus its processor)
    whose logit scale starts at 100, as PickScore_v1's is."""
    return write_tiny_clip(out, seed=seed, logit_scale_init=math.log(100.0))

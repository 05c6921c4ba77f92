"""DINOv2 image embeddings for reference fidelity: the CLS token of `transformers` `Dinov2Model`.

Loads from a local directory in the Hugging Face layout (e.g. a snapshot of `facebook/dinov2-base`);
nothing is downloaded. Its `preprocessor_config.json` (`BitImageProcessor`: resize the shortest side
to 256 bicubic, centre-crop 224, ImageNet mean and std) is applied by transformers' own processor with
the PIL backend (`BitImageProcessorPil`), so no torchvision is needed; loading, preprocessing and
batching are CLIP's (clip.py). `write_tiny_dino` writes a tiny random DINOv2 in the same layout for
tests and the embedded default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .clip import embed_batches, load_image_processor, load_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# facebook/dinov2-*'s preprocessor_config.json, as `BitImageProcessorPil` constructor kwargs: used without one
DINO_PREPROCESS = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                       image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))  # fmt: skip


class DinoEmbedder:
    """`embed_images(images)` -> (N, D) unit CLS embeddings, `batch_size` images per forward."""

    def __init__(self, model, preprocess, batch_size: int = 16, path: Path | None = None):
        self.model = model
        self.preprocess = preprocess  # a transformers image processor
        self.batch_size = batch_size
        self.path = path

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, batch_size: int = 16) -> DinoEmbedder:  # fmt: skip
        from transformers import BitImageProcessorPil, Dinov2Model

        directory = Path(directory)
        model = load_model(Dinov2Model, directory, device, dtype, what="DINOv2")
        # a config without mean/std means ImageNet's (DINOv2's), not BitImageProcessor's OpenAI CLIP defaults
        path = directory / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        imagenet = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
        overrides = {k: v for k, v in imagenet.items() if k not in cfg}
        preprocess = load_image_processor(directory, BitImageProcessorPil, DINO_PREPROCESS, **overrides)
        return cls(model, preprocess, batch_size=batch_size, path=directory)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_batches(self.model, self.preprocess, images, self.batch_size,
                             lambda px: self.model(pixel_values=px).pooler_output,  # layer-normed CLS token
                             int(self.model.config.hidden_size))  # fmt: skip


TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
                 patch_size=8)  # fmt: skip


def write_tiny_dino(out: str | Path, seed: int = 2) -> Path:
    """A tiny random DINOv2 in Hugging Face layout: config.json, model.safetensors, preprocessor_config.json."""
    from transformers import Dinov2Config, Dinov2Model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**TINY_DINO)).eval()
    model.save_pretrained(str(out))
    edge = TINY_DINO["image_size"]
    pre = {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": edge * 8 // 7},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": edge, "width": edge}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out

"""DINOv2 image embeddings for reference fidelity: the CLS token of `transformers` `Dinov2Model`.

Loads from a local directory in the Hugging Face layout (e.g. a snapshot of `facebook/dinov2-base`);
nothing is downloaded. Its `preprocessor_config.json` (`BitImageProcessor`: resize the shortest side
to 256 bicubic, centre-crop 224, ImageNet mean and std) is applied by the same PIL/torch code as CLIP's
(`ImagePreprocess`), so no torchvision is needed. `write_tiny_dino` writes a tiny random DINOv2 in the
same layout for tests and the embedded default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .clip import ImagePreprocess, ModelHolder, ScorerLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoEmbedder(ModelHolder):
    """`embed_images(images)` -> (N, D) unit CLS embeddings, `batch_size` images per forward."""

    name = "dino"

    def __init__(self, model, preprocess: ImagePreprocess, batch_size: int = 16, path: Path | None = None):
        self.model = model
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.path = path

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, batch_size: int = 16) -> DinoEmbedder:  # fmt: skip
        from transformers import Dinov2Model

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ScorerLoadError(f"{directory}: no config.json (expected a DINOv2 model in Hugging Face layout)")
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        try:
            model = Dinov2Model.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
        except Exception as e:
            raise ScorerLoadError(f"{directory}: cannot load DINOv2: {type(e).__name__}: {e}") from e
        path = directory / "preprocessor_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg.setdefault("image_mean", list(IMAGENET_MEAN))
            cfg.setdefault("image_std", list(IMAGENET_STD))
            preprocess = ImagePreprocess.from_dict(cfg)
        else:  # facebook/dinov2-* values
            preprocess = ImagePreprocess(shortest_edge=256, crop_height=224, crop_width=224, mean=IMAGENET_MEAN,
                                         std=IMAGENET_STD, resample=3)  # fmt: skip
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, preprocess, batch_size=batch_size, path=directory)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess.batch(images[start : start + self.batch_size]).to(self.device, self.dtype)
            cls_token = self.model(pixel_values=pixels).pooler_output  # layer-normed CLS token
            chunks.append(torch.nn.functional.normalize(cls_token.float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, int(self.model.config.hidden_size))


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

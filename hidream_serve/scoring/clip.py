"""CLIP prompt-image alignment (CLIPScore-style): 100 * cosine(text embedding, image embedding).

Loads a `transformers` `CLIPModel` and its tokenizer from a local directory in the Hugging Face layout
(e.g. a snapshot of `openai/clip-vit-large-patch14`); nothing is downloaded. The image preprocessing
is CLIP's own, written here in PIL/torch so no torchvision is needed: resize the shortest side to
`size.shortest_edge` (bicubic), centre-crop to `crop_size`, scale to [0, 1], normalise with the
directory's `preprocessor_config.json` mean and std.

`ClipEmbedder` is the shared core (model, tokenizer, preprocessing, batched normalised embeddings);
`ClipScorer` here and `PickScorer` (pickscore.py) put their own scale on its cosine. `ClipPreprocess` is
also the DINOv2 preprocessing (`BitImageProcessor` does the same resize, crop and normalisation).

`write_tiny_clip` builds a tiny random CLIP in the same layout (config, safetensors weights, a real
byte-level BPE CLIP tokenizer, preprocessor config) for tests and the embedded default.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


class ScorerLoadError(RuntimeError):
    """The scorer directory is missing files or does not hold a CLIP model."""


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP image preprocessing as `CLIPImageProcessor` does it, from `preprocessor_config.json`."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> ClipPreprocess:
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            if "shortest_edge" in size:
                short = int(size["shortest_edge"])
            else:  # {"height": h, "width": w}: CLIP checkpoints use squares; take the smaller side
                short = int(min(size.get("height", 224), size.get("width", 224)))
        else:
            short = int(size)
        crop = cfg.get("crop_size", short)
        ch, cw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(
            shortest_edge=short, crop_height=ch, crop_width=cw,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            resample=int(cfg.get("resample", 3)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_resize=bool(cfg.get("do_resize", True)), do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
        )  # fmt: skip

    @classmethod
    def from_dir(cls, directory: str | Path) -> ClipPreprocess:
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise ScorerLoadError(f"{directory}: no preprocessor_config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def image(self, img: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, crop_h, crop_w) float32."""
        img = img.convert("RGB")
        if self.do_resize:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            if size != img.size:
                img = img.resize(size, resample=_PIL_RESAMPLE.get(self.resample, Image.BICUBIC))
        x = np.asarray(img, dtype=np.float32)  # (H, W, 3)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_height, self.crop_width)
        x = x * self.rescale_factor
        if self.do_normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.image(im) for im in images])


ImagePreprocess = ClipPreprocess  # the same steps serve DINOv2 (dino.py)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Centre crop, zero-padding first if the image is smaller than the crop (as transformers does)."""
    h, w = x.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((ph, pw, x.shape[2]), dtype=x.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[top : top + h, left : left + w] = x
        x, h, w = padded, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


class ModelHolder:
    """Device and dtype of a scorer's `self.model`."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class ClipEmbedder(ModelHolder):
    """The shared CLIP core: a `CLIPModel`, its tokenizer and preprocessing; L2-normalised text and image
    embeddings in batches. `ClipScorer` (CLIPScore) and `PickScorer` (PickScore) differ only in the scale
    they put on the cosine; reference fidelity can fall back on `embed_images`."""

    name = "clip"
    default_preprocess: ClipPreprocess | None = None  # used when the directory has no preprocessor_config.json

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, batch_size: int = 16, path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.path = path
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, batch_size: int = 16,
                        processor_dir: str | Path | None = None):  # fmt: skip
        """Model weights from `directory`; tokenizer and `preprocessor_config.json` from `processor_dir`
        (default: the same directory; PickScore's processor is CLIP-ViT-H-14's and may live apart)."""
        from transformers import AutoTokenizer, CLIPModel

        directory = Path(directory)
        proc = Path(processor_dir) if processor_dir else directory
        if not (directory / "config.json").is_file():
            raise ScorerLoadError(f"{directory}: no config.json (expected a CLIP model in Hugging Face layout)")
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        try:
            model = CLIPModel.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
        except Exception as e:
            raise ScorerLoadError(f"{directory}: cannot load CLIP: {type(e).__name__}: {e}") from e
        # transformers builds an empty tokenizer from config.json alone (every word -> unknown): insist on files
        if not any((proc / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise ScorerLoadError(f"{proc}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                                  "for PickScore, point the processor directory at CLIP-ViT-H-14's files")  # fmt: skip
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
        except Exception as e:
            raise ScorerLoadError(f"{proc}: cannot load the CLIP tokenizer: {type(e).__name__}: {e}") from e
        vocab = int(model.config.text_config.vocab_size)
        if not 256 < len(tokenizer) <= vocab:
            raise ScorerLoadError(f"{proc}: the tokenizer has {len(tokenizer)} tokens for a text model of {vocab}")
        if (proc / "preprocessor_config.json").is_file() or cls.default_preprocess is None:
            preprocess = ClipPreprocess.from_dir(proc)
        else:
            preprocess = cls.default_preprocess
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, preprocess, batch_size=batch_size, path=directory)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")  # fmt: skip
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))  # fmt: skip
        emb = self.model.text_projection(out.pooler_output)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit vectors, `batch_size` images per forward."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess.batch(images[start : start + self.batch_size]).to(self.device, self.dtype)
            out = self.model.vision_model(pixel_values=pixels)
            emb = self.model.visual_projection(out.pooler_output)
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, int(self.model.config.projection_dim))

    def scale(self) -> float:
        """What the cosine is multiplied by."""
        return 100.0

    def score_embeddings(self, prompt: str, image_embeds: torch.Tensor) -> list[float]:
        """Scores of images already embedded with `embed_images` (so fidelity can reuse them)."""
        if image_embeds.shape[0] == 0:
            return []
        text = self.embed_text([prompt])  # (1, D)
        return (self.scale() * image_embeds.float().cpu() @ text[0].cpu()).tolist()

    def score(self, prompt: str, images: Sequence[Image.Image]) -> list[float]:
        if not images:
            return []
        return self.score_embeddings(prompt, self.embed_images(images))


class ClipScorer(ClipEmbedder):
    """Batched CLIPScore: `score(prompt, images)` -> one float per image, 100 * cosine similarity."""

    name = "clip"


# -- tiny random CLIP ------------------------------------------------------------------------------

TINY_CORPUS = (
    "a photo of a cat sitting on a red chair in the sun. a dog running on the beach at sunset. "
    "portrait of a woman with long hair, studio lighting, 35mm film. a bowl of fruit on a wooden table. "
    "a city street at night with neon signs and rain. mountains and a lake under a blue sky. "
    "the quick brown fox jumps over the lazy dog. an astronaut riding a horse on the moon. "
    "a watercolor painting of a small house in a green field with flowers and trees. "
    "a man in a black suit and a white shirt standing in front of a building. "
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, projection_dim=16)  # fmt: skip
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8, projection_dim=16)  # fmt: skip


def _tiny_bpe(n_merges: int = 300) -> tuple[dict[str, int], list[str]]:
    """A small byte-level BPE in CLIP's format: 256 byte symbols, the same with `</w>`, learned merges.

    Merges are learned on a fixed corpus with a deterministic tie-break, so the same files come out
    every time (the `tokenizers` trainer breaks ties in hash order).
    """
    from collections import Counter

    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    words: Counter = Counter()
    for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", TINY_CORPUS.lower()):
        chars = [piece for piece, _ in byte_level.pre_tokenize_str(word)][0]
        words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, f in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        merged: Counter = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    # CLIP's layout: bytes, bytes + </w>, merged symbols in merge order, then the two special tokens.
    vocab: dict[str, int] = {}
    for sym in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(sym, len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def write_tiny_clip(out: str | Path, seed: int = 0, logit_scale_init: float | None = None) -> Path:
    """A tiny random CLIP in Hugging Face layout: config.json, model.safetensors, tokenizer, preprocessor.
    `logit_scale_init`: the initial log of the logit scale (CLIP's default when None)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_bpe()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=TINY_TEXT["max_position_embeddings"])
    tokenizer.save_pretrained(str(out))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_cfg = {**TINY_TEXT, "vocab_size": len(vocab), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    extra = {} if logit_scale_init is None else {"logit_scale_init_value": float(logit_scale_init)}
    config = CLIPConfig(text_config=text_cfg, vision_config=dict(TINY_VISION), projection_dim=16, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(str(out))
    pre = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": TINY_VISION["image_size"]}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out

"""CLIP prompt-image alignment (CLIPScore-style): 100 * cosine(text embedding, image embedding).

Loads a `transformers` `CLIPModel`, its tokenizer and its image processor from a local directory in the
Hugging Face layout (e.g. a snapshot of `openai/clip-vit-large-patch14`); nothing is downloaded. The
image preprocessing is transformers' own processor for the directory's `preprocessor_config.json`,
with the PIL backend (`CLIPImageProcessorPil`), so no torchvision is needed.

`ClipEmbedder` (alias `ClipScorer`) is the shared core (model, tokenizer, image processor, batched
normalised embeddings) and CLIPScore itself; `PickScorer` (pickscore.py) puts its own scale on the
cosine. `load_model`, `load_image_processor` and `embed_batches` are shared with DINOv2 (dino.py).

`write_tiny_clip` builds a tiny random CLIP in the same layout (config, safetensors weights, a real
byte-level BPE CLIP tokenizer, preprocessor config) for tests and the embedded default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerLoadError(RuntimeError):
    """The scorer directory is missing files or does not hold the expected model."""


def load_model(model_cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               what: str = "the model"):  # fmt: skip
    """`model_cls.from_pretrained(directory)` offline, in `dtype` (default float16 on CUDA, else float32), on
    `device`, in eval mode without gradients; a missing or unloadable directory -> `ScorerLoadError`."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ScorerLoadError(f"{directory}: no config.json (expected a {what} model in Hugging Face layout)")
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        model = model_cls.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    except Exception as e:
        raise ScorerLoadError(f"{directory}: cannot load {what}: {type(e).__name__}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def load_image_processor(directory: str | Path, processor_class, defaults: dict | None = None, **overrides):
    """transformers' image processor for `directory`'s `preprocessor_config.json` with the PIL backend (no
    torchvision): the class the file names (`AutoImageProcessor`), else `processor_class`; `overrides`
    replace the file's values. Without the file: `processor_class(**defaults)`, or `ScorerLoadError`."""
    directory = Path(directory)
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        if defaults is None:
            raise ScorerLoadError(f"{directory}: no preprocessor_config.json")
        return processor_class(**defaults)
    try:
        cfg = json.loads(path.read_text())
        if "image_processor_type" in cfg or "feature_extractor_type" in cfg:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(str(directory), local_files_only=True, backend="pil",
                                                      **overrides)  # fmt: skip
        return processor_class.from_pretrained(str(directory), local_files_only=True, **overrides)
    except Exception as e:
        raise ScorerLoadError(f"{directory}: cannot load the image processor: {type(e).__name__}: {e}") from e


def pixel_values(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 model input of PIL images (converted to RGB first, alpha dropped)."""
    rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    return processor(images=rgb, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def embed_batches(model, processor, images: Sequence[Image.Image], batch_size: int,
                  features: Callable[[torch.Tensor], torch.Tensor], dim: int) -> torch.Tensor:  # fmt: skip
    """(N, dim) float32 unit vectors: `features(pixels)` of `batch_size` images per forward, L2-normalised."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = pixel_values(processor, images[start : start + batch_size]).to(model.device, model.dtype)
        chunks.append(torch.nn.functional.normalize(features(pixels).float(), dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros(0, dim)


class ClipEmbedder:
    """The shared CLIP core: a `CLIPModel`, its tokenizer and image processor; L2-normalised text and image
    embeddings in batches; CLIPScore (100 * cosine). `PickScorer` (PickScore) differs only in the scale it
    puts on the cosine; reference fidelity can fall back on `embed_images`."""

    # `CLIPImageProcessorPil` constructor kwargs used when the processor directory has no preprocessor_config.json
    default_preprocess: dict | None = None

    def __init__(self, model, tokenizer, preprocess, batch_size: int = 16, path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # a transformers image processor
        self.batch_size = batch_size
        self.path = path
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, batch_size: int = 16,
                        processor_dir: str | Path | None = None):  # fmt: skip
        """Model weights from `directory`; tokenizer and `preprocessor_config.json` from `processor_dir`
        (default: the same directory; PickScore's processor is CLIP-ViT-H-14's and may live apart)."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        directory = Path(directory)
        proc = Path(processor_dir) if processor_dir else directory
        model = load_model(CLIPModel, directory, device, dtype, what="CLIP")
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
        preprocess = load_image_processor(proc, CLIPImageProcessorPil, cls.default_preprocess)
        return cls(model, tokenizer, preprocess, batch_size=batch_size, path=directory)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")  # fmt: skip
        device = self.model.device
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                           attention_mask=tok["attention_mask"].to(device))  # fmt: skip
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)  # pooler_output: projected

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit vectors, `batch_size` images per forward."""
        return embed_batches(self.model, self.preprocess, images, self.batch_size,
                             lambda px: self.model.get_image_features(pixel_values=px).pooler_output,
                             int(self.model.config.projection_dim))  # fmt: skip

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


ClipScorer = ClipEmbedder  # batched CLIPScore: `score(prompt, images)` -> 100 * cosine per image

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

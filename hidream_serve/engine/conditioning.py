"""Turn a prompt and reference images into the model's token layout and 3-D rope positions.

Text sequence of one caption (the "prefix" plus the timestep token):

    chat template( [VLM image]*K + caption ) + <boi> + <tms>

VLM images appear in the text as runs of image-pad tokens. After the text come the generated
tokens: the target image's 32x32 patches, then every reference's patches. Rope positions:

- text tokens count up one by one; a VLM image run takes a (t, h, w) grid offset by the running
  position, after which counting resumes at the grid's maximum + 1 (Qwen3-VL's scheme);
- the target grid is anchored at a fixed position (TARGET_ANCHOR) whatever the prompt length;
- each reference grid starts one past the previous grid's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .errors import InvalidInput
from ..vocabulary import KEEP_ASPECT_EDGE, PATCH_SIZE
from .images import to_patches
from .layout import layout_references, parse_layout_boxes
from .params import GenerationParams
from .resolution import resolve_size
from .sizing import fit_to_area, ref_edge_for, size_for_area
from .vlm_inputs import VisionInputs, VisionPreprocessConfig, prepare_vision_inputs

TARGET_ANCHOR = 4096
VLM_IMAGE_EDGE = 384
UNCOND_CAPTION = " "


def vlm_edge_for(n_refs: int) -> int:
    if n_refs <= 4:
        return VLM_IMAGE_EDGE
    if n_refs <= 8:
        return VLM_IMAGE_EDGE * 48 // 64
    return VLM_IMAGE_EDGE // 2


@dataclass
class SpecialTokens:
    image_pad: int
    vision_start: int
    boi: int
    tms: int

    @classmethod
    def from_tokenizer(cls, tokenizer, config) -> "SpecialTokens":
        def lookup(token: str) -> int:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token} token; is this a HiDream-O1 checkpoint?")
            return int(tid)

        return cls(config.image_token_id, config.vision_start_token_id, lookup("<|boi_token|>"), lookup("<|tms_token|>"))


@dataclass
class CaptionTokens:
    """One caption's prefix ids and the rope positions of prefix and generated tokens."""

    caption: str
    prefix_ids: torch.Tensor  # (P,)
    prefix_positions: torch.Tensor  # (3, P)
    gen_positions: torch.Tensor  # (3, 1 + L_tgt + L_ref): timestep token, target, refs


@dataclass
class Conditioning:
    width: int
    height: int
    target_len: int
    captions: list[CaptionTokens]
    ref_patches: torch.Tensor | None  # (L_ref, 3072) in [-1, 1]
    vision: VisionInputs | None  # VLM inputs of the refs, shared by all captions
    ref_sizes: list[tuple[int, int]] = field(default_factory=list)
    vlm_sizes: list[tuple[int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ref_len(self) -> int:
        return 0 if self.ref_patches is None else int(self.ref_patches.shape[0])


def text_positions(ids: list[int], image_pad: int, image_grids: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """Positions (3, len(ids)) for text with VLM image runs; returns them and the next free position."""
    cols: list[torch.Tensor] = []
    pos, i, img = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_pad:
            cols.append(torch.tensor([[pos]] * 3))
            pos += 1
            i += 1
            continue
        h, w = image_grids[img]
        cols.append(grid_positions(h, w, pos))
        pos += max(h, w)
        i += h * w
        img += 1
    return torch.cat(cols, dim=1), pos


def grid_positions(h: int, w: int, offset: int) -> torch.Tensor:
    """(3, h*w) positions of a one-frame grid in row-major order."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    t = torch.zeros(h * w, dtype=torch.long)
    return torch.stack([t, rows, cols]) + offset


class ConditioningBuilder:
    def __init__(self, tokenizer, config, vision_cfg: VisionPreprocessConfig):
        self.tokenizer = tokenizer
        self.tokens = SpecialTokens.from_tokenizer(tokenizer, config)
        self.vision_cfg = vision_cfg

    # -- sizing ---------------------------------------------------------------------------------

    def _target_size(self, p: GenerationParams, warnings: list[str]) -> tuple[int, int, Image.Image | None]:
        if p.keep_original_aspect:
            ref = fit_to_area(p.refs[0].convert("RGB"), KEEP_ASPECT_EDGE)
            warnings.append(f"keep_original_aspect: output size {ref.width}x{ref.height} taken from the reference")
            return ref.width, ref.height, ref
        w, h, warn = resolve_size(p.width, p.height, p.exact_size)
        if warn:
            warnings.append(warn)
        return w, h, None

    def _reference_images(self, p: GenerationParams, width: int, height: int, preresized):
        """Pixel refs at their final sizes (layout image included) and the VLM copies."""
        if preresized is not None:
            pixel_refs = [preresized]
            n = 1
        else:
            refs = [r.convert("RGB") for r in p.refs]
            boxes = parse_layout_boxes(p.layout_boxes) if p.mode == "layout" else None
            n = len(refs) + (1 if boxes else 0)
            edge = ref_edge_for(n, width, height)
            if boxes:
                refs = layout_references(refs, boxes, width, height, edge)
            pixel_refs = []
            for i, r in enumerate(refs):
                try:
                    pixel_refs.append(fit_to_area(r, edge))
                except ValueError as e:
                    raise InvalidInput(f"refs[{i}]", str(e)) from None
        vlm_edge = vlm_edge_for(n)
        vlm_refs = [r.resize(size_for_area(vlm_edge, r.width / r.height), resample=Image.LANCZOS) for r in pixel_refs]
        for i, r in enumerate(vlm_refs):
            if min(r.size) <= 0:
                raise InvalidInput(f"refs[{i}]", "aspect ratio too extreme")
        return pixel_refs, vlm_refs

    # -- tokens ---------------------------------------------------------------------------------

    def _caption_ids(self, caption: str, n_images: int, tokens_per_image: list[int]) -> list[int]:
        if n_images:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": caption}]
        else:
            content = caption
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        expanded: list[int] = []
        img = 0
        for tid in ids:
            if tid == self.tokens.image_pad:
                expanded.extend([tid] * tokens_per_image[img])
                img += 1
            else:
                expanded.append(tid)
        if img != n_images:
            raise ValueError(f"chat template rendered {img} image slots for {n_images} images")
        return expanded + [self.tokens.boi, self.tokens.tms]

    def _caption(self, caption, vlm_grids, tokens_per_image, tgt_hw, ref_hws) -> CaptionTokens:
        ids = self._caption_ids(caption, len(vlm_grids), tokens_per_image)
        text_pos, _ = text_positions(ids, self.tokens.image_pad, vlm_grids)
        gen = [text_pos[:, -1:], grid_positions(*tgt_hw, TARGET_ANCHOR)]
        nxt = TARGET_ANCHOR + max(tgt_hw)
        for h, w in ref_hws:
            gen.append(grid_positions(h, w, nxt))
            nxt += max(h, w)
        return CaptionTokens(
            caption=caption,
            prefix_ids=torch.tensor(ids[:-1], dtype=torch.long),
            prefix_positions=text_pos[:, :-1].contiguous(),
            gen_positions=torch.cat(gen, dim=1),
        )

    def build(self, p: GenerationParams, with_uncond: bool) -> Conditioning:
        warnings: list[str] = []
        width, height, preresized = self._target_size(p, warnings)
        tgt_hw = (height // PATCH_SIZE, width // PATCH_SIZE)
        captions = [p.prompt] + ([UNCOND_CAPTION] if with_uncond else [])
        if not p.refs:
            caps = [self._caption(c, [], [], tgt_hw, []) for c in captions]
            return Conditioning(width, height, tgt_hw[0] * tgt_hw[1], caps, None, None, warnings=warnings)

        pixel_refs, vlm_refs = self._reference_images(p, width, height, preresized)
        vision = prepare_vision_inputs(vlm_refs, self.vision_cfg)
        m = self.vision_cfg.merge_size
        vlm_grids = [(int(g[1]) // m, int(g[2]) // m) for g in vision.grid_thw]
        ref_hws = [(r.height // PATCH_SIZE, r.width // PATCH_SIZE) for r in pixel_refs]
        caps = [self._caption(c, vlm_grids, vision.tokens_per_image, tgt_hw, ref_hws) for c in captions]
        ref_patches = torch.cat([to_patches(r) for r in pixel_refs])
        return Conditioning(
            width, height, tgt_hw[0] * tgt_hw[1], caps, ref_patches, vision,
            ref_sizes=[r.size for r in pixel_refs],
            vlm_sizes=[(int(g[2]) * self.vision_cfg.patch_size, int(g[1]) * self.vision_cfg.patch_size) for g in vision.grid_thw],
            warnings=warnings,
        )  # fmt: skip

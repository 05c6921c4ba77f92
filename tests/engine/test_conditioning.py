"""Token layout, rope positions, reference tiers, snapping, layout boxes and VLM preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidream_serve.engine.conditioning import (
    TARGET_ANCHOR,
    grid_positions,
    ref_edge_for,
    text_positions,
    vlm_edge_for,
)
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.images import patches_to_uint8, to_patches
from hidream_serve.engine.sizing import fit_to_area, size_for_area
from hidream_serve.engine.layout import BOX_COLORS, parse_layout_boxes, render_layout
from hidream_serve.engine.params import GenerationParams
from hidream_serve.engine.resolution import TRAINED_SIZES, resolve_size, snap_to_trained
from hidream_serve.engine.vlm_inputs import VisionPreprocessConfig, prepare_vision_inputs, smart_resize
from tests.conftest import make_image

PAD = 99


def test_text_positions_with_image_runs():
    # 3 text tokens, a 2x3 image run, 2 text tokens
    ids = [1, 2, 3] + [PAD] * 6 + [4, 5]
    pos, nxt = text_positions(ids, PAD, [(2, 3)])
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    grid = pos[:, 3:9]
    assert grid[0].tolist() == [3] * 6  # t
    assert grid[1].tolist() == [3, 3, 3, 4, 4, 4]  # rows
    assert grid[2].tolist() == [3, 4, 5, 3, 4, 5]  # cols
    assert pos[:, 9:].tolist() == [[6, 7]] * 3 and nxt == 8  # resumes at max + 1


def test_target_anchor_and_refs_follow_previous_grid(pipe):
    p = GenerationParams(mode="ip", prompt="a", refs=[make_image(64, 64), make_image(64, 128, 1)],
                         width=128, height=96, exact_size=True)  # fmt: skip
    cap = pipe.prepare(p).cond.captions[0]
    gen = cap.gen_positions
    assert gen[:, 0].tolist() == [cap.prefix_positions[0, -1].item() + 1] * 3  # tms follows the text
    tgt = gen[:, 1 : 1 + 12]  # 3 x 4 target grid anchored at 4096
    assert torch.equal(tgt, grid_positions(3, 4, TARGET_ANCHOR))
    ref1_start = TARGET_ANCHOR + 4
    # both refs fitted to a 3/4-of-128 edge: first is square
    h1, w1 = (p_ := pipe.prepare(p).cond.ref_sizes)[0][1] // 32, p_[0][0] // 32
    ref1 = gen[:, 13 : 13 + h1 * w1]
    assert torch.equal(ref1, grid_positions(h1, w1, ref1_start))
    assert gen[:, 13 + h1 * w1].tolist() == [ref1_start + max(h1, w1)] * 3


def test_prefix_ends_with_boi_and_tms_comes_from_tokenizer(pipe):
    cap = pipe.prepare(GenerationParams(mode="t2i", prompt="hello", width=64, height=64, exact_size=True)).cond.captions[0]
    tok = pipe.conditioning.tokenizer
    assert cap.prefix_ids[-1].item() == tok.convert_tokens_to_ids("<|boi_token|>")
    assert pipe.conditioning.tokens.tms == 151673
    text = tok.decode(cap.prefix_ids.tolist())
    assert text.startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("n, edge, vlm", [(1, 2048, 384), (2, 1536, 384), (3, 1024, 384), (4, 1024, 384),
                                          (5, 768, 288), (8, 768, 288), (9, 512, 192), (12, 512, 192)])  # fmt: skip
def test_reference_tiers(n, edge, vlm):
    assert ref_edge_for(n, 2048, 1440) == edge
    assert vlm_edge_for(n) == vlm


def test_fit_to_area_is_patch_aligned_and_bounded():
    for w, h, edge in [(640, 480, 256), (4000, 300, 512), (300, 4000, 512), (100, 100, 1024), (2600, 2600, 512)]:
        out = fit_to_area(make_image(w, h), edge)
        assert out.width % 32 == 0 and out.height % 32 == 0
        assert out.width * out.height <= edge * edge
        assert out.width * out.height > 0.6 * edge * edge


def test_size_for_area():
    assert size_for_area(384, 1.0) == (384, 384)
    w, h = size_for_area(384, 16 / 9)
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 384 * 384


def test_patches_roundtrip():
    img = make_image(96, 64)
    p = to_patches(img)
    assert p.shape == (6, 3072) and p.min() >= -1 and p.max() <= 1
    back = patches_to_uint8((p + 1) / 2, 64, 96)
    assert np.abs(back.astype(int) - np.asarray(img, dtype=int)).max() <= 1


def test_snapping():
    assert snap_to_trained(2048, 2048) == (2048, 2048)
    assert snap_to_trained(1920, 1080) == (2560, 1440)
    assert snap_to_trained(1000, 1500) == (1664, 2496)
    assert all(snap_to_trained(w, h) == (w, h) for w, h in TRAINED_SIZES)
    assert resolve_size(2048, 2048, False) == (2048, 2048, None)
    w, h, warn = resolve_size(512, 512, False)
    assert (w, h) == (2048, 2048) and "snapped" in warn
    assert resolve_size(512, 384, True) == (512, 384, None)
    with pytest.raises(InvalidInput) as e:
        resolve_size(500, 512, True)
    assert e.value.field == "width"


def test_layout_parsing_forms_and_errors():
    boxes = parse_layout_boxes({"boxes": [[0.1, 0.5, 0.2, 0.6], {"bbox": [0, 1, 0, 1], "text": "sky"}]})
    assert boxes[0].x2 == 0.5 and boxes[1].text == "sky"
    bad = [
        ([[0.1, 0.5, 0.2]], "layout_boxes[0]"),
        ([[0.1, 0.5, 0.2, 0.6], [0.6, 0.5, 0.2, 0.6]], "layout_boxes[1]"),
        ([[0.1, 0.5, 0.2, 1.6]], "layout_boxes[0]"),
        ([{"text": "x"}], "layout_boxes[0]"),
        ([["a", 0.5, 0.2, 0.6]], "layout_boxes[0]"),
        ([], "layout_boxes"),
        ("not json", "layout_boxes"),
    ]
    for raw, field in bad:
        with pytest.raises(InvalidInput) as e:
            parse_layout_boxes(raw)
        assert e.value.field == field, raw


def test_layout_render_largest_box_first_in_red():
    boxes = parse_layout_boxes([[0.1, 0.3, 0.1, 0.3], [0.4, 0.95, 0.4, 0.95]])
    img, colors = render_layout(boxes, 256, 256)
    assert colors == [BOX_COLORS[1], BOX_COLORS[0]]  # the larger (second) box is drawn first, in red
    a = np.asarray(img)
    assert tuple(a[int(0.4 * 256) + 1, 200]) == BOX_COLORS[0]
    assert tuple(a[5, 5]) == (0, 0, 0)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h, w in [(384, 384), (192, 192), (192, 384), (288, 480), (100, 3000), (1200, 33)]:
        assert smart_resize(h, w, 32, 65536, 16777216) == ref(h, w, factor=32, min_pixels=65536, max_pixels=16777216)


def test_vision_inputs_match_transformers_processor_math():
    """Patch order, temporal duplication and normalisation equal the Qwen2-VL processor's (sizes needing no resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = VisionPreprocessConfig()
    proc = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})  # fmt: skip
    imgs = [make_image(384, 256, 0), make_image(256, 320, 1)]
    ours = prepare_vision_inputs(imgs, cfg)
    theirs = proc(images=imgs, return_tensors="pt")
    assert torch.equal(ours.grid_thw, theirs["image_grid_thw"])
    assert torch.allclose(ours.pixel_values, theirs["pixel_values"].float(), atol=1e-6)
    assert ours.tokens_per_image == [24 * 16 // 4, 16 * 20 // 4]


def test_vision_inputs_upscale_small_images():
    ours = prepare_vision_inputs([make_image(192, 192)], VisionPreprocessConfig())
    assert ours.grid_thw.tolist() == [[1, 16, 16]]  # 192x192 is below min_pixels: upscaled to 256x256

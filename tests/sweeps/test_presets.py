"""Presets and the findings warnings, through the generate validation (`services/router.py:validate`, which
every route uses) on real decoded images; no model needed."""

from __future__ import annotations

import pytest
from tests._images import b64, noise_image

from hidream_serve.api.protocol import Defaults, GenerateRequest, Limits
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LIMITS = Limits(max_refs=12)
DEFAULTS = Defaults(width=2048, height=2048, steps=4)
IMG = b64(noise_image(64, 64, seed=1))
SKELETON = ["face", "background", "pose", "garment", "garment", "garment"]


def refs(roles):
    return [{"image": IMG, **({"role": r} if r else {})} for r in roles]


def run(mode, **body):
    from services.router import validate

    req = GenerateRequest.model_validate({"prompt": "a woman in a red coat", "seed": 1, **body})
    params, seeds, pre = validate(req, mode, LIMITS, DEFAULTS)
    return req, params, pre


def dropped(pre) -> list[str]:
    return [w for w in pre["warnings"] if " dropped: " in w]


def test_tryon_faithful_keeps_all_six_refs_at_shift_1_and_warns_about_their_resolution():
    req, params, pre = run("skeleton", refs=refs(SKELETON), preset="tryon-faithful")
    assert len(params.refs) == 6 and params.shift == 1.0 and params.guidance == 5.0 and params.recipe == "full"
    assert dropped(pre) == []
    assert "6 refs: each ref is resized to 768 px; 4 or fewer keep 1024 px" in " ".join(pre["warnings"])
    assert req.settings_notes("skeleton") == {"preset": "tryon-faithful"}


def test_tryon_natural_drops_the_background_and_pose_refs_naming_them():
    _, params, pre = run("skeleton", refs=refs(SKELETON), preset="tryon-natural")
    assert params.ref_roles == ["face", "garment", "garment", "garment"] and params.shift == 2.0
    assert dropped(pre) == [
        "ref 2 (background, refs[1]) dropped: a background ref locks the composition",
        "ref 3 (pose, refs[2]) dropped: an openpose ref locks the pose and overrides pose instructions in the prompt",
    ]
    assert not any("refs: each ref is resized" in w for w in pre["warnings"])  # 4 refs keep 1024 px


def test_pose_from_prompt_drops_only_the_pose_ref():
    _, params, pre = run("skeleton", refs=refs(SKELETON), preset="pose-from-prompt", prompt="a woman jumping")
    assert params.ref_roles == ["face", "background", "garment", "garment", "garment"] and params.shift == 2.5
    assert dropped(pre) == ["ref 3 (pose, refs[2]) dropped: an openpose ref locks the pose and overrides pose "
                            "instructions in the prompt"]  # fmt: skip
    assert not any("locks the pose, so" in w for w in pre["warnings"])  # the pose ref is gone


def test_outfit_swap_keeps_the_face_only_and_keeps_refs_without_a_role():
    _, params, pre = run("ip", refs=refs(["face", "garment", "background", None]), preset="outfit-swap")
    assert params.ref_roles == ["face", None] and params.shift == 3.0 and params.guidance == 5.0
    assert dropped(pre) == ["ref 2 (garment, refs[1]) dropped: the outfit comes from the prompt",
                            "ref 3 (background, refs[2]) dropped: a background ref locks the composition"]  # fmt: skip
    assert "preset outfit-swap keeps refs with no role as given: ref 4 (no role, refs[3])" in pre["warnings"]


def test_group_shot_keeps_the_faces_in_their_boxes_and_drops_the_background():
    boxes = [[0.0, 0.5, 0.0, 1.0], [0.5, 1.0, 0.0, 1.0]]
    _, params, pre = run("layout", refs=refs(["face", "face", "background"]), preset="group-shot",
                         layout_boxes=boxes, width=1024, height=1024)  # fmt: skip
    assert params.ref_roles == ["face", "face"] and params.shift == 1.0
    assert dropped(pre) == ["ref 3 (background, refs[2]) dropped: a background ref locks the composition"]


def test_every_preset_is_tested_above():
    assert set(PRESETS) == {"tryon-faithful", "tryon-natural", "pose-from-prompt", "outfit-swap", "group-shot"}


def test_explicit_fields_override_the_preset():
    _, params, pre = run("skeleton", refs=refs(SKELETON), preset="tryon-natural", shift=1.5, guidance=4.0)
    assert (params.shift, params.guidance) == (1.5, 4.0)
    _, params, pre = run("skeleton", refs=refs(SKELETON), preset="tryon-natural", recipe="dev")
    assert params.recipe == "dev" and params.shift is None and params.guidance is None
    assert any("its shift and guidance are for the full recipe" in w for w in pre["warnings"])


def test_a_preset_for_another_mode_is_refused_naming_preset():
    with pytest.raises(InvalidInput) as e:
        run("ip", refs=refs(["face"]), preset="tryon-faithful")
    assert e.value.field == "preset" and "skeleton" in str(e.value)


def test_an_unknown_preset_is_a_validation_error_on_preset():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        GenerateRequest.model_validate({"prompt": "x", "preset": "nope"})
    assert e.value.errors()[0]["loc"] == ("preset",)


def test_a_bad_image_is_named_by_its_original_index_and_a_dropped_one_is_never_decoded():
    body = refs(["background", "garment", "face"])
    body[2]["image"] = "bm90IGFuIGltYWdl"
    with pytest.raises(InvalidInput) as e:
        run("ip", refs=body, preset="outfit-swap", prompt="x")
    assert e.value.field == "refs[2].image"
    body = refs(["face", "background", "garment"])
    body[1]["image"] = "bm90IGFuIGltYWdl"  # dropped by the preset
    _, params, _ = run("ip", refs=body, preset="outfit-swap")
    assert params.ref_roles == ["face"]


def test_annotate_refs_names_each_kept_ref_by_number_and_role_in_front_of_the_prompt():
    req, params, _ = run("skeleton", refs=refs(SKELETON), preset="tryon-natural", annotate_refs=True)
    assert params.prompt == ("Image 1 is the face (identity) of the person; image 2 is a garment to wear; image 3 "
                             "is a garment to wear; image 4 is a garment to wear. a woman in a red coat")  # fmt: skip
    assert req.settings_notes("skeleton")["prompt"] == params.prompt


def test_defaults_are_unchanged_without_preset_or_annotation():
    req, params, pre = run("skeleton", refs=refs(["face", "pose"]))
    assert params.prompt == "a woman in a red coat" and params.shift is None and params.guidance is None
    assert params.recipe == "full" and req.settings_notes("skeleton") == {}
    assert pre["warnings"] == []


def test_findings_warn_about_pose_words_with_a_pose_ref_and_guidance_above_5():
    _, _, pre = run("skeleton", refs=refs(["face", "pose"]), prompt="a woman sitting, arms crossed", guidance=7.0)
    text = " | ".join(pre["warnings"])
    assert "ref 2 (pose, refs[1]) locks the pose, so the prompt's pose words (arms crossed, sitting)" in text
    assert "guidance 7 is above 5, the full model's sweet spot" in text
    _, _, pre = run("skeleton", refs=refs(["face", "pose"]), prompt="a woman sitting", recipe="dev", guidance=7.0)
    assert not any("sweet spot" in w for w in pre["warnings"])  # dev: the full model's finding does not apply


@pytest.mark.parametrize("n, edge", [(5, 768), (8, 768), (9, 512)])
def test_the_per_ref_resolution_warning_uses_the_engines_tiers(n, edge):
    from hidream_serve.engine.sizing import ref_edge_for

    _, _, pre = run("ip", refs=refs(["face"] * n))
    assert ref_edge_for(n, 2048, 2048) == edge
    assert f"{n} refs: each ref is resized to {edge} px; 4 or fewer keep 1024 px" in " ".join(pre["warnings"])

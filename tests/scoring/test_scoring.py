"""Scorers and the composite on tiny random models: PickScore, DINOv2 fidelity with roles, quality guard, z-scores."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from tests._images import noise_image, solid_image
from PIL import Image, ImageFilter

from hidream_serve.scoring.clip import ClipEmbedder, ClipScorer, load_image_processor, pixel_values, write_tiny_clip
from hidream_serve.scoring.composite import CompositeScorer, ScoreContext, combine, zscores
from hidream_serve.scoring.dino import DINO_PREPROCESS, IMAGENET_MEAN, IMAGENET_STD, DinoEmbedder, write_tiny_dino
from hidream_serve.scoring.fidelity import effective_roles, fidelity_scores, ref_weights
from hidream_serve.scoring.pickscore import CLIP_H_PREPROCESS, PickScorer, write_tiny_pickscore
from hidream_serve.scoring.quality import exposure, luma, sharpness
from hidream_serve.scoring.settings import DEFAULT_MODE_WEIGHTS, SCORER_NAMES, ModeWeights, RoleWeights


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {"clip": write_tiny_clip(root / "clip", seed=0), "pickscore": write_tiny_pickscore(root / "pick"),
            "dino": write_tiny_dino(root / "dino")}  # fmt: skip


@pytest.fixture(scope="module")
def composite(dirs):
    return CompositeScorer.load(**dirs)


def textured(seed: int, w: int = 64, h: int = 64) -> Image.Image:
    """Smooth random colour fields (noise blurred): distinct images that are not pure noise."""
    return noise_image(w // 8, h // 8, seed).resize((w, h), Image.BICUBIC)


# -- PickScore -----------------------------------------------------------------------------------------------


def test_pickscore_is_logit_scale_times_cosine_as_in_the_model_card(dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, CLIPModel

    scorer = PickScorer.from_pretrained(dirs["pickscore"])
    assert isinstance(scorer, ClipEmbedder) and isinstance(scorer.model, CLIPModel)
    assert isinstance(AutoModel.from_pretrained(str(dirs["pickscore"]), local_files_only=True), CLIPModel)
    images = [textured(i, 40 + 4 * i, 48) for i in range(4)]
    got = scorer.score("a photo of a cat", images)
    m = scorer.model  # the PickScore model card's computation, with our preprocessing and tokenizer
    with torch.no_grad():
        tok = scorer.tokenizer(["a photo of a cat"], padding=True, truncation=True, max_length=77, return_tensors="pt")
        t = m.get_text_features(**tok)
        t = getattr(t, "pooler_output", t)
        v = m.get_image_features(pixel_values=pixel_values(scorer.preprocess, images))
        v = getattr(v, "pooler_output", v)
        t, v = t / t.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
        want = (m.logit_scale.exp() * (t @ v.T))[0]
    assert np.allclose(got, want.numpy(), atol=1e-3)
    assert scorer.scale() == pytest.approx(100.0, rel=1e-4)  # PickScore_v1's temperature; CLIPScore uses 100 too
    assert len({round(s, 4) for s in got}) == 4


def test_pickscore_and_clip_share_one_embedding_core(dirs):
    clip = ClipScorer.from_pretrained(dirs["clip"])
    pick = PickScorer.from_pretrained(dirs["clip"])  # same weights, other head: only the scale differs
    images = [textured(i) for i in range(3)]
    assert torch.equal(clip.embed_images(images), pick.embed_images(images))
    ratio = np.asarray(pick.score("a dog", images)) / np.asarray(clip.score("a dog", images))
    assert np.allclose(ratio, pick.scale() / 100.0, rtol=1e-4)


def test_pickscore_processor_from_another_directory_and_clip_h_default(dirs, tmp_path):
    from transformers import CLIPImageProcessorPil

    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(dirs["pickscore"] / name, weights / name)
    with pytest.raises(Exception, match="tokenizer"):
        PickScorer.from_pretrained(weights)
    proc = tmp_path / "processor"  # tokenizer files only: preprocessing falls back to CLIP-H's 224 crop
    shutil.copytree(dirs["pickscore"], proc, ignore=shutil.ignore_patterns("model.safetensors", "preprocessor*"))
    s = PickScorer.from_pretrained(weights, processor_dir=proc)
    want = CLIPImageProcessorPil(**CLIP_H_PREPROCESS)
    assert s.preprocess.to_dict() == want.to_dict() and s.preprocess.size == {"shortest_edge": 224}
    assert pixel_values(s.preprocess, [solid_image(300, 200)])[0].shape == (3, 224, 224)
    with_pre = PickScorer.from_pretrained(weights, processor_dir=dirs["pickscore"])
    assert with_pre.preprocess.crop_size["height"] == 32


# -- DINOv2 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(90, 60), (61, 97), (20, 50), (640, 480)])
def test_dino_preprocessing_matches_transformers_bit_image_processor(dirs, size, tmp_path):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    cfg = json.loads((dirs["dino"] / "preprocessor_config.json").read_text())
    real = {**cfg, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}  # dinov2-base's
    for i, c in enumerate((cfg, real)):
        hf = BitImageProcessorPil(**{k: v for k, v in c.items() if k != "image_processor_type"})
        img = noise_image(*size, seed=size[1])
        want = np.asarray(hf(images=[img], return_tensors="np")["pixel_values"][0])
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "preprocessor_config.json").write_text(json.dumps(c))
        got = pixel_values(load_image_processor(tmp_path / str(i), BitImageProcessorPil), [img])[0].numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    loaded = DinoEmbedder.from_pretrained(dirs["dino"]).preprocess
    hf = BitImageProcessorPil(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    assert isinstance(loaded, BitImageProcessorPil) and loaded.to_dict() == hf.to_dict()


def test_dino_preprocessing_defaults_are_imagenet_and_dinov2_base(dirs, tmp_path):
    from transformers import BitImageProcessorPil

    no_stats = tmp_path / "no_stats"  # a config without mean/std: DINOv2's ImageNet ones, not Bit's CLIP defaults
    shutil.copytree(dirs["dino"], no_stats)
    cfg = json.loads((no_stats / "preprocessor_config.json").read_text())
    (no_stats / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                                   if k not in ("image_mean", "image_std")}))
    p = DinoEmbedder.from_pretrained(no_stats).preprocess
    assert tuple(p.image_mean) == IMAGENET_MEAN and tuple(p.image_std) == IMAGENET_STD
    bare = tmp_path / "bare"  # no preprocessor_config.json at all: facebook/dinov2-base's values
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(dirs["dino"] / name, bare / name)
    p = DinoEmbedder.from_pretrained(bare).preprocess
    assert p.to_dict() == BitImageProcessorPil(**DINO_PREPROCESS).to_dict() and p.crop_size["height"] == 224
    assert tuple(p.image_mean) == IMAGENET_MEAN and p.size == {"shortest_edge": 256}


def test_dino_embeds_the_cls_token_in_batches(dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import Dinov2Model

    dino = DinoEmbedder.from_pretrained(dirs["dino"], batch_size=2)
    assert isinstance(dino.model, Dinov2Model)
    images = [textured(i, 50 + i, 40) for i in range(5)]
    emb = dino.embed_images(images)
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    with torch.no_grad():
        out = dino.model(pixel_values=pixel_values(dino.preprocess, images))
    cls = torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(emb, cls, atol=1e-5)
    single = torch.cat([dino.embed_images([im]) for im in images])
    assert torch.allclose(emb, single, atol=1e-5)


# -- roles and reference fidelity ------------------------------------------------------------------------------


def test_role_defaults_per_mode():
    assert effective_roles("skeleton", [None] * 6, 6) == ["face", "background", "pose", "garment", "garment",
                                                          "garment"]  # fmt: skip
    assert effective_roles("skeleton", ["garment", None, "face"], 3) == ["garment", "background", "face"]
    assert effective_roles("ip", [], 2) == ["subject", "subject"]
    assert effective_roles("edit", [None], 1) == ["subject"]
    assert ref_weights("skeleton", [None] * 4, 4) == [1.0, 0.0, 0.0, 1.0]
    assert ref_weights("ip", ["face", "style", "background", "pose", None], 5) == [1.0, 0.5, 0.0, 0.0, 1.0]
    assert ref_weights("layout", [None, None], 2) == [1.0, 1.0]  # the drawn layout picture is never passed
    assert ref_weights("t2i", [], 0) == [] and ref_weights("t2i", [None], 1) == [0.0]
    assert ref_weights("ip", ["style"], 1, {"style": 2.0}) == [2.0]


def test_fidelity_is_the_weighted_mean_cosine():
    cand = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert fidelity_scores(cand, refs, [1.0, 0.0]) == pytest.approx([100.0, 0.0])
    assert fidelity_scores(cand, refs, [1.0, 1.0]) == pytest.approx([50.0, 50.0])
    assert fidelity_scores(cand, refs, [0.0, 0.0]) is None


@pytest.mark.parametrize("backend", ["dino", "clip"])
def test_candidate_equal_to_the_face_ref_scores_higher_on_fidelity(dirs, backend):
    models = {"dino": dirs["dino"]} if backend == "dino" else {"clip": dirs["clip"]}
    scorer = CompositeScorer.load(**models)
    face, background, pose = textured(1), textured(2), textured(3)
    candidates = [textured(9), face, background, pose]  # unrelated, the face, the background, the pose
    ctx = ScoreContext("skeleton", [face, background, pose], ["face", "background", "pose"])
    raw, warnings = scorer.raw_scores("a person", candidates, ctx)
    fid = raw["fidelity"]
    assert fid[1] == pytest.approx(100.0, abs=1e-3)  # identical to the face
    assert fid[1] > fid[0] and fid[1] > fid[2] and fid[1] > fid[3]  # looking like the background or pose earns nothing
    assert any("uses clip image embeddings" in w for w in warnings) == (backend == "clip")
    # the same refs without roles: skeleton order face, background, pose
    raw2, _ = scorer.raw_scores("a person", candidates, ScoreContext("skeleton", [face, background, pose], []))
    assert raw2["fidelity"] == pytest.approx(fid)


def test_no_counted_reference_means_no_fidelity(composite):
    ctx = ScoreContext("skeleton", [textured(1), textured(2)], ["background", "pose"])
    raw, warnings = composite.raw_scores("x", [textured(3), textured(4)], ctx)
    assert "fidelity" not in raw and "pickscore" in raw and not warnings
    raw, _ = composite.raw_scores("x", [textured(3)], ScoreContext("t2i"))
    assert "fidelity" not in raw


def test_reference_embeddings_are_cached_across_calls(dirs):
    scorer = CompositeScorer.load(dino=dirs["dino"])
    calls = []
    embed = scorer.models["dino"].embed_images
    scorer.models["dino"].embed_images = lambda ims: calls.append(len(ims)) or embed(ims)
    ctx = ScoreContext("ip", [textured(1), textured(2)], ["face", "garment"])
    first = scorer.raw_scores("x", [textured(5), textured(6)], ctx)[0]["fidelity"]
    second = scorer.raw_scores("x", [textured(5), textured(6)], ctx)[0]["fidelity"]
    assert first == pytest.approx(second) and calls == [2, 2, 2]  # candidates, refs, then candidates only


# -- quality guard ---------------------------------------------------------------------------------------------


def test_sharpness_drops_with_blur_and_exposure_with_clipping():
    img = noise_image(16, 16, seed=4).resize((256, 256), Image.NEAREST)  # hard edges
    blurred = img.filter(ImageFilter.GaussianBlur(4))
    assert sharpness(img) > sharpness(blurred) > sharpness(solid_image(256, 256, (128, 128, 128))) == 0.0
    mid = solid_image(64, 64, (128, 128, 128))
    assert exposure(mid) == pytest.approx(-abs(128 / 255 - 0.5), abs=1e-3)
    white, black = solid_image(64, 64, (255, 255, 255)), solid_image(64, 64, (0, 0, 0))
    assert exposure(white) == pytest.approx(-1.5) and exposure(black) == pytest.approx(-1.5)
    dim = solid_image(64, 64, (40, 40, 40))
    assert exposure(mid) > exposure(dim) > exposure(black)
    big = img.resize((2048, 1024))  # analysed at 512 on the long side: fast, size-independent
    assert math.isfinite(sharpness(big)) and math.isfinite(exposure(big))


def test_quality_guard_takes_a_precomputed_luma_and_the_composite_computes_it_once(monkeypatch):
    from hidream_serve.scoring import composite as composite_mod

    images = [noise_image(16, 16, seed=i).resize((600, 300), Image.NEAREST) for i in range(3)]
    assert luma(images[0]).shape == (256, 512)  # scaled to 512 on the long side
    for im in images:
        y = luma(im)
        assert sharpness(y) == sharpness(im) and exposure(y) == exposure(im)
    calls = []
    monkeypatch.setattr(composite_mod, "luma", lambda im: calls.append(im) or luma(im))
    raw, _ = CompositeScorer().raw_scores("x", images)
    assert len(calls) == 3  # one luma per image for both guards
    assert raw["sharpness"] == [sharpness(im) for im in images] and raw["exposure"] == [exposure(im) for im in images]


# -- composite ---------------------------------------------------------------------------------------------------


def test_zscores():
    assert zscores([5.0]) == [0.0] and zscores([]) == []
    assert zscores([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    z = zscores([1.0, 2.0, 3.0, 6.0])
    assert sum(z) == pytest.approx(0) and np.std(z) == pytest.approx(1)
    assert zscores([1.0, None, 3.0, float("nan")]) == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    assert zscores([100.0, 100.0 + 1e-9]) == [0.0, 0.0]  # float noise is not a difference


def test_combine_is_the_weighted_sum_of_zscores():
    raw = {"clip": [1.0, 2.0, 3.0], "pickscore": [10.0, 10.0, 10.0], "sharpness": [3.0, 2.0, 1.0]}
    comp, br = combine(raw, {"clip": 1.0, "pickscore": 5.0, "sharpness": 0.5}, 3)
    zc = zscores(raw["clip"])
    assert comp == pytest.approx([zc[i] + 0.5 * -zc[i] for i in range(3)])
    assert list(br[0]) == ["pickscore", "clip", "sharpness"]  # scorer order, whatever the input order
    assert br[2]["clip"] == {"raw": 3.0, "z": pytest.approx(zc[2]), "weight": 1.0}
    assert br[0]["pickscore"]["z"] == 0.0  # a scorer that cannot tell them apart neither helps nor hurts
    with pytest.raises(ValueError):
        combine({"clip": [1.0]}, {}, 2)


def test_composite_scores_every_scorer_of_the_mode_in_one_pass(composite):
    images = [textured(i) for i in range(4)]
    out = composite.score("a red fox", images, ScoreContext("ip", [textured(1)], ["subject"]))
    assert out["warnings"] == [] and out["weights"] == DEFAULT_MODE_WEIGHTS["ip"]
    assert len(out["composite"]) == 4 and all(set(b) == set(SCORER_NAMES) for b in out["scores"])
    for c, b in zip(out["composite"], out["scores"]):
        assert c == pytest.approx(sum(d["weight"] * d["z"] for d in b.values()))
    assert out["scores"][1]["fidelity"]["raw"] == pytest.approx(100.0, abs=1e-3)
    t2i = composite.score("a red fox", images)
    assert all("fidelity" not in b for b in t2i["scores"])
    one = composite.score("a red fox", images[:1])
    assert one["composite"] == [0.0] and all(d["z"] == 0.0 for d in one["scores"][0].values())
    assert composite.score("x", [])["composite"] == []


def test_fidelity_falling_back_on_pickscore_reuses_its_image_embeddings(dirs):
    scorer = CompositeScorer.load(pickscore=dirs["pickscore"])
    pick = scorer.models["pickscore"]
    calls = []
    embed = pick.embed_images
    pick.embed_images = lambda ims: calls.append(len(ims)) or embed(ims)
    images, ref = [textured(i) for i in range(3)], textured(0)
    raw, warnings = scorer.raw_scores("a cat", images, ScoreContext("edit", [ref], [None]))
    assert calls == [3, 1]  # the candidates once (PickScore and fidelity), then the ref
    assert any("uses pickscore image embeddings" in w for w in warnings)
    assert raw["fidelity"][0] == pytest.approx(100.0, abs=1e-3)
    assert raw["pickscore"] == pytest.approx(PickScorer.from_pretrained(dirs["pickscore"]).score("a cat", images))


def test_pickscore_scale_is_read_once_at_load(dirs):
    scorer = PickScorer.from_pretrained(dirs["pickscore"])
    before = scorer.scale()
    with torch.no_grad():
        scorer.model.logit_scale.fill_(0.0)  # scoring never reads (and so never syncs on) the parameter again
    assert scorer.scale() == before == pytest.approx(100.0, rel=1e-4)


def test_a_missing_or_failing_scorer_is_reported_and_the_rest_decide(dirs):
    scorer = CompositeScorer.load(clip=dirs["clip"], dino=None, pickscore=dirs["pickscore"] / "nope")
    assert "failed to load" in scorer.unavailable["pickscore"] and scorer.unavailable["dino"] == "not configured"
    images = [textured(i) for i in range(3)]
    out = scorer.score("a cat", images, ScoreContext("edit", [textured(0)], [None]))
    assert all("pickscore" not in b and {"clip", "fidelity"} <= set(b) for b in out["scores"])
    assert any("human preference (pickscore) is unavailable" in w for w in out["warnings"])
    assert any("uses clip image embeddings (no DINOv2 model is configured)" in w for w in out["warnings"])
    assert out["scores"][0]["fidelity"]["raw"] == pytest.approx(100.0, abs=1e-3)

    def boom(*a, **k):
        raise RuntimeError("kaput")

    scorer.models["clip"].score_embeddings = boom
    out = scorer.score("a cat", images)
    assert any("prompt alignment (clip) failed (RuntimeError: kaput)" in w for w in out["warnings"])
    assert all(set(b) == {"sharpness", "exposure"} for b in out["scores"])  # the quality guard still decides
    nothing = CompositeScorer()
    out = nothing.score("a cat", images)
    assert any("(pickscore) is not configured" in w for w in out["warnings"]) and len(out["composite"]) == 3


def test_weights_per_mode_partial_override_and_zero_skips_the_scorer(dirs):
    w = ModeWeights.model_validate({"t2i": {"clip": 2.0, "pickscore": 0.0}})
    assert w.for_mode("t2i") == {**DEFAULT_MODE_WEIGHTS["t2i"], "clip": 2.0, "pickscore": 0.0}
    assert w.for_mode("edit") == DEFAULT_MODE_WEIGHTS["edit"]
    with pytest.raises(Exception):
        ModeWeights.model_validate({"t2i": {"pickscor": 1.0}})
    with pytest.raises(Exception):
        RoleWeights.model_validate({"pose": -1})
    scorer = CompositeScorer.load(clip=dirs["clip"], weights=w)  # PickScore absent but weighted 0: no warning
    out = scorer.score("x", [textured(1), textured(2)])
    assert out["warnings"] == [] and set(out["scores"][0]) == {"clip", "sharpness", "exposure"}
    assert out["scores"][0]["clip"]["weight"] == 2.0


def test_role_weights_come_from_the_config(dirs):
    scorer = CompositeScorer.load(dino=dirs["dino"], role_weights=RoleWeights(background=1.0, face=0.0))
    face, bg = textured(1), textured(2)
    raw, _ = scorer.raw_scores("x", [face, bg], ScoreContext("skeleton", [face, bg], ["face", "background"]))
    assert raw["fidelity"][1] == pytest.approx(100.0, abs=1e-3) and raw["fidelity"][0] < raw["fidelity"][1]


def test_embedded_pickscore_and_dino_are_built_and_load(tmp_path):
    from hidream_serve.embedded import embedded_names, ensure_embedded

    assert {"embedded:tiny-pickscore", "embedded:tiny-dino"} <= set(embedded_names())
    pick = ensure_embedded("embedded:tiny-pickscore", root=tmp_path)
    dino = ensure_embedded("embedded:tiny-dino", root=tmp_path)
    assert ensure_embedded("embedded:tiny-dino", root=tmp_path) == dino
    s = CompositeScorer.load(pickscore=pick, dino=dino)
    assert s.unavailable == {"clip": "not configured"}

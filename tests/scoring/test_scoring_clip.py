"""CLIP scorer: tiny CLIP in HF layout loads offline, preprocessing is transformers', scores are CLIPScore."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from tests._images import noise_image, solid_image

from hidream_serve.embedded import ensure_embedded
from hidream_serve.scoring.clip import ClipScorer, ScorerLoadError, load_image_processor, pixel_values, write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.from_pretrained(clip_dir)


def test_tiny_clip_has_the_hf_layout_and_loads_with_stock_classes_offline(clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, CLIPModel, CLIPTokenizer

    names = {p.name for p in clip_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "preprocessor_config.json"} <= names  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    assert isinstance(tok, CLIPTokenizer)
    ids = tok("A photo of a CAT")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.text_config.eos_token_id == tok.eos_token_id


def test_write_tiny_clip_is_deterministic(tmp_path, clip_dir):
    other = write_tiny_clip(tmp_path / "again", seed=0)
    a = ClipScorer.from_pretrained(clip_dir).model.state_dict()
    b = ClipScorer.from_pretrained(other).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (other / "vocab.json").read_text() == (clip_dir / "vocab.json").read_text()


def _processor_dir(path, cfg: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(cfg))
    return path


def _hf_pixels(cfg: dict, images) -> np.ndarray:
    """What transformers' own CLIP image processor (PIL backend) makes of `images` under `cfg`."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
    return np.asarray(hf(images=list(images), return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("size", [(90, 60), (61, 97), (32, 32), (20, 50), (1000, 333)])
def test_preprocessing_matches_transformers_clip_image_processor(clip_dir, size, tmp_path):
    from transformers import CLIPImageProcessorPil

    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    for i, c in enumerate((cfg, {**cfg, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}})):
        img = noise_image(*size, seed=size[0])
        want = _hf_pixels(c, [img])[0]
        got = pixel_values(load_image_processor(_processor_dir(tmp_path / str(i), c), CLIPImageProcessorPil), [img])
        got = got[0].numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_preprocess_accepts_legacy_int_sizes(tmp_path):
    from transformers import CLIPImageProcessorPil

    # openai/clip-vit-large-patch14's preprocessor_config.json names a feature extractor and int sizes
    legacy = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224}
    for i, c in enumerate((legacy, {"size": 224, "crop_size": 224})):  # a file naming no class: the given one
        p = load_image_processor(_processor_dir(tmp_path / str(i), c), CLIPImageProcessorPil)
        assert isinstance(p, CLIPImageProcessorPil)
        assert (p.size["shortest_edge"], p.crop_size["height"], p.crop_size["width"]) == (224, 224, 224)
        assert pixel_values(p, [solid_image(300, 200)])[0].shape == (3, 224, 224)
    with pytest.raises(ScorerLoadError, match="no preprocessor_config.json"):
        load_image_processor(tmp_path / "nothing", CLIPImageProcessorPil)


@pytest.mark.parametrize("cfg", [
    {"size": {"height": 40, "width": 24}, "do_center_crop": False},  # exactly h x w: no aspect kept, no crop
    {"size": {"height": 40, "width": 24}, "do_center_crop": False, "do_rescale": False},  # raw 0-255 values
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 24, "width": 32}, "do_rescale": False},
])  # fmt: skip
def test_preprocessing_follows_transformers_on_non_square_sizes_and_without_rescale(clip_dir, cfg, tmp_path):
    """The hand-written preprocessing this replaced kept the aspect for size {height, width} (a 60x30 image came
    out 3 x 24 x 48, not 3 x 40 x 24, and a batch of mixed aspects could not be stacked) and always rescaled."""
    from transformers import CLIPImageProcessorPil

    c = {**json.loads((clip_dir / "preprocessor_config.json").read_text()), **cfg}
    images = [noise_image(60, 30, seed=1), noise_image(31, 77, seed=2), noise_image(50, 50, seed=3)]
    got = pixel_values(load_image_processor(_processor_dir(tmp_path / "p", c), CLIPImageProcessorPil), images).numpy()
    want = _hf_pixels(c, images)
    assert got.shape == want.shape
    if "height" in cfg["size"]:
        assert got.shape == (3, 3, 40, 24)
    assert np.abs(got - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))
    if cfg.get("do_rescale") is False:
        assert np.abs(want).max() > 50  # normalised 0-255 values, not 0-1


def test_a_processor_that_resizes_to_the_model_size_without_cropping_embeds_mixed_aspects(clip_dir, tmp_path):
    d = tmp_path / "clip"
    shutil.copytree(clip_dir, d)
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": {"height": 32, "width": 32},
                                                            "do_center_crop": False}))  # fmt: skip
    s = ClipScorer.from_pretrained(d)
    images = [noise_image(60, 30, seed=1), noise_image(30, 60, seed=2)]
    assert s.embed_images(images).shape == (2, 16) and len(s.score("a cat", images)) == 2


def test_score_is_100_times_cosine_of_projected_embeddings(scorer):
    images = [noise_image(40 + 3 * i, 48, seed=i) for i in range(5)]
    prompt = "a photo of a cat"
    got = scorer.score(prompt, images)
    m = scorer.model
    with torch.no_grad():
        tok = scorer.tokenizer([prompt], return_tensors="pt")
        t = m.text_projection(m.text_model(**tok).pooler_output)
        v = m.visual_projection(m.vision_model(pixel_values=pixel_values(scorer.preprocess, images)).pooler_output)
        want = 100 * torch.nn.functional.cosine_similarity(v, t.expand_as(v), dim=-1)
    assert np.allclose(got, want.numpy(), atol=1e-3)
    # get_text_features / get_image_features are these projections, bit for bit
    assert torch.equal(scorer.embed_text([prompt]), torch.nn.functional.normalize(t, dim=-1))
    assert torch.equal(scorer.embed_images(images), torch.nn.functional.normalize(v, dim=-1))
    assert len(set(round(s, 4) for s in got)) == 5  # distinct images get distinct scores


def test_batched_scores_equal_one_at_a_time(scorer):
    images = [noise_image(50, 50, seed=i) for i in range(7)]
    scorer.batch_size = 3
    try:
        batched = scorer.score("a dog on the beach", images)
    finally:
        scorer.batch_size = 16
    single = [scorer.score("a dog on the beach", [im])[0] for im in images]
    assert np.allclose(batched, single, atol=1e-3)


def test_prompt_matters_and_long_prompts_are_truncated(scorer):
    img = [noise_image(40, 40, seed=3)]
    assert scorer.score("a cat", img) != scorer.score("mountains and a lake", img)
    assert len(scorer.score("word " * 500, img)) == 1
    assert scorer.score("anything", []) == []


def test_embedded_clip_is_built_once_and_cached(tmp_path):
    paths, errors = [], []

    def build():
        try:
            paths.append(ensure_embedded("embedded:tiny-clip", root=tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert (paths[0] / ".complete").is_file() and ClipScorer.from_pretrained(paths[0]).score("x", [solid_image(8, 8)])
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [paths[0]]  # no temporary leftovers
    with pytest.raises(ValueError):
        ensure_embedded("embedded:nope", root=tmp_path)

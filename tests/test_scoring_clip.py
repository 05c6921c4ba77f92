"""CLIP scorer: tiny CLIP in HF layout loads offline, preprocessing matches transformers', scores are CLIPScore."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from _images import noise_image, solid_image

from hidream_serve.embedded import ensure_embedded
from hidream_serve.scoring.clip import ClipPreprocess, ClipScorer, write_tiny_clip


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


@pytest.mark.parametrize("size", [(90, 60), (61, 97), (32, 32), (20, 50), (1000, 333)])
def test_preprocessing_matches_transformers_clip_image_processor(clip_dir, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    for c in (cfg, {**cfg, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}):
        hf = CLIPImageProcessorPil(**{k: v for k, v in c.items() if k not in ("image_processor_type", "processor_class")})
        img = noise_image(*size, seed=size[0])
        want = np.asarray(hf(images=[img], return_tensors="np")["pixel_values"][0])
        got = ClipPreprocess.from_dict(c).image(img).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_preprocess_accepts_legacy_int_sizes():
    p = ClipPreprocess.from_dict({"size": 224, "crop_size": 224})
    assert (p.shortest_edge, p.crop_height, p.crop_width) == (224, 224, 224)
    assert p.image(solid_image(300, 200)).shape == (3, 224, 224)


def test_score_is_100_times_cosine_of_projected_embeddings(scorer):
    images = [noise_image(40 + 3 * i, 48, seed=i) for i in range(5)]
    prompt = "a photo of a cat"
    got = scorer.score(prompt, images)
    m = scorer.model
    with torch.no_grad():
        tok = scorer.tokenizer([prompt], return_tensors="pt")
        t = m.text_projection(m.text_model(**tok).pooler_output)
        v = m.visual_projection(m.vision_model(pixel_values=scorer.preprocess.batch(images)).pooler_output)
        want = 100 * torch.nn.functional.cosine_similarity(v, t.expand_as(v), dim=-1)
    assert np.allclose(got, want.numpy(), atol=1e-3)
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

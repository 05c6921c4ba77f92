"""The `random:full-size` scorers: the published architectures (checked by parameter count, built on the meta
device so nothing is allocated) and the spec reaching them through `CompositeScorer.load`."""

from __future__ import annotations

import pytest

from hidream_serve.scoring import random_full
from hidream_serve.scoring.composite import CompositeScorer

# parameters of yuvalkirstain/PickScore_v1 (CLIP-ViT-H/14), openai/clip-vit-large-patch14, facebook/dinov2-base
PUBLISHED_MILLIONS = {"pickscore": 986.1, "clip": 427.6, "dino": 86.6}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_each_random_scorer_has_the_published_size(name):
    model, tokenizer, processor = random_full.random_full_model(name, device="meta")
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[name], abs=0.1)
    assert processor.crop_size == {"height": 224, "width": 224}
    if name != "dino":  # offline tokenizer: ids fit the full-size text model, cut at CLIP's 77 tokens
        max_len = model.config.text_config.max_position_embeddings
        ids = tokenizer(["a cat " * 100], truncation=True, max_length=max_len)["input_ids"][0]
        assert len(ids) == 77 and max(ids) < model.config.text_config.vocab_size


def test_a_random_scorer_scores_on_the_cpu():
    """DINOv2-base is small enough to build for real here (the CLIPs take ~30 s on 2 cores: checked by hand)."""
    from PIL import Image

    scorer = random_full.random_full_scorer("dino", device="cpu")
    emb = scorer.embed_images([Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (64, 64), (0, 0, 255))])
    assert emb.shape == (2, 768) and scorer.path == random_full.RANDOM_FULL_SPEC
    assert emb.isfinite().all() and float((emb[0] - emb[1]).abs().max()) > 0


def test_composite_load_builds_random_scorers_for_the_spec(monkeypatch):
    built = []

    def fake(name, device, dtype, batch_size):
        built.append((name, device, batch_size))
        return object()

    monkeypatch.setattr(random_full, "random_full_scorer", fake)
    scorer = CompositeScorer.load(pickscore="random:full-size", dino="random:full-size", device="cpu", batch_size=8)
    assert built == [("pickscore", "cpu", 8), ("dino", "cpu", 8)]
    assert scorer.models["clip"] is None and scorer.unavailable["clip"] == "not configured"
    assert random_full.is_random_full("random:full-size") and not random_full.is_random_full("/models/clip")

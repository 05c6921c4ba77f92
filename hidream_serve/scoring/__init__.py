"""Candidate scoring: PickScore (pickscore.py), CLIP (clip.py), reference fidelity (dino.py, fidelity.py), the
quality guard (quality.py), their per-mode composite (composite.py, settings.py) and preview pruning (pruning.py).
Every model loads from a local directory; see docs/scoring.md."""

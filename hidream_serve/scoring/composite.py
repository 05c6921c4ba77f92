"""The composite judge of a candidate set: every configured scorer, z-scored within the set, weighted per mode.

    composite_i = sum over scorers s of  weight[mode][s] * z_s,i,   z_s,i = (x_s,i - mean_s) / std_s

A scorer's z-scores are all 0 when the set has one candidate or the scorer cannot tell the candidates
apart (std 0), so it neither helps nor hurts anyone. Scorers weighted 0 for the mode are not run. A
scorer that is not configured, failed to load, or fails on this request is reported in `warnings` and
the others decide; the breakdown lists, per candidate and scorer, the raw score, its z and its weight.

`CompositeScorer` holds the models (PickScore, CLIP, DINOv2; any may be absent) and runs each over the
whole set in batched forwards. The Scorer deployment and `calibrate-pruning` both use it, so previews
and final images are judged alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from .context import ScoreContext
from .fidelity import fidelity_scores, ref_weights
from .quality import exposure, luma, sharpness
from .settings import SCORER_NAMES, ModeWeights, RoleWeights

log = logging.getLogger(__name__)

MODEL_SCORERS = ("pickscore", "clip", "dino")  # the scorers that load a model (dino: fidelity's)
SCORING_MIN_EDGE = 448  # twice the models' 224-px input: the shorter side an image is reduced towards first
_STD_EPS = 1e-6


def zscores(values: Sequence[float | None]) -> list[float]:
    """z of each value within the set (population std); 0 for a missing/non-finite value, for n < 2 and
    for a (numerically) constant set."""
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(ok) < 2:
        return [0.0] * len(values)
    mean = sum(ok) / len(ok)
    std = math.sqrt(sum((v - mean) ** 2 for v in ok) / len(ok))
    if std <= _STD_EPS * max(1.0, abs(mean)):
        return [0.0] * len(values)
    return [(float(v) - mean) / std if v is not None and math.isfinite(float(v)) else 0.0 for v in values]


def combine(raw: Mapping[str, Sequence[float | None]], weights: Mapping[str, float], n: int
            ) -> tuple[list[float], list[dict[str, dict]]]:  # fmt: skip
    """Composite scores and per-candidate breakdowns {scorer: {raw, z, weight}} of `n` candidates."""
    composite = [0.0] * n
    breakdown: list[dict[str, dict]] = [{} for _ in range(n)]
    names = [s for s in SCORER_NAMES if s in raw] + [s for s in raw if s not in SCORER_NAMES]
    for name in names:
        values = list(raw[name])
        if len(values) != n:
            raise ValueError(f"scorer {name} gave {len(values)} values for {n} candidates")
        z = zscores(values)
        w = float(weights.get(name, 0.0))
        for i, v in enumerate(values):
            finite = v is not None and math.isfinite(float(v))
            breakdown[i][name] = {"raw": float(v) if finite else None, "z": z[i], "weight": w}
            composite[i] += w * z[i]
    return composite, breakdown


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 200 else text[:197] + "..."


def scoring_view(img: Image.Image) -> Image.Image:
    """The image box-reduced by the largest integer factor that keeps its shorter side at least `SCORING_MIN_EDGE`.
    Every model resizes to about 224 px anyway; reduced first, their processors handle a quarter of a megapixel
    instead of four (2048x2048: 0.25 s -> 0.02 s per model for four images) and the result barely moves."""
    factor = min(img.size) // SCORING_MIN_EDGE
    return img.reduce(factor) if factor >= 2 else img


class CompositeScorer:
    def __init__(self, pickscore=None, clip=None, dino=None, unavailable: Mapping[str, str] | None = None,
                 weights: ModeWeights | None = None, role_weights: RoleWeights | None = None,
                 ref_cache_size: int = 32):  # fmt: skip
        self.models = dict(zip(MODEL_SCORERS, (pickscore, clip, dino)))
        self.unavailable = dict(unavailable or {})
        for name, m in self.models.items():
            if m is None:
                self.unavailable.setdefault(name, "not configured")
        self.weights = weights or ModeWeights()
        self.role_weights = role_weights or RoleWeights()
        self.ref_cache_size = ref_cache_size
        self._ref_cache: OrderedDict = OrderedDict()

    @classmethod
    def load(cls, pickscore: str | Path | None = None, clip: str | Path | None = None, dino: str | Path | None = None,
             pickscore_processor: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
             batch_size: int = 16, **options) -> CompositeScorer:  # fmt: skip
        """Load each model from its local directory (None: not configured; `random:full-size`: random weights,
        random_full.py). A model that fails to load is logged and reported with every score; the others still
        work."""
        from .clip import ClipScorer
        from .dino import DinoEmbedder
        from .pickscore import PickScorer
        from .random_full import is_random_full, random_full_scorer

        loaders = {
            "pickscore": lambda p: PickScorer.from_pretrained(p, device, dtype, batch_size,
                                                              processor_dir=pickscore_processor),  # fmt: skip
            "clip": lambda p: ClipScorer.from_pretrained(p, device, dtype, batch_size),
            "dino": lambda p: DinoEmbedder.from_pretrained(p, device, dtype, batch_size),
        }
        models, unavailable = {}, {}
        for name, path in zip(MODEL_SCORERS, (pickscore, clip, dino)):
            if path is None:
                continue
            try:
                if is_random_full(path):  # benchmarks: the full-size architecture, random weights, no files
                    models[name] = random_full_scorer(name, device, dtype, batch_size)
                else:
                    models[name] = loaders[name](path)
            except Exception as e:  # noqa: BLE001 - one bad directory must not take the other scorers down
                log.error("scorer %s: cannot load %s: %s", name, path, _short(e))
                unavailable[name] = f"failed to load {path}: {_short(e)}"
        return cls(unavailable=unavailable, **models, **options)

    # -- configuration ---------------------------------------------------------------------------------
    def set_batch_size(self, n: int) -> None:
        for m in self.models.values():
            if m is not None:
                m.batch_size = n

    def weights_for(self, mode: str) -> dict[str, float]:
        return self.weights.for_mode(mode)

    def describe(self) -> dict[str, str]:
        out = {}
        for name, m in self.models.items():
            out[name] = str(getattr(m, "path", "") or "loaded") if m is not None else self.unavailable[name]
        return out

    # -- scoring ---------------------------------------------------------------------------------------
    def _missing(self, name: str, what: str) -> str:
        why = self.unavailable.get(name, "not configured")
        if why == "not configured":
            return f"{what} ({name}) is not configured; the other scorers decide"
        return f"{what} ({name}) is unavailable ({why}); the other scorers decide"

    def _ref_embeddings(self, backend_name: str, backend, refs: Sequence[Image.Image]) -> torch.Tensor:
        """Reference embeddings, cached by content (previews at each pruning stage reuse them)."""
        keys = []
        for img in refs:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{backend_name}:{id(backend)}:{img.mode}:{img.size}".encode())
            h.update(img.tobytes())
            keys.append(h.hexdigest())
        todo = [i for i, k in enumerate(keys) if k not in self._ref_cache]
        if todo:
            emb = backend.embed_images([refs[i] for i in todo])
            for row, i in enumerate(todo):
                self._ref_cache[keys[i]] = emb[row].cpu()
        out = []
        for k in keys:
            self._ref_cache.move_to_end(k)
            out.append(self._ref_cache[k])
        while len(self._ref_cache) > max(self.ref_cache_size, len(keys)):
            self._ref_cache.popitem(last=False)
        return torch.stack(out)

    def raw_scores(self, prompt: str, images: Sequence[Image.Image], ctx: ScoreContext | None = None
                   ) -> tuple[dict[str, list[float]], list[str]]:  # fmt: skip
        """Raw score lists of every scorer the mode weights above 0, and warnings."""
        ctx = ctx or ScoreContext()
        images = [scoring_view(im) for im in images]
        weights = self.weights_for(ctx.mode)
        raw: dict[str, list[float]] = {}
        warnings: list[str] = []
        if not images:
            return raw, warnings

        def run(name: str, what: str, fn):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - a failing scorer is reported; the rest decide
                log.exception("scorer %s failed", name)
                warnings.append(f"{what} ({name}) failed ({_short(e)}); the other scorers decide")
                return None

        # PickScore and CLIP: images embedded once; reference fidelity reuses them if it falls back on that model
        embedded: dict[str, torch.Tensor] = {}
        for name, what in (("pickscore", "human preference"), ("clip", "prompt alignment")):
            if weights.get(name, 0) <= 0:
                continue
            model = self.models[name]
            if model is None:
                warnings.append(self._missing(name, what))
                continue
            emb = run(name, what, lambda: model.embed_images(images))
            if emb is None:
                continue
            embedded[name] = emb
            vals = run(name, what, lambda: model.score_embeddings(prompt, emb))
            if vals is not None:
                raw[name] = vals

        if weights.get("fidelity", 0) > 0 and ctx.refs:
            rw = ref_weights(ctx.mode, ctx.roles, len(ctx.refs), self.role_weights.model_dump())
            counted = [i for i, w in enumerate(rw) if w > 0]
            if counted:
                vals = self._fidelity(images, ctx, rw, counted, embedded, warnings, run)
                if vals is not None:
                    raw["fidelity"] = vals

        quality = [(name, fn) for name, fn in (("sharpness", sharpness), ("exposure", exposure))
                   if weights.get(name, 0) > 0]  # fmt: skip
        if quality:
            lumas = [luma(im) for im in images]  # once per image for both
            for name, fn in quality:
                raw[name] = [fn(y) for y in lumas]
        return raw, warnings

    def _fidelity(self, images, ctx: ScoreContext, rw, counted, embedded: Mapping[str, torch.Tensor], warnings, run):
        backends = [(n, self.models[n]) for n in ("dino", "clip", "pickscore") if self.models[n] is not None]
        if not backends:
            warnings.append("reference fidelity is unavailable: no DINOv2 or CLIP model is configured; "
                            "the other scorers decide")  # fmt: skip
            return None
        name, backend = backends[0]
        if name != "dino":
            why = self.unavailable.get("dino", "not configured")
            note = "no DINOv2 model is configured" if why == "not configured" else f"DINOv2 is unavailable: {why}"
            warnings.append(f"reference fidelity uses {name} image embeddings ({note})")

        def compute():
            cand = embedded[name] if name in embedded else backend.embed_images(images)
            refs = self._ref_embeddings(name, backend, [ctx.refs[i] for i in counted])
            return fidelity_scores(cand, refs, [rw[i] for i in counted])

        return run("fidelity", "reference fidelity", compute)

    def score(self, prompt: str, images: Sequence[Image.Image], ctx: ScoreContext | None = None) -> dict:
        """{"composite": [...], "scores": [{scorer: {raw, z, weight}}], "weights": {...}, "warnings": [...]}"""
        ctx = ctx or ScoreContext()
        raw, warnings = self.raw_scores(prompt, images, ctx)
        weights = self.weights_for(ctx.mode)
        composite, breakdown = combine(raw, weights, len(images))
        bad = sorted({k for b in breakdown for k, v in b.items() if v["raw"] is None})
        if bad:
            warnings.append(f"non-finite scores from {', '.join(bad)} count as average (z = 0)")
        return {"composite": composite, "scores": breakdown, "weights": weights, "warnings": warnings}

"""`hidream-serve compare`: two engine configurations (bf16, fp8, fp32) on your own prompts.

Both pipelines load from the same checkpoint; every prompt runs with the same seed and settings in each.
Configuration A loads, generates every prompt and is freed before B loads, so only one model is in memory.
Per prompt it reports how alike the two images are (PSNR in dB, SSIM on luma: hidream_serve/similarity.py)
and how the service's composite judge ranks them: the pair {A, B} is scored as one candidate set, exactly as
best-of-n ranks its candidates: each scorer that tells them apart adds its weight to the one it prefers and
takes it from the other, so the delta (composite A - composite B) says which image the judge prefers and by
how many weighted votes; 0 when no scorer can tell them apart. The raw
score of every scorer for both images is in compare.json (with the A/B PNGs, under `--out`).

On real weights pass the scorers (`--pickscore`, `--clip`, `--dino`); on the embedded tiny model the tiny
scorers are used and the numbers only show that the machinery works. fp8 needs FP8 tensor cores (a GPU with
compute capability >= 8.9); `--emulate-fp8` dequantizes instead, for tests only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .calibrate import Case, load_cases
from .similarity import psnr, ssim


@dataclass(frozen=True)
class EngineConfig:
    dtype: str  # torch dtype name
    quantize: str | None = None


CONFIGS = {
    "bf16": EngineConfig("bfloat16"),
    "fp8": EngineConfig("bfloat16", "fp8"),  # decoder projections quantized at load from the bf16 weights
    "fp32": EngineConfig("float32"),
}


@dataclass
class Generated:
    images: list  # PIL images, one per case
    settings: list[dict]
    warnings: list[str]
    load_s: float
    generate_s: float
    peak_gib: float | None  # CUDA peak allocated memory while loading and generating


def load_pipeline(model_dir: Path, name: str, device: str, emulate_fp8: bool = False):
    import torch

    from .engine.checkpoint import load_checkpoint
    from .engine.pipeline import HiDreamPipeline

    cfg = CONFIGS[name]
    ckpt = load_checkpoint(model_dir, device, getattr(torch, cfg.dtype), quantize=cfg.quantize,
                           fp8_emulate=emulate_fp8)  # fmt: skip
    return HiDreamPipeline(ckpt, max_batch=1)


def _params(case: Case, width: int, height: int, steps: int | None, recipe: str):
    from .engine.params import GenerationParams

    return GenerationParams(mode=case.mode, prompt=case.prompt, refs=case.refs, ref_roles=case.roles,
                            layout_boxes=case.layout_boxes, width=width, height=height, exact_size=True,
                            recipe=recipe, steps=steps)  # fmt: skip


def generate_with(model_dir: Path, name: str, cases: list[Case], *, device: str, seed: int, width: int, height: int,
                  steps: int | None, recipe: str, emulate_fp8: bool = False, log=print) -> Generated:  # fmt: skip
    """Load configuration `name`, run every case with `seed`, free the model."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipe = load_pipeline(model_dir, name, device, emulate_fp8)
    t1 = time.perf_counter()
    images, settings, warnings = [], [], []
    for i, case in enumerate(cases):
        t = time.perf_counter()
        result = pipe(_params(case, width, height, steps, recipe), [seed])
        images.append(result.candidates[0].image)
        settings.append(result.settings)
        warnings.extend(w for w in result.warnings if w not in warnings)
        log(f"[{name} {i + 1}/{len(cases)}] {case.prompt[:60]!r} ({time.perf_counter() - t:.1f}s)")
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return Generated(images, settings, warnings, t1 - t0, t2 - t1, peak)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def compare_images(cases: list[Case], a: list, b: list, scorer=None) -> tuple[list[dict], list[str]]:
    """Per case: PSNR, SSIM and, with a scorer, the composite of the pair {A, B} and each scorer's raw scores."""
    from .scoring.context import ScoreContext

    rows, warnings = [], []
    for case, ia, ib in zip(cases, a, b, strict=True):
        p = psnr(ia, ib)
        row = {"prompt": case.prompt, "mode": case.mode, "psnr_db": _finite_or_none(p), "identical": math.isinf(p),
               "ssim": ssim(ia, ib), "composite_a": None, "composite_b": None, "delta": None, "raw": {}}  # fmt: skip
        if scorer is not None:
            scored = scorer.score(case.prompt, [ia, ib], ScoreContext(case.mode, case.refs, case.roles))
            ca, cb = scored["composite"]
            row.update(composite_a=ca, composite_b=cb, delta=ca - cb, weights=scored["weights"])
            row["raw"] = {n: {"a": scored["scores"][0][n]["raw"], "b": scored["scores"][1][n]["raw"]}
                          for n in scored["scores"][0]}  # fmt: skip
            warnings.extend(w for w in scored["warnings"] if w not in warnings)
        rows.append(row)
    return rows, warnings


def summarize(rows: list[dict]) -> dict:
    deltas = [r["delta"] for r in rows if r["delta"] is not None]
    names = sorted({n for r in rows for n in r["raw"]})
    raw_delta = {}
    for n in names:
        d = [r["raw"][n]["a"] - r["raw"][n]["b"] for r in rows
             if n in r["raw"] and r["raw"][n]["a"] is not None and r["raw"][n]["b"] is not None]  # fmt: skip
        raw_delta[n] = _mean(d)
    return {
        "prompts": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "psnr_db_mean": _mean(r["psnr_db"] for r in rows),  # over the prompts whose images differ
        "psnr_db_min": min((r["psnr_db"] for r in rows if r["psnr_db"] is not None), default=None),
        "ssim_mean": _mean(r["ssim"] for r in rows),
        "ssim_min": min((r["ssim"] for r in rows), default=None),
        "composite_a_mean": _mean(r["composite_a"] for r in rows),
        "composite_b_mean": _mean(r["composite_b"] for r in rows),
        "delta_mean": _mean(deltas),
        "a_preferred": sum(d > 0 for d in deltas),
        "b_preferred": sum(d < 0 for d in deltas),
        "ties": sum(d == 0 for d in deltas),
        "raw_delta_mean": raw_delta,  # mean of raw A - raw B per scorer
    }


def _num(v, fmt: str) -> str:
    if v is None:
        return "-"
    return format(v, fmt)


def table(rows: list[dict], summary: dict, a: str, b: str) -> str:
    lines = [f"| prompt | PSNR dB | SSIM | composite A ({a}) | composite B ({b}) | delta |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        text = r["prompt"] if len(r["prompt"]) <= 40 else r["prompt"][:39] + "…"
        p = "inf" if r["identical"] else _num(r["psnr_db"], ".2f")
        lines.append(f"| {text} | {p} | {r['ssim']:.4f} | {_num(r['composite_a'], '+.3f')} | "
                     f"{_num(r['composite_b'], '+.3f')} | {_num(r['delta'], '+.3f')} |")  # fmt: skip
    s = summary
    p = _num(s["psnr_db_mean"], ".2f") if s["identical"] < s["prompts"] else "inf"
    lines.append(f"| **mean** | {p} | {_num(s['ssim_mean'], '.4f')} | {_num(s['composite_a_mean'], '+.3f')} | "
                 f"{_num(s['composite_b_mean'], '+.3f')} | {_num(s['delta_mean'], '+.3f')} |")  # fmt: skip
    notes = [f"PSNR mean over the {s['prompts'] - s['identical']} prompts whose images differ "
             f"({s['identical']} identical); SSIM min {_num(s['ssim_min'], '.4f')}."]  # fmt: skip
    if s["delta_mean"] is not None:
        notes.append(f"The judge prefers A on {s['a_preferred']}, B on {s['b_preferred']}, ties {s['ties']}. "
                     "Mean raw A - B: " + ", ".join(f"{n} {_num(v, '+.4f')}" for n, v in s["raw_delta_mean"].items())
                     + ".")  # fmt: skip
    return "\n".join(lines + [""] + notes) + "\n"


# -- command line ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare two engine configurations (bf16, fp8, fp32) on your prompts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="checkpoint directory or embedded:tiny (default: $HIDREAM_MODEL_PATH, else "
                   "embedded:tiny)")  # fmt: skip
    p.add_argument("--a", required=True, choices=sorted(CONFIGS), help="configuration A")
    p.add_argument("--b", required=True, choices=sorted(CONFIGS), help="configuration B")
    p.add_argument("--prompts", type=Path, help="prompt file: .txt (one per line, # comments) or .jsonl/.json "
                   "with prompt, mode, refs, layout_boxes; default: a built-in list of t2i prompts")  # fmt: skip
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--out", type=Path, help="write compare.json and the A/B PNGs into this directory")
    p.add_argument("--steps", type=int, help="default: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1024, help="multiple of 32 (used as given)")
    p.add_argument("--height", type=int, default=1024, help="multiple of 32 (used as given)")
    p.add_argument("--recipe", choices=["full", "dev"], default="full")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--emulate-fp8", action="store_true", help="allow fp8 without FP8 tensor cores (testing)")
    p.add_argument("--no-score", action="store_true", help="PSNR and SSIM only, no composite judge")
    p.add_argument("--pickscore", help="PickScore directory, embedded:tiny-pickscore or none (unset: its "
                   "environment variable, else the tiny one beside the embedded model, else none)")  # fmt: skip
    p.add_argument("--pickscore-processor", help="directory with PickScore's tokenizer/preprocessor if apart")
    p.add_argument("--clip", help="CLIP directory, embedded:tiny-clip or none")
    p.add_argument("--dino", help="DINOv2 directory, embedded:tiny-dino or none")
    p.add_argument("--weights", help='composite weights JSON, e.g. \'{"t2i": {"pickscore": 1, "clip": 0}}\'')
    p.set_defaults(func=run)


def _load_scorer(args, embedded: bool, device: str):
    from .embedded import (
        DEFAULT_DINO, DEFAULT_PICKSCORE, DEFAULT_SCORER, ENV_DINO, ENV_PICKSCORE, ENV_PICKSCORE_PROCESSOR, ENV_SCORER,
        optional_model_dir, resolve_model,
    )  # fmt: skip
    from .scoring.composite import CompositeScorer
    from .scoring.settings import ModeWeights

    def spec(cli, env, tiny):  # unset: env, else tiny beside the embedded model, else none
        return resolve_model(cli, env, tiny if embedded else "none")

    specs = {"pickscore": spec(args.pickscore, ENV_PICKSCORE, DEFAULT_PICKSCORE),
             "clip": spec(args.clip, ENV_SCORER, DEFAULT_SCORER), "dino": spec(args.dino, ENV_DINO, DEFAULT_DINO)}
    processor = resolve_model(args.pickscore_processor, ENV_PICKSCORE_PROCESSOR, "none")
    weights = ModeWeights.model_validate(json.loads(args.weights) if args.weights else {})
    scorer = CompositeScorer.load(**{k: optional_model_dir(v) for k, v in specs.items()},
                                  pickscore_processor=optional_model_dir(processor), device=device,
                                  weights=weights)  # fmt: skip
    return scorer, specs


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from .embedded import DEFAULT_MODEL, ENV_MODEL, is_embedded, model_dir, resolve_model
    from .engine.fp8 import check_fp8_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "fp8" in (args.a, args.b) and not args.emulate_fp8:
        check_fp8_device(device)  # before anything loads; EngineError -> `error: ...`, exit 2
    try:
        cases = load_cases(args.prompts)[: args.max_prompts]
    except (OSError, ValueError, KeyError) as e:
        return _fail(f"--prompts {args.prompts}: {type(e).__name__}: {e}")
    if not cases:
        return _fail(f"--prompts {args.prompts}: no prompts")
    model = resolve_model(args.model, ENV_MODEL, DEFAULT_MODEL)
    try:
        directory = model_dir(model)
    except (FileNotFoundError, ValueError) as e:
        return _fail(f"--model: {e}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    opts = dict(device=device, seed=args.seed, width=args.width, height=args.height, steps=args.steps,
                recipe=args.recipe, emulate_fp8=args.emulate_fp8, log=log)  # fmt: skip
    gen_a = generate_with(directory, args.a, cases, **opts)
    gen_b = generate_with(directory, args.b, cases, **opts)
    scorer, specs = (None, {}) if args.no_score else _load_scorer(args, is_embedded(model), device)
    rows, warnings = compare_images(cases, gen_a.images, gen_b.images, scorer)
    summary = summarize(rows)
    print(table(rows, summary, args.a, args.b))
    for w in gen_a.warnings + gen_b.warnings + warnings:
        log(f"warning: {w}")
    for name, g in ((args.a, gen_a), (args.b, gen_b)):
        peak = f", peak {g.peak_gib:.2f} GiB" if g.peak_gib is not None else ""
        log(f"{name}: load {g.load_s:.1f}s, {g.generate_s / len(cases):.2f}s per image{peak}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            row["images"] = {}
            for side, name, gen in (("a", args.a, gen_a), ("b", args.b, gen_b)):
                path = args.out / f"{i:03d}_{side}_{name}.png"
                gen.images[i].save(path)
                row["images"][side] = path.name
            row["settings"] = gen_a.settings[i]
        timings = {side: {"config": name, "load_s": g.load_s, "generate_s": g.generate_s,
                          "per_image_s": g.generate_s / len(cases), "peak_gib": g.peak_gib}
                   for side, name, g in (("a", args.a, gen_a), ("b", args.b, gen_b))}  # fmt: skip
        report = {
            "config": {"model": model, "a": args.a, "b": args.b, "device": device, "seed": args.seed,
                       "width": args.width, "height": args.height, "recipe": args.recipe,
                       "steps": gen_a.settings[0].get("steps"), "emulate_fp8": args.emulate_fp8,
                       "scorers": specs, "builtin_prompts": args.prompts is None},
            "summary": summary, "timings": timings, "rows": rows,
            "warnings": gen_a.warnings + [w for w in gen_b.warnings + warnings if w not in gen_a.warnings],
        }  # fmt: skip
        (args.out / "compare.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        log(f"wrote {args.out / 'compare.json'} and {2 * len(rows)} PNGs")
    return 0


"""`hidream-serve calibrate-pruning`: how well do early previews rank the candidates, on this model and judge?

Runs a prompt set with N seeds each (no pruning), scores every candidate's free preview (the engine's
clean-image prediction, `on_step`) at every step with the service's composite scorer, and the final
images too. Per step it reports, averaged over prompts:

- `spearman`: Spearman correlation of the preview composite and the final composite over the N seeds;
- `top-1`: how often the best preview is the final winner;
- `survive keep=k`: how often the final winner is among the ceil(k * N) best previews, i.e. would
  survive a `prune {"at": at, "keep": k}` stage there (ranked exactly as the service ranks), with the
  fraction of the N x steps denoising steps such a run computes.

Pick a schedule from the table on real weights (`--model`, `--pickscore`, `--clip`, `--dino`, or
`--serve-config deploy/serve_config.yaml` to take the model, scorers and weights from the service) and a
prompt set like your traffic. On the embedded tiny model it only shows that the machinery works.
The service prunes within each seed group of a request (`router.prune_group_size`); the table assumes
the whole set ranks together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .scoring.pruning import keep_count, rank_key, survivors

BUILTIN_PROMPTS = (
    "a red fox in fresh snow, golden hour",
    "a lighthouse on a rocky coast at dusk, long exposure",
    "portrait of an old fisherman with a knitted cap, 85mm photo",
    "a bowl of ramen on a wooden table, top-down food photography",
    "an isometric illustration of a tiny library inside a tree",
    "a neon sign that says OPEN in a rainy alley at night",
)
DEFAULT_KEEP = (0.25, 0.5, 0.75)


@dataclass
class Case:
    prompt: str
    mode: str = "t2i"
    refs: list = field(default_factory=list)  # PIL images
    roles: list = field(default_factory=list)
    layout_boxes: list | None = None


def load_cases(path: Path | None) -> list[Case]:
    """Built-in t2i prompts, a text file (one prompt per line, `#` comments) or JSON lines / a JSON list of
    {"prompt", "mode"?, "refs"?: [path or {"path", "role"}], "layout_boxes"?}; ref paths are relative to the file."""
    if path is None:
        return [Case(p) for p in BUILTIN_PROMPTS]
    text = path.read_text()
    if path.suffix not in (".json", ".jsonl"):
        return [Case(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    from PIL import Image

    items = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    cases = []
    for item in items:
        refs, roles = [], []
        for r in item.get("refs") or []:
            r = {"path": r} if isinstance(r, str) else r
            refs.append(Image.open(path.parent / r["path"]).convert("RGB"))
            roles.append(r.get("role"))
        cases.append(Case(item["prompt"], item.get("mode", "t2i"), refs, roles, item.get("layout_boxes")))
    return cases


def average_ranks(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant or n < 2."""
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def winner_index(scores, seeds) -> int:
    """The service's rule: highest score, ties to the lowest seed."""
    return min(range(len(scores)), key=lambda i: rank_key(scores[i], seeds[i]))


def _composite(raw_by_seed: dict[int, dict[str, float]], seeds: list[int], weights: dict):
    from .scoring.composite import combine

    names = set.intersection(*(set(raw_by_seed[s]) for s in seeds)) if seeds else set()
    raw = {n: [raw_by_seed[s][n] for s in seeds] for n in names}
    return combine(raw, weights, len(seeds))[0], raw


def calibrate(pipe, scorer, cases: list[Case], seeds: list[int], *, width: int, height: int, steps: int | None,
              recipe: str = "full", exact_size: bool = True, keeps=DEFAULT_KEEP, every: int = 1,
              log=print) -> dict:  # fmt: skip
    """Run every case, return {"rows": per-step summary, "cases": per-case detail, "warnings": [...]}."""
    from .engine.params import GenerationParams
    from .scoring.context import ScoreContext

    warnings: list[str] = []
    detail = []
    num_steps = None
    for ci, case in enumerate(cases):
        t0 = time.perf_counter()
        ctx = ScoreContext(case.mode, case.refs, case.roles)
        params = GenerationParams(mode=case.mode, prompt=case.prompt, refs=case.refs, ref_roles=case.roles,
                                  layout_boxes=case.layout_boxes, width=width, height=height, exact_size=exact_size,
                                  recipe=recipe, steps=steps)  # fmt: skip
        per_step: dict[int, dict[int, dict[str, float]]] = {}

        def hook(state, ctx=ctx, case=case, per_step=per_step):
            if state.step % every and state.step != state.num_steps - 1:
                return None
            previews = [state.preview(i) for i in range(len(state.seeds))]
            raw, warn = scorer.raw_scores(case.prompt, previews, ctx)
            for w in warn:
                if w not in warnings:
                    warnings.append(w)
            for j, seed in enumerate(state.seeds):
                per_step.setdefault(state.step, {}).setdefault(seed, {}).update({k: v[j] for k, v in raw.items()})
            return None

        result = pipe(params, seeds, on_step=hook)
        num_steps = int(result.settings["steps"])
        final_raw, warn = scorer.raw_scores(case.prompt, [c.image for c in result.candidates], ctx)
        warnings.extend(w for w in warn if w not in warnings)
        weights = scorer.weights_for(case.mode)
        final_by_seed = {s: {k: v[j] for k, v in final_raw.items()} for j, s in enumerate(seeds)}
        final, final_named = _composite(final_by_seed, seeds, weights)
        win = winner_index(final, seeds)
        steps_out = []
        for step in sorted(per_step):
            prev, prev_named = _composite(per_step[step], seeds, weights)
            kept = {}
            for k in keeps:
                pos = survivors(prev, seeds, k)
                kept[str(k)] = win in (pos if pos is not None else range(len(seeds)))
            steps_out.append({
                "step": step, "at": (step + 1) / num_steps, "composite": prev, "spearman": spearman(prev, final),
                "top1": winner_index(prev, seeds) == win, "survives": kept,
                "spearman_by_scorer": {n: spearman(prev_named[n], final_named[n]) for n in prev_named
                                       if n in final_named},
                "raw": prev_named,
            })  # fmt: skip
        detail.append({"prompt": case.prompt, "mode": case.mode, "seeds": seeds, "final": final,
                       "final_raw": final_named, "winner": seeds[win], "steps": steps_out})  # fmt: skip
        log(f"[{ci + 1}/{len(cases)}] {case.mode} {case.prompt[:60]!r}: winner seed {seeds[win]} "
            f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip

    rows = []
    n = len(seeds)
    for step in sorted({s["step"] for c in detail for s in c["steps"]}):
        entries = [s for c in detail for s in c["steps"] if s["step"] == step]
        rhos = [e["spearman"] for e in entries if e["spearman"] is not None]
        row = {"step": step + 1, "at": round((step + 1) / num_steps, 4),
               "spearman": float(np.mean(rhos)) if rhos else None,
               "spearman_std": float(np.std(rhos)) if rhos else None,
               "top1": float(np.mean([e["top1"] for e in entries])), "survive": {}, "cost": {}, "cases": len(entries)}
        names = sorted({k for e in entries for k in e["spearman_by_scorer"]})
        row["spearman_by_scorer"] = {}
        for name in names:
            vals = [e["spearman_by_scorer"].get(name) for e in entries]
            vals = [v for v in vals if v is not None]
            row["spearman_by_scorer"][name] = float(np.mean(vals)) if vals else None
        for k in keeps:
            row["survive"][str(k)] = float(np.mean([e["survives"][str(k)] for e in entries]))
            kept = keep_count(k, n)
            row["cost"][str(k)] = ((step + 1) * n + (num_steps - step - 1) * kept) / (num_steps * n)
        rows.append(row)
    return {"rows": rows, "cases": detail, "warnings": warnings, "steps": num_steps, "seeds": n}


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.2f}"


def markdown(result: dict, keeps, header: dict) -> str:
    lines = [
        "# Pruning calibration",
        "",
        ", ".join(f"{k}: {v}" for k, v in header.items()),
        "",
        "`at`: the `prune` fraction that fires after this step. `spearman`: rank correlation of preview and final "
        "composite scores (mean over prompts). `top-1`: the best preview is the final winner. `keep k`: how often the "
        "final winner survives `prune {at, keep: k}`, and in brackets the share of the N x steps denoising steps that "
        "run computes.",
        "",
        "| step | at | spearman | top-1 | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|---|---|---|" + "---|" * len(keeps),
    ]
    for r in result["rows"]:
        cells = [str(r["step"]), f"{r['at']:.2f}", _fmt(r["spearman"]), _fmt(r["top1"], pct=True)]
        cells += [f"{_fmt(r['survive'][str(k)], pct=True)} ({_fmt(r['cost'][str(k)], pct=True)})" for k in keeps]
        lines.append("| " + " | ".join(cells) + " |")
    if result["warnings"]:
        lines += ["", "Scorer warnings:", ""] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate-pruning", help="measure how well early previews predict the final ranking",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="checkpoint directory or embedded:tiny (default: $HIDREAM_MODEL_PATH, else "
                   "embedded:tiny)")  # fmt: skip
    p.add_argument("--serve-config", type=Path, help="take model, scorers and scorer weights from this serve YAML "
                   "(applications[0].args); the options below override it")  # fmt: skip
    p.add_argument("--pickscore", help="PickScore directory, embedded:tiny-pickscore or none (scorers left unset: "
                   "their environment variable, else the tiny ones beside the embedded model, else none)")  # fmt: skip
    p.add_argument("--pickscore-processor", help="directory with PickScore's tokenizer/preprocessor if apart")
    p.add_argument("--clip", help="CLIP directory, embedded:tiny-clip or none")
    p.add_argument("--dino", help="DINOv2 directory, embedded:tiny-dino or none")
    p.add_argument("--weights", help='composite weights JSON, e.g. \'{"t2i": {"pickscore": 1, "clip": 0}}\'')
    p.add_argument("--prompts", type=Path, help="prompt file: .txt (one per line) or .jsonl/.json with mode/refs; "
                   "default: a built-in list of t2i prompts")  # fmt: skip
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--seeds", type=int, default=8, help="candidates per prompt (N)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--snap-size", action="store_true", help="snap to the nearest trained size (default: exact, "
                   "multiples of 32)")  # fmt: skip
    p.add_argument("--recipe", choices=["full", "dev"], default="full")
    p.add_argument("--steps", type=int, help="default: the recipe's")
    p.add_argument("--keep", default=",".join(str(k) for k in DEFAULT_KEEP),
                   help="keep fractions to evaluate, comma-separated (default %(default)s)")  # fmt: skip
    p.add_argument("--every", type=int, default=1, help="score previews every K steps (and the last)")
    p.add_argument("--batch", type=int, help="candidates per forward (default: all seeds, at most 8)")
    p.add_argument("--device", help="cpu or cuda[:N], generator and scorers (default: the serve config's "
                   "`device`, else cuda if available)")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="generator dtype (default: the serve config's "
                   "`dtype`, else bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("calibration.md"), help="markdown table; the JSON goes beside "
                   "it with .json (default %(default)s)")  # fmt: skip
    p.set_defaults(func=run)


def _parse_keeps(text: str) -> list[float]:
    keeps = []
    for part in text.split(","):
        k = float(part)
        if not 0 < k <= 1:
            raise ValueError(f"--keep values must lie in (0, 1], got {k}")
        keeps.append(k)
    return keeps


def run(args) -> int:
    import torch

    from .embedded import (
        DEFAULT_DINO, DEFAULT_MODEL, DEFAULT_PICKSCORE, DEFAULT_SCORER, ENV_DINO, ENV_MODEL, ENV_PICKSCORE,
        ENV_PICKSCORE_PROCESSOR, ENV_SCORER, is_embedded, optional_model_dir, resolve_model,
    )  # fmt: skip
    from .engine.pipeline import HiDreamPipeline
    from .scoring.composite import CompositeScorer
    from .scoring.settings import ModeWeights, RoleWeights

    try:
        keeps = _parse_keeps(args.keep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seeds < 2:
        print("error: --seeds must be at least 2 (ranks need two candidates)", file=sys.stderr)
        return 2
    cfg: dict = {}
    if args.serve_config:
        import yaml

        cfg = yaml.safe_load(args.serve_config.read_text())["applications"][0].get("args") or {}
    scorer_cfg = cfg.get("scorer") or {}
    model = resolve_model(args.model or cfg.get("model"), ENV_MODEL, DEFAULT_MODEL)
    embedded = is_embedded(model)

    def spec(cli, key, env, tiny):  # unset: env, else tiny beside the embedded model, else none
        return resolve_model(cli or cfg.get(key), env, tiny if embedded else "none")

    specs = {
        "pickscore": spec(args.pickscore, "pickscore_model", ENV_PICKSCORE, DEFAULT_PICKSCORE),
        "clip": spec(args.clip, "scorer_model", ENV_SCORER, DEFAULT_SCORER),
        "dino": spec(args.dino, "dino_model", ENV_DINO, DEFAULT_DINO),
    }
    processor = resolve_model(args.pickscore_processor or cfg.get("pickscore_processor"), ENV_PICKSCORE_PROCESSOR,
                              "none")  # fmt: skip
    weights = ModeWeights.model_validate(json.loads(args.weights) if args.weights else scorer_cfg.get("weights") or {})
    roles = RoleWeights.model_validate(scorer_cfg.get("role_weights") or {})
    cases = load_cases(args.prompts)[: args.max_prompts]
    if not cases:
        print("error: no prompts", file=sys.stderr)
        return 2

    from .embedded import model_dir

    t0 = time.perf_counter()
    device = args.device or (cfg.get("device") if cfg.get("device") not in (None, "auto") else None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or (cfg.get("dtype") if cfg.get("dtype") not in (None, "auto") else None)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    pipe = HiDreamPipeline.from_pretrained(model_dir(model), device=device, dtype=dtype,
                                           max_batch=args.batch or min(args.seeds, 8))  # fmt: skip
    scorer = CompositeScorer.load(**{k: optional_model_dir(v) for k, v in specs.items()},
                                  pickscore_processor=optional_model_dir(processor), device=device,
                                  weights=weights, role_weights=roles)  # fmt: skip
    print(f"loaded {model} and scorers {scorer.describe()} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    seeds = list(range(args.seed, args.seed + args.seeds))
    result = calibrate(pipe, scorer, cases, seeds, width=args.width, height=args.height, steps=args.steps,
                       recipe=args.recipe, exact_size=not args.snap_size, keeps=keeps, every=max(1, args.every),
                       log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    header = {"model": model, "prompts": len(cases), "seeds": args.seeds, "steps": result["steps"],
              "size": f"{args.width}x{args.height}", "recipe": args.recipe,
              "scorers": ", ".join(k for k, v in scorer.models.items() if v is not None) or "quality guard only"}
    table = markdown(result, keeps, header)
    out_md = args.out if args.out.suffix == ".md" else args.out.with_suffix(".md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(table)
    out_json = out_md.with_suffix(".json")
    out_json.write_text(json.dumps({"config": {**header, "keep": keeps, "specs": specs,
                                               "weights": {m: weights.for_mode(m) for m in {c.mode for c in cases}},
                                               "seconds": time.perf_counter() - t0}, **result}, indent=1))  # fmt: skip
    print(table)
    print(f"wrote {out_md} and {out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="hidream-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))

"""A/B of engine settings on whole denoising runs: the full-size random model, each case run with every
variant in turn, for several interleaved rounds. Under the GPU's power cap the clock drifts by a few percent
between minutes and between machines, so settings are compared only within one run, round by round.

    python bench/ab_pipeline.py --assets ../shared/assets [--cases skeleton6,t2i_full] [--rounds 3] [--out F]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import PROMPT, SIZE, SKELETON_REFS, WARM_STEPS, load_refs, run_case  # noqa: E402

from hidream_serve.engine.params import GenerationParams  # noqa: E402
from hidream_serve.random_model import make_pipeline, random_full_model, tokenizer_dir  # noqa: E402

VARIANTS = {  # name: pipeline options
    "default": {},
    "untuned compile": {"compile_tuning": False},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    ap.add_argument("--cases", default="skeleton6,t2i_full,dev_t2i")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model, _ = random_full_model(dev)
    tok_dir = tokenizer_dir()
    base = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=args.steps)
    cases = {
        "skeleton6": dict(mode="skeleton", refs=load_refs(args.assets / "IP_skeleton", SKELETON_REFS)),
        "t2i_full": dict(mode="t2i", recipe="full"),
        "dev_t2i": dict(mode="t2i", recipe="dev"),
    }
    cases = {name: GenerationParams(**base, **cases[name]) for name in args.cases.split(",")}
    names = args.variants.split(",")
    times: dict[tuple[str, str], list[float]] = {(c, v): [] for c in cases for v in names}
    for r in range(args.rounds):
        for v in names:
            torch._dynamo.reset()  # variants compile their own graphs (warm caches make later rounds quick)
            pipe = make_pipeline(model, tok_dir, max_batch=8, fuse=True, compile=True, **VARIANTS[v])
            for c, params in cases.items():
                pipe(replace(params, steps=WARM_STEPS), [1])
                _, timer, _, _ = run_case(pipe, params, [42])
                times[(c, v)].append(timer.s_per_step())
                print(f"round {r} {c:10s} {v:20s} {times[(c, v)][-1]:.4f} s/step", flush=True)
    lines = [
        f"# Whole-run A/B on {torch.cuda.get_device_name()} (torch {torch.__version__}), {args.steps} steps per run",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        "| case | variant | s/step, median of rounds | rounds |",
        "|---|---|---|---|",
    ]
    for (c, v), ts in times.items():
        lines.append(f"| {c} | {v} | {statistics.median(ts):.4f} | {', '.join(f'{t:.4f}' for t in ts)} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

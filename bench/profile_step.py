"""Where a denoising step's GPU time goes: torch.profiler over a few steps of the full-size random model.

    python bench/profile_step.py [--recipe dev|full] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import SIZE, SKELETON_REFS, load_refs  # noqa: E402

from hidream_serve.engine.params import GenerationParams  # noqa: E402
from hidream_serve.random_model import random_full_pipeline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dev", choices=["dev", "full"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attention", default="auto", choices=["auto", "fa3", "cudnn", "flash"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--skeleton", type=Path, default=None, metavar="ASSETS",
                    help="profile skeleton6 (full recipe, the six IP_skeleton refs under ASSETS) instead of t2i")
    args = ap.parse_args()
    pipe = random_full_pipeline("cuda", fuse=True, compile=not args.no_compile, attention=args.attention)
    steps = 28 if args.recipe == "dev" else 4
    params = GenerationParams(mode="t2i", prompt="a fox", width=SIZE, height=SIZE, recipe=args.recipe, steps=steps)
    if args.skeleton is not None:
        params = GenerationParams(mode="skeleton", prompt="a woman", width=SIZE, height=SIZE, recipe="full", steps=4,
                                  refs=load_refs(args.skeleton / "IP_skeleton", SKELETON_REFS))  # fmt: skip
    pipe(params, [1])  # warm-up / compile
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(params, [1])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    print(f"{params.mode}, recipe {params.recipe}, {params.steps} steps, compile {not args.no_compile}, "
          f"attention {pipe.attention}")
    print(table)
    print_gpu_idle(prof)
    return 0


def print_gpu_idle(prof, top: int = 12) -> None:
    """How long the GPU sat idle between kernels/copies over the profiled run, and the largest gaps."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    gpu = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0), e["name"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e
    )
    if not gpu:
        print("no GPU events in the trace")
        return
    busy, gaps, end, prev = 0.0, [], gpu[0][0], gpu[0][2]
    for start, stop, name in gpu:
        if start > end:
            gaps.append((start - end, prev, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev = stop, name
    span = end - gpu[0][0]
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms "
          f"({100 * (span - busy) / span:.1f}%) in {len(gaps)} gaps")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap / 1e3:8.3f} ms  after {before[:60]!r}  before {after[:60]!r}")


if __name__ == "__main__":
    sys.exit(main())

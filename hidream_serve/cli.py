"""Command line: `hidream-serve tiny-checkpoint`, `hidream-serve generate` and `hidream-serve calibrate-pruning`;
`submit`, `jobs` and `cancel` talk to a running server (hidream_serve/client.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .engine.errors import EngineError
from .vocabulary import MODES, RECIPES, SCHEDULERS

DTYPES = ("float32", "bfloat16")  # torch dtype names


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write a tiny random-weight checkpoint in the official layout")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="write N safetensors shards with an index")
    p.set_defaults(func=_cmd_tiny)


def _cmd_tiny(args) -> int:
    from .tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.dir, seed=args.seed, shards=args.shards)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one image with the engine (no server)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", action="append", default=[], type=Path, help="reference image (repeat, in order)")
    p.add_argument("--layout-boxes", help='JSON, e.g. \'[[0.1,0.5,0.2,0.9]]\' or [{"bbox": [...], "text": "..."}]')
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--exact-size", action="store_true", help="use width/height as given (multiples of 32)")
    p.add_argument("--recipe", choices=RECIPES, default="full")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=32)
    p.add_argument("--shift", type=float)
    p.add_argument("--guidance", type=float)
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--noise-scale-start", type=float)
    p.add_argument("--noise-scale-end", type=float)
    p.add_argument("--noise-clip-std", type=float)
    p.add_argument("--keep-original-aspect", action="store_true")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quantize", choices=("fp8",), help="decoder projections in FP8 (GPUs with FP8 tensor cores)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_cmd_generate)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write an FP8 checkpoint (e4m3 decoder projections + scales) that loads directly")
    p.add_argument("--model", required=True, type=Path, help="bf16 checkpoint directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda", help="where to quantize (a GPU with FP8 tensor cores)")
    p.add_argument("--emulate-fp8", action="store_true", help="allow a device without FP8 tensor cores (testing)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args) -> int:
    import torch

    from .engine.checkpoint import load_checkpoint
    from .engine.fp8 import save_fp8_checkpoint

    ckpt = load_checkpoint(args.model, args.device, torch.bfloat16, quantize="fp8", fp8_emulate=args.emulate_fp8)
    save_fp8_checkpoint(ckpt.model, args.model, args.out)
    print(f"wrote FP8 checkpoint to {args.out}")
    return 0


def _cmd_generate(args) -> int:
    import torch
    from PIL import Image

    from .engine.params import GenerationParams
    from .engine.pipeline import HiDreamPipeline

    layout = None
    if args.layout_boxes:
        try:
            layout = json.loads(args.layout_boxes)
        except json.JSONDecodeError as e:
            raise EngineError(f"--layout-boxes: not valid JSON: {e}") from None
    refs = []
    for i, path in enumerate(args.ref):
        try:
            refs.append(Image.open(path).convert("RGB"))
        except OSError as e:
            raise EngineError(f"--ref #{i + 1} ({path}): cannot read image: {e}") from None
    params = GenerationParams(
        mode=args.mode, prompt=args.prompt, refs=refs, layout_boxes=layout, width=args.width, height=args.height,
        exact_size=args.exact_size, keep_original_aspect=args.keep_original_aspect, recipe=args.recipe,
        steps=args.steps, guidance=args.guidance, shift=args.shift, scheduler=args.scheduler,
        noise_scale_start=args.noise_scale_start, noise_scale_end=args.noise_scale_end,
        noise_clip_std=args.noise_clip_std,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    pipe = HiDreamPipeline.from_pretrained(args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                                           max_batch=1)  # fmt: skip
    t1 = time.perf_counter()
    result = pipe(params, [args.seed])
    t2 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.candidates[0].image.save(args.out)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    report = {
        "out": str(args.out), "mode": args.mode, "seed": args.seed, "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""), **result.settings,
        "load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny(sub)
    _add_generate(sub)
    _add_quantize(sub)
    from .calibrate import add_parser as _add_calibrate

    _add_calibrate(sub)
    from .compare import add_parser as _add_compare

    _add_compare(sub)
    from .client import add_parsers as _add_client

    _add_client(sub)
    from .sweeps_client import add_parser as _add_sweep

    _add_sweep(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""FP8 levers on the full-size random model: which projections in FP8 (accuracy against float32), fast
accumulation (speed), and a profile of a compiled FP8 step.

    python bench/fp8_levers.py [--out DIR]

Accuracy is the x0 prediction of bench_gpu's parity input (2-seed skeleton, 1024², one step) against the
float32 model, on the plain (unfused, eager) path, next to plain bf16's. Speed is t2i full 2048², 8 steps,
fused + compiled, as bench_gpu measures it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import PROMPT, SIZE, WARM_STEPS, predict_once, rel_error, run_case, set_param_dtype  # noqa: E402
from profile_step import print_gpu_idle  # noqa: E402

from hidream_serve.engine.fp8 import DECODER_PROJECTIONS, FP8Linear, quantize_decoder  # noqa: E402
from hidream_serve.engine.params import GenerationParams  # noqa: E402
from hidream_serve.random_model import make_pipeline, random_full_model, tokenizer_dir  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
N_LAYERS = 36
ACCURACY_VARIANTS = {  # name -> quantize_decoder(skip_layers=..., skip_projections=...)
    "all projections": ((), ()),
    "attention only (MLP bf16)": ((), MLP),
    "MLP only (attention bf16)": ((), ATTN),
    "all but down_proj": ((), ("down_proj",)),
    "all but o_proj and down_proj": ((), ("o_proj", "down_proj")),
    "all but first and last 2 layers": ((0, 1, N_LAYERS - 2, N_LAYERS - 1), ()),
    "all but first and last 4 layers": ((0, 1, 2, 3, N_LAYERS - 4, N_LAYERS - 3, N_LAYERS - 2, N_LAYERS - 1), ()),
    "all, fast accumulation": ((), (), True),
}


def restore(model, originals) -> None:
    """Put the bf16 linears back (unfused), so that the next variant quantizes from the same weights."""
    for (i, parent_name, name), lin in originals.items():
        layer = model.model.language_model.layers[i]
        setattr(getattr(layer, parent_name), name, lin)
        layer.self_attn.qkv_fp8 = layer.mlp.gate_up_fp8 = None
        layer.self_attn.use_fused = layer.mlp.use_fused = False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    tok_dir = tokenizer_dir()
    model, _ = random_full_model(dev)
    originals = {(i, p, n): getattr(getattr(layer, p), n)
                 for i, layer in enumerate(model.model.language_model.layers) for p, n in DECODER_PROJECTIONS}  # fmt: skip

    # 1. accuracy: each variant against float32, on the plain path
    plain = make_pipeline(model, tok_dir, max_batch=8, fuse=False, attention="flash")
    set_param_dtype(model, torch.float32)
    ref32 = predict_once(plain, dev)
    set_param_dtype(model, torch.bfloat16)
    torch.cuda.empty_cache()
    accuracy = {"bf16 (no FP8)": rel_error(predict_once(plain, dev), ref32)}
    for name, spec in ACCURACY_VARIANTS.items():
        skip_layers, skip_projections, fast_accum = (*spec, False)[:3]
        quantize_decoder(model, skip_layers=skip_layers, skip_projections=skip_projections, fast_accum=fast_accum)
        fp8_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, FP8Linear))
        accuracy[name] = rel_error(predict_once(plain, dev), ref32)
        accuracy[name + " [share of projection weights in FP8]"] = round(fp8_params / 6.95e9, 3)
        restore(model, originals)
        print(f"accuracy {name:40s} {accuracy[name]:.4f}")
    bf16_err = accuracy["bf16 (no FP8)"]
    del plain

    # 2. speed: t2i full, fused + compiled, fast accumulation off / on
    params = GenerationParams(mode="t2i", prompt=PROMPT, width=SIZE, height=SIZE, recipe="full", steps=8)
    warm = GenerationParams(mode="t2i", prompt=PROMPT, width=SIZE, height=SIZE, recipe="full", steps=WARM_STEPS)
    speed = {}
    for fast_accum in (False, True):
        torch._dynamo.reset()
        restore(model, originals)
        quantize_decoder(model, fast_accum=fast_accum)
        pipe = make_pipeline(model, tok_dir, max_batch=8, fuse=True, compile=True, attention="auto")
        t0 = time.perf_counter()
        pipe(warm, [1])
        compile_s = time.perf_counter() - t0
        _, timer, _, _ = run_case(pipe, params, [42])  # peak memory: the bf16 originals are kept too
        speed[f"fast_accum={fast_accum}"] = {"s_per_step": round(timer.s_per_step(), 4),
                                             "warmup_s": round(compile_s, 1), "attention": pipe.attention}  # fmt: skip
        print(f"speed fast_accum={fast_accum}: {speed[f'fast_accum={fast_accum}']}")

    # 3. profile of the last variant's compiled step
    from torch.profiler import ProfilerActivity, profile

    params_p = GenerationParams(mode="t2i", prompt=PROMPT, width=SIZE, height=SIZE, recipe="full",
                                steps=args.profile_steps)  # fmt: skip
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe(params_p, [1])
        torch.cuda.synchronize()
    rows = []
    total = sum(e.device_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:20]:
        rows.append({"kernel": e.key[:90], "ms": round(e.device_time_total / 1e3, 2),
                     "share": round(e.device_time_total / total, 3), "calls": e.count})  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80))
    print_gpu_idle(prof)

    report = {"gpu": gpu, "command": command, "torch": torch.__version__, "accuracy_rel_error_vs_fp32": accuracy,
              "accuracy_x_bf16": {k: round(v / bf16_err, 2) for k, v in accuracy.items() if "[" not in k},
              "speed_t2i_full": speed, "profile_steps": args.profile_steps, "profile_top_kernels": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    (args.out / f"fp8-levers-{slug}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

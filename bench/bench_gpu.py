"""GPU benchmark of the engine with the full-size HiDream-O1-Image architecture and random bf16 weights.

The cost is the real cost: Qwen3-VL-8B text decoder (36 layers, hidden 4096, 32 heads / 8 KV heads,
head_dim 128, intermediate 12288, rope theta 5e6, interleaved mrope 24/20/20), the 27-layer vision
tower with DeepStack at 8/16/24, and the pixel heads. Writes bench/results/<gpu>.json and .md with
the command that produced them, and prints the table.

    python bench/bench_gpu.py [--assets DIR] [--out bench/results] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timings import cuda_time  # noqa: E402

from hidream_serve.engine import network  # noqa: E402
from hidream_serve.engine.fp8 import check_fp8_device, quantize_decoder  # noqa: E402
from hidream_serve.engine.network import fa3_supports  # noqa: E402
from hidream_serve.engine.params import GenerationParams  # noqa: E402
from hidream_serve.engine.pipeline import (  # noqa: E402
    COMPILE_TUNING,
    CompiledLayer,
    HiDreamPipeline,
    resolve_attention,
)
from hidream_serve.random_model import make_pipeline, random_full_model, tokenizer_dir  # noqa: E402

SIZE = 2048
# skeleton6: face, background, pose and three garments from the official examples (assets/IP_skeleton)
SKELETON_REFS = ["0.face.jpg", "0.bg.jpg", "0.openpose.jpg", "0.part_1.jpg", "0.part_2.jpg", "0.part_3.jpg"]
WARM_STEPS = 4  # enough to pass every scheduler path once (UniPC's order-2 corrector starts at step 3)
PROMPT = (
    "medium shot, eye-level, front view. A woman is seated in an ornate bedroom, illuminated by candlelight, "
    "with a calm and composed expression; cream satin robe with floral embroidery, pearl drop earrings, a carved "
    "wooden headboard, three lit white candles on a nightstand, warm shadows across the room."
)


# ----------------------------------------------------------------------------- measurement


def matmul_ceiling_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ b, reps=10) / 1e12


def step_flops(cfg, prefix_lens: list[int], gen_len: int, target_len: int, rows_per_caption: int) -> float:
    """Matmul + attention FLOPs of one denoising step (all rows), counted from the shapes."""
    t = cfg.text_config
    d, hd, h, kv, f = t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size
    per_token_linear = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    total = 0.0
    for p in prefix_lens:
        layer = gen_len * per_token_linear + 4 * gen_len * (p + gen_len) * hd * h
        heads = 2 * (gen_len - 1) * (3072 * d // 4 + d // 4 * d) + 2 * target_len * d * 3072
        total += rows_per_caption * (t.num_hidden_layers * layer + heads)
    return total


class StepTimer:
    """Per-step hook: records a CUDA event after every step (no synchronisation, so the measurement does not
    stall the pipeline); optional pruning schedule."""

    def __init__(self, prune: list[tuple[float, float]] | None = None):
        self.events: list = []
        self.prune = prune or []

    @property
    def stamps(self) -> list[float]:
        """Seconds since the first step's event, one per step (call after the run)."""
        torch.cuda.synchronize()
        return [self.events[0].elapsed_time(e) / 1000 for e in self.events]

    def __call__(self, state):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        for at, keep in self.prune:
            if state.step == max(0, round(at * state.num_steps) - 1):
                n = max(1, math.ceil(len(state.seeds) * keep))
                return list(range(n))  # the benchmark keeps the first n; the service ranks previews
        return None

    def s_per_step(self) -> float:
        stamps = self.stamps
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return statistics.median(gaps[1:] if len(gaps) > 2 else gaps)


def run_case(pipe, params, seeds, prune=None):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(prune)
    t0 = time.perf_counter()
    result = pipe(params, seeds, on_step=timer)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return result, timer, wall, torch.cuda.max_memory_allocated() / 2**30


def load_refs(assets: Path | None, names: list[str]):
    from PIL import Image

    if assets is not None and all((assets / n).is_file() for n in names):
        return [Image.open(assets / n).convert("RGB") for n in names]
    import numpy as np

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (768, 640, 3), dtype=np.uint8)) for _ in names]


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--quick", action="store_true", help="fewer steps for the per-step cases")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--levers", action="store_true", help="also time each lever on t2i_full")
    ap.add_argument("--attention", default="auto", choices=["auto", "fa3", "cudnn", "flash"])
    ap.add_argument("--no-fp8", action="store_true", help="skip the quantize=fp8 cases (run after the bf16 ones)")
    ap.add_argument("--cases", nargs="+", metavar="CASE", help="run only these bf16 cases (default: all); the FP8 "
                    "cases follow those of t2i_full, dev_t2i and skeleton6 that are run")  # fmt: skip
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    tok_dir = tokenizer_dir()

    t0 = time.perf_counter()
    model, cfg = random_full_model(dev)
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    ceiling = matmul_ceiling_tflops(dev)
    print(f"{gpu}: model built in {build_s:.1f}s, weights {weights_gib:.2f} GiB, bf16 matmul ceiling {ceiling:.0f} TFLOP/s")

    plain = make_pipeline(model, tok_dir, max_batch=8, fuse=False, attention="flash")
    # before `fast` exists: fusing is a property of the shared model, and the check toggles it
    parity, ref32 = check_fast_matches_plain(plain, resolve_attention(args.attention, model), dev)
    fast = make_pipeline(model, tok_dir, max_batch=8, fuse=True, compile=not args.no_compile, attention=args.attention)

    per_step_steps = 4 if args.quick else 8
    base = dict(prompt=PROMPT, width=SIZE, height=SIZE)
    cases_spec = {
        "t2i_full": (dict(mode="t2i", recipe="full"), [42], None),
        "dev_t2i": (dict(mode="t2i", recipe="dev"), [42], None),
        "skeleton6": (dict(mode="skeleton", refs=load_refs(args.assets / "IP_skeleton", SKELETON_REFS),
                           steps=per_step_steps), [42], None),
        "ip10": (dict(mode="ip", refs=load_refs(args.assets / "IP", [f"{i}.jpg" for i in range(1, 11)]),
                      steps=per_step_steps), [42], None),
        "edit": (dict(mode="edit", refs=load_refs(args.assets / "edit", ["test.jpg"]), steps=per_step_steps), [42], None),
        "bestof4_t2i": (dict(mode="t2i", recipe="full"), [42, 43, 44, 45], None),
        "bestof4_t2i_pruned": (dict(mode="t2i", recipe="full"), [42, 43, 44, 45], [(0.25, 0.5), (0.5, 0.5)]),
    }  # fmt: skip

    unknown = set(args.cases or ()) - set(cases_spec)
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}; choose from {list(cases_spec)}")
    cases_spec = {k: v for k, v in cases_spec.items() if not args.cases or k in args.cases}
    bestof = [n for n in ("bestof4_t2i", "bestof4_t2i_pruned") if n in cases_spec]
    warm_s = warm_up(fast, base, batches=(1, 2, 3, 4) if bestof else (1,))
    cases = {name: measure_case(fast, cfg, base, ceiling, name, *spec) for name, spec in cases_spec.items()}
    single = cases["t2i_full"]["wall_s"] if "t2i_full" in cases else None
    for name in bestof if single else ():
        cases[name]["single_s"] = single
        cases[name]["x_single"] = round(cases[name]["wall_s"] / single, 2)
        cases[name]["x_single_step"] = round(cases[name]["s_per_step"] / cases["t2i_full"]["s_per_step"], 2)

    levers = time_levers(model, tok_dir, base) if args.levers else {}

    attention = fast.attention
    fp8 = {}
    if not args.no_fp8:
        # after every bf16 case: quantizing replaces the shared model's decoder projections in place
        del fast
        torch._dynamo.reset()  # compiled bf16 graphs hold the bf16 weights
        check_fp8_device(dev)
        t0 = time.perf_counter()
        quantize_decoder(model)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        fp8 = {"quantize_s": round(time.perf_counter() - t0, 1),
               "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}  # fmt: skip
        fast8 = make_pipeline(model, tok_dir, max_batch=8, fuse=True, compile=not args.no_compile,
                              attention=args.attention)  # fmt: skip
        parity["fp8_bf16_vs_fp32"] = float(f"{rel_error(predict_once(fast8, dev), ref32):.3e}")
        parity["fp8_within_budget"] = bool(parity["fp8_bf16_vs_fp32"] <= FP8_ERROR_BUDGET * parity["fast_bf16_vs_fp32"])
        print(f"fp8 vs float32: {parity['fp8_bf16_vs_fp32']} (budget {FP8_ERROR_BUDGET}x fast bf16)")
        fp8["warmup_s"] = warm_up(fast8, base, batches=(1,))
        for name in [n for n in ("t2i_full", "dev_t2i", "skeleton6") if n in cases]:
            cases[f"{name}_fp8"] = measure_case(fast8, cfg, base, ceiling, f"{name}_fp8", *cases_spec[name])
            cases[f"{name}_fp8"]["x_bf16"] = round(cases[name]["s_per_step"] / cases[f"{name}_fp8"]["s_per_step"], 2)

    report = {
        "gpu": gpu, "command": command, "torch": torch.__version__, "python": platform.python_version(),
        "flash_attn": _has_flash_attn(), "compile": not args.no_compile, "attention": attention,
        "ceiling_tflops": round(ceiling, 1), "weights_gib": round(weights_gib, 2), "model_build_s": round(build_s, 1),
        "warmup_s": round(warm_s, 1), "fast_vs_plain": parity, "cases": cases, "levers": levers, "fp8": fp8,
    }  # fmt: skip
    write_report(report, args.out)
    return 0


def warm_up(pipe, base, batches) -> float:
    """Warm-up (and compilation) on the shapes the cases use: both recipes, and every batch size the
    best-of-4 cases pass through (pruning shrinks the batch)."""
    t0 = time.perf_counter()
    for kw in (dict(mode="t2i", recipe="full"), dict(mode="t2i", recipe="dev")):
        pipe(GenerationParams(**base, **{**kw, "steps": WARM_STEPS}), [1])
    for n in batches:
        if n > 1:
            pipe(GenerationParams(**base, mode="t2i", recipe="full", steps=WARM_STEPS), list(range(1, n + 1)))
    warm_s = time.perf_counter() - t0
    print(f"warm-up (incl. compile) {warm_s:.1f}s")
    return round(warm_s, 1)


def measure_case(pipe, cfg, base, ceiling, name, kw, seeds, prune) -> dict:
    """One case: per-step time from CUDA events, peak memory, MFU counted from the shapes."""
    params = GenerationParams(**base, **kw)
    result, timer, wall, peak = run_case(pipe, params, seeds, prune)
    s = result.settings
    rows = len(s["prefix_tokens"])
    flops = step_flops(cfg, s["prefix_tokens"], 1 + s["target_tokens"] + s["ref_tokens"], s["target_tokens"], len(seeds))
    sps = timer.s_per_step()
    if prune:  # mixed batch sizes: average over the run, FLOPs counted per candidate-step actually computed
        computed = sum(c.steps_computed for c in result.candidates)
        stamps = timer.stamps
        span = stamps[-1] - stamps[0]
        sps = span / (len(stamps) - 1)
        flops = flops / len(seeds) * computed * (len(stamps) - 1) / len(stamps)
        flops_rate = flops / span
    else:
        flops_rate = flops / sps
    case = {
        "s_per_step": round(sps, 4), "peak_gib": round(peak, 2), "mfu": round(flops_rate / (ceiling * 1e12), 3),
        "steps": s["steps"], "seeds": len(seeds), "forwards_per_step": rows * len(seeds),
        "wall_s": round(wall, 2), "tokens": 1 + s["target_tokens"] + s["ref_tokens"], "prefix_tokens": s["prefix_tokens"],
    }  # fmt: skip
    if prune:
        case["prune"] = [{"at": a, "keep": k} for a, k in prune]
        case["steps_computed"] = sum(c.steps_computed for c in result.candidates)
        case["steps_full"] = len(seeds) * s["steps"]
    print(f"{name:20s} {len(seeds)} seed(s) {sps:.4f} s/step  wall {wall:.2f}s  peak {peak:.2f} GiB  "
          f"mfu {case['mfu']:.2f}")  # fmt: skip
    return case


def set_param_dtype(model, dtype) -> None:
    for prm in model.parameters():
        prm.data = prm.data.to(dtype)


FP8_ERROR_BUDGET = 2.5  # issue 19: FP8 vs float32 may be at most this many times the fast bf16 path's error
PARITY_PARAMS = dict(mode="skeleton", prompt=PROMPT, width=1024, height=1024, exact_size=True, steps=1)


def predict_once(pipe: HiDreamPipeline, dev) -> torch.Tensor:
    """One x0 prediction of a fixed 2-seed skeleton input (same noise, refs and timestep for every pipeline)."""
    params = GenerationParams(**PARITY_PARAMS, refs=load_refs(None, ["a", "b"]))
    g = torch.Generator(dev).manual_seed(1)
    t = torch.tensor([0.37], device=dev)
    prep = pipe.prepare(params)
    z = torch.randn(2, prep.cond.target_len, 3072, device=dev, generator=g).to(torch.bfloat16)
    ref = prep.cond.ref_patches.to(dev, pipe.dtype)
    ropes = [pipe.model.gen_rope(c.gen_positions[:, None]) for c in prep.cond.captions]
    return torch.cat(pipe._predict(prep, z.to(pipe.dtype), ref, t, ropes)).float()


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def check_fast_matches_plain(plain: HiDreamPipeline, fast_attention: str, dev) -> tuple[dict, torch.Tensor]:
    """The fused + compiled bf16 path against the plain bf16 path, both judged against a float32 reference
    (returned too, for the FP8 path's check).

    "Within bf16 tolerance" means the fast path is no further from float32 than the plain bf16 path is.
    """
    # float32 reference: upcast the (still unfused) model in place, then back; bf16 -> fp32 -> bf16 is exact
    # (parameters only: the rope buffers stay float32)
    set_param_dtype(plain.model, torch.float32)
    ref32 = predict_once(plain, dev)
    set_param_dtype(plain.model, torch.bfloat16)
    torch.cuda.empty_cache()
    a = predict_once(plain, dev)
    plain.model.fuse_projections(True)
    plain.attention, plain.layer_fn = fast_attention, CompiledLayer(fast_attention, options=COMPILE_TUNING)
    b = predict_once(plain, dev)
    plain.attention, plain.layer_fn = "flash", None
    plain.model.fuse_projections(False)
    out = {"plain_bf16_vs_fp32": rel_error(a, ref32), "fast_bf16_vs_fp32": rel_error(b, ref32),
           "fast_vs_plain": rel_error(b, a)}  # fmt: skip
    out = {k: float(f"{v:.3e}") for k, v in out.items()}
    out["ok"] = bool(math.isfinite(out["fast_bf16_vs_fp32"])
                     and out["fast_bf16_vs_fp32"] <= 1.25 * out["plain_bf16_vs_fp32"] + 1e-3)  # fmt: skip
    print(f"fast vs plain: {out}")
    return out, ref32


def time_levers(model, tok_dir, base) -> dict:
    """t2i_full per-step time with each lever toggled (8 steps each)."""
    out = {}
    params = GenerationParams(**base, mode="t2i", recipe="full", steps=8)
    variants = {
        "plain (unfused, eager, SDPA flash)": dict(fuse=False, compile=False, attention="flash"),
        "fused qkv/gate-up": dict(fuse=True, compile=False, attention="flash"),
        "fused + cuDNN attention": dict(fuse=True, compile=False, attention="cudnn"),
        "fused + torch.compile (SDPA flash)": dict(fuse=True, compile=True, attention="flash"),
        "fused + torch.compile + cuDNN attention": dict(fuse=True, compile=True, attention="cudnn"),
    }
    if fa3_supports(model.device, model.dtype, model.config.text_config.head_dim):
        variants["fused + torch.compile + FlashAttention-3"] = dict(fuse=True, compile=True, attention="fa3")
        variants["fused q/k/v only + torch.compile + FlashAttention-3"] = dict(fuse=True, compile=True, attention="fa3",
                                                                               separate_gate_up=True)
        variants["fused + torch.compile + FlashAttention-3, untuned compile"] = dict(
            fuse=True, compile=True, attention="fa3", compile_tuning=False)
    for name, v in variants.items():
        try:
            torch._dynamo.reset()  # compiled graphs fix the attention kernel: trace each variant afresh
            v = dict(v)
            separate_gate_up = v.pop("separate_gate_up", False)
            pipe = make_pipeline(model, tok_dir, max_batch=8, **v)
            if separate_gate_up:  # the next pipeline's fuse_projections resets it
                for layer in model.model.language_model.layers:
                    layer.mlp.use_fused = False
            pipe(GenerationParams(**base, mode="t2i", recipe="full", steps=WARM_STEPS), [1])
            _, timer, _, peak = run_case(pipe, params, [42])
            out[name] = {"s_per_step": round(timer.s_per_step(), 4), "peak_gib": round(peak, 2)}
        except Exception as e:  # noqa: BLE001 - a lever that fails is recorded, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"lever {name:40s} {out[name]}")
    return out


def _has_flash_attn() -> bool:
    return network._flash_attn_func is not None


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = report["gpu"].lower().replace("nvidia ", "").replace(" ", "-")
    (out_dir / f"{slug}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# {report['gpu']}: 2048x2048, full-size architecture, random bf16 weights",
        "",
        f"Command: `{report['command']}`  ",
        f"torch {report['torch']}, flash-attn 2 {'yes' if report['flash_attn'] else 'no'}, "
        f"torch.compile {'on, kernel tuning on' if report['compile'] else 'off'}, attention {report['attention']}, "
        f"bf16 matmul ceiling {report['ceiling_tflops']} TFLOP/s, "
        f"weights {report['weights_gib']} GiB. Fast path vs float32: {report['fast_vs_plain']['fast_bf16_vs_fp32']} "
        f"(plain bf16 vs float32: {report['fast_vs_plain']['plain_bf16_vs_fp32']}; within bf16 tolerance: {report['fast_vs_plain']['ok']})",
        "",
    ]
    if "fp8_bf16_vs_fp32" in report["fast_vs_plain"]:
        fv = report["fast_vs_plain"]
        lines += [f"FP8 (quantize=fp8, fused + compiled) vs float32: {fv['fp8_bf16_vs_fp32']} "
                  f"({fv['fp8_bf16_vs_fp32'] / fv['fast_bf16_vs_fp32']:.1f}x the fast bf16 path's; budget "
                  f"{FP8_ERROR_BUDGET}x: {'met' if fv['fp8_within_budget'] else 'missed'}). FP8 weights "
                  f"{report['fp8']['weights_gib']} GiB.", ""]  # fmt: skip
    lines += [
        "| case | s/step | MFU (bf16 ceiling) | peak GiB | steps | seeds | wall s | vs single (wall) | vs single (per step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["cases"].items():
        lines.append(
            f"| {name} | {c['s_per_step']} | {c['mfu']} | {c['peak_gib']} | {c['steps']} | {c['seeds']} | {c['wall_s']} "
            f"| {c.get('x_single', '')} | {c.get('x_single_step', '')} |"
        )
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    if report["levers"]:
        lines += ["", "Levers on t2i_full (8 steps each):", "", "| variant | s/step | peak GiB |", "|---|---|---|"]
        for name, v in report["levers"].items():
            lines.append(f"| {name} | {v.get('s_per_step', v.get('error'))} | {v.get('peak_gib', '')} |")
    text = "\n".join(lines) + "\n"
    (out_dir / f"{slug}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())

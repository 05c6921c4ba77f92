"""One full-size decoder layer over the generated tokens, at the benchmark's shapes: eager, torch.compile
with static sizes, the pipeline's compiled layer (symbolic sizes), the same with FlashAttention-3 (where
built): with and without Inductor's tuning of its generated kernels, fused or separate projections; and
torch.compile with GEMM autotuning (Triton templates vs cuBLAS, with prologue/epilogue fusion). Prints ms
per layer and the implied ms per step (x36 layers).

    python bench/layer_bench.py [--autotune] [--shapes skeleton6,t2i_full] [--variants FlashAttention-3]
                                [--exclude unfused] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timings import cuda_time  # noqa: E402
from hidream_serve.engine.checkpoint import load_config_dict  # noqa: E402
from hidream_serve.engine.network import DecoderLayer, LayerKV, fa3_supports  # noqa: E402
from hidream_serve.engine.pipeline import (  # noqa: E402
    COMPILE_TUNING,
    CompiledLayer,
    _generated_layer,
    attention_backends,
)
from hidream_serve.random_model import FULL_TEXT, FULL_VISION  # noqa: E402
from hidream_serve.tiny import config_dict  # noqa: E402

# name: (rows per caption, generated tokens, prefix length per caption)
REPEAT = 6
SHAPES = {
    "t2i_full": (1, 4097, (320, 21)),
    "dev_t2i": (1, 4097, (320,)),
    "skeleton6": (1, 7363, (758, 459)),
    "bestof4": (4, 4097, (320, 21)),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default=None, help="comma-separated substrings of the variant names to run")
    ap.add_argument("--exclude", default=None, help="comma-separated substrings of variant names to skip")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all variants this many times, interleaved")
    args = ap.parse_args()
    cfg = load_config_dict(config_dict(FULL_TEXT, FULL_VISION)).text_config
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).to(dev, torch.bfloat16).eval().requires_grad_(False)
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    layer.self_attn.fuse(), layer.mlp.fuse()
    layer.self_attn.use_fused = layer.mlp.use_fused = True
    hd, kvh = cfg.head_dim, cfg.num_key_value_heads
    sdpa = dict(kernel="sdpa")
    variants = {  # name: (layer function, settings of the layer: attention kernel, fused projections)
        "eager": (_generated_layer, sdpa),
        "compile, static sizes": (torch.compile(_generated_layer, dynamic=False), sdpa),
        "compile, symbolic prefix": (CompiledLayer(symbolic_shapes=False), sdpa),
        "compile, all sizes symbolic": (CompiledLayer(symbolic_shapes=True), sdpa),
    }
    if fa3_supports(dev, torch.bfloat16, cfg.head_dim):
        fa3 = dict(kernel="fa3")
        name = "compile, all sizes symbolic, FlashAttention-3"
        variants[name] = (CompiledLayer("fa3"), fa3)
        # Inductor tuning the launch settings of the kernels it generates (what the pipeline does)
        variants[f"{name}, tuned"] = (CompiledLayer("fa3", options=COMPILE_TUNING), fa3)
        variants[f"{name}, pointwise autotune"] = (
            CompiledLayer("fa3", options={"max_autotune_pointwise": True, **COMPILE_TUNING}), fa3)
        # separate q/k/v or gate/up matmuls: other GEMM shapes, same math
        for part, flag in (("gate/up", "mlp_fused"), ("q/k/v", "qkv_fused")):
            compiled = CompiledLayer("fa3", options=COMPILE_TUNING)
            variants[f"{name}, tuned, unfused {part}"] = (compiled, {**fa3, flag: False})
    if args.autotune:
        variants["autotune"] = (torch.compile(
            _generated_layer, dynamic=False, mode="max-autotune-no-cudagraphs",
        ), sdpa)
    if args.variants:
        keep = args.variants.split(",")
        variants = {k: v for k, v in variants.items() if any(s in k for s in keep)}
    if args.exclude:
        drop = args.exclude.split(",")
        variants = {k: v for k, v in variants.items() if not any(s in k for s in drop)}
    print("| shape | variant | ms/layer | x36 ms | compile s |")
    print("|---|---|---|---|---|")
    for name in args.shapes.split(","):
        rows, g, prefixes = SHAPES[name]
        n = rows * len(prefixes)
        x = torch.randn(n, g, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        cos = torch.randn(n, g, hd, device=dev, dtype=torch.bfloat16)
        sin = torch.randn(n, g, hd, device=dev, dtype=torch.bfloat16)
        groups = [
            LayerKV(torch.randn(1, p, kvh, hd, device=dev, dtype=torch.bfloat16),
                    torch.randn(1, p, kvh, hd, device=dev, dtype=torch.bfloat16))
            for p in prefixes
        ]  # fmt: skip
        for _ in range(args.rounds):  # interleaved rounds: the GPU's clock drifts under its power cap
            for vname, (fn, settings) in variants.items():
                layer.self_attn.kernel = settings["kernel"]
                layer.self_attn.use_fused = settings.get("qkv_fused", True)
                layer.mlp.use_fused = settings.get("mlp_fused", True)
                torch._dynamo.reset()  # each variant compiles afresh (they share one function)
                with attention_backends(dev, "cudnn"), torch.no_grad():
                    t0 = time.perf_counter()
                    fn(layer, x, cos, sin, groups)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    # several layers per timing, as in a step: the host runs ahead of the GPU
                    t = cuda_time(lambda: [fn(layer, x, cos, sin, groups) for _ in range(REPEAT)], reps=5) / REPEAT
                print(f"| {name} | {vname} | {t * 1e3:.3f} | {t * 36e3:.1f} | {first:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

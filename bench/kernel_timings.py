"""Kernel-level timings behind the step time: the decoder's GEMMs and the generated-token attention at the
benchmark's shapes (2048x2048 -> 4097 generated tokens; skeleton6 -> 7363), for each attention variant.

    python bench/kernel_timings.py [--out bench/results/kernels-<gpu>.md]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # FlashAttention-3 (Hopper), when built: see scripts/build-fa3.sh
    from flash_attn_interface import flash_attn_func as fa3_func
except ImportError:
    fa3_func = None

D, F_INTER, H, KVH, HD = 4096, 12288, 32, 8, 128


def cuda_time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return statistics.median(times)


def gemm_rows(rows_list: list[int]) -> list[tuple]:
    out = []
    shapes = {"qkv": (D, (H + 2 * KVH) * HD), "o": (H * HD, D), "gate_up": (D, 2 * F_INTER), "down": (F_INTER, D)}
    for m in rows_list:
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            t = cuda_time(lambda: F.linear(x, w))
            out.append((f"gemm {name}", f"M={m} K={k} N={n}", t * 1e3, 2 * m * k * n / t / 1e12))
            w_t = w.t().contiguous()  # (K, N): the NN layout, a different cuBLAS kernel family
            t = cuda_time(lambda: x @ w_t)
            out.append((f"gemm {name} NN", f"M={m} K={k} N={n}", t * 1e3, 2 * m * k * n / t / 1e12))
    return out


def attention_rows(cases: list[tuple[int, int]]) -> list[tuple]:
    out = []
    for t_q, s_kv in cases:
        flops = 4 * t_q * s_kv * HD * H
        q_bthd = torch.randn(1, t_q, H, HD, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KVH, s_kv, HD, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KVH, s_kv, HD, device="cuda", dtype=torch.bfloat16)
        q_view = q_bthd.transpose(1, 2)  # (1, H, T, HD) strided, as the layer produces it
        q_cont = q_view.contiguous()
        k_rep, v_rep = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        variants = {
            "cudnn expanded, q view": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(q_view, k_rep, v_rep)),
            "cudnn expanded, q contiguous": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(q_cont, k_rep, v_rep)),
            "cudnn expand inside": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(
                q_view, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))),
            "cudnn enable_gqa": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(q_view, k, v, enable_gqa=True)),
            "flash enable_gqa": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(q_view, k, v, enable_gqa=True)),
            "flash expanded": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(q_view, k_rep, v_rep)),
            "efficient expanded": (SDPBackend.EFFICIENT_ATTENTION, lambda: F.scaled_dot_product_attention(q_view, k_rep, v_rep)),
        }  # fmt: skip
        if fa3_func is not None:  # native GQA in the (B, T, H, HD) layout the projections produce
            k_bshd, v_bshd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            variants["fa3"] = (None, lambda: fa3_func(q_bthd, k_bshd, v_bshd))
            # the engine's layout: (B, H, T, hd) tensors passed as transposed views
            variants["fa3, head-major views"] = (None, lambda: fa3_func(q_cont.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
            variants["fa3, pack_gqa"] = (None, lambda: fa3_func(q_bthd, k_bshd, v_bshd, pack_gqa=True))
            variants["fa3, no pack_gqa"] = (None, lambda: fa3_func(q_bthd, k_bshd, v_bshd, pack_gqa=False))
        for name, (backend, fn) in variants.items():
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    t = cuda_time(fn)
                out.append((f"attn {name}", f"T={t_q} S={s_kv}", t * 1e3, flops / t / 1e12))
            except Exception as e:  # a backend that refuses the shape or the GQA layout
                out.append((f"attn {name}", f"T={t_q} S={s_kv}", float("nan"), f"n/a: {type(e).__name__}: {str(e)[:60]}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--blas", default="default", choices=["default", "cublas", "cublaslt"])
    ap.add_argument("--gemm-only", action="store_true")
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--attention-cases", default="4097x4417,4097x4118,7363x8121",
                    help="query x key lengths, comma-separated")
    ap.add_argument("--gemm-rows", default="4097,8194,14726,32776", help="GEMM M values, comma-separated")
    args = ap.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    rows = [] if args.attention_only else gemm_rows([int(m) for m in args.gemm_rows.split(",")])
    if not args.gemm_only:
        cases = [tuple(int(n) for n in c.split("x")) for c in args.attention_cases.split(",")]
        rows += attention_rows(cases)
    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Kernel timings on {gpu} (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"BLAS {torch.backends.cuda.preferred_blas_library()})",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        "| kernel | shape | ms | TFLOP/s |",
        "|---|---|---|---|",
    ]
    for name, shape, ms, tf in rows:
        tf_s = f"{tf:.0f}" if isinstance(tf, float) else tf
        lines.append(f"| {name} | {shape} | {ms:.3f} | {tf_s} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

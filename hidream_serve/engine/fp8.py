"""FP8 (e4m3) linear layers for the decoder: per-output-channel weight scales, dynamic per-row activation scales.

Only the decoder's projections (q/k/v, o, gate/up, down) are quantized; the vision tower, pixel heads, norms,
rope and the CFG combination keep their dtype. On GPUs with FP8 tensor cores (compute capability >= 8.9) the
matmul is `torch._scaled_mm` with row-wise scales (bf16 output, fp32 scales (M,1) and (1,N)). Elsewhere the
module can only run emulated (dequantize then matmul), which exists for CPU tests of the math and the
checkpoint round trip, never for serving: `check_fp8_device` refuses such devices.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EngineError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_FLOOR = 1e-12  # all-zero rows get a tiny scale instead of a division by zero
DECODER_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                       ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip


FUSED_GROUPS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def check_fp8_device(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise EngineError(f"quantize=fp8 needs FP8 tensor cores (Hopper/Ada/Blackwell GPU); device {device} has none")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise EngineError(f"quantize=fp8 needs FP8 tensor cores (compute capability >= 8.9); device {device} "
                          f"({name}, sm_{major}{minor}) has none")  # fmt: skip


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> e4m3 values and fp32 scales (..., 1) with x ~= values * scales (amax of each row maps to 448)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=SCALE_FLOOR)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class FP8Linear(nn.Module):
    """y = x W^T + b with W stored as e4m3 (N, K) and a per-output-channel fp32 scale (N, 1)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_dtype = out_dtype
        self.emulate = False  # set by quantize_decoder(emulate=True): CPU tests only
        self.fast_accum = True  # Hopper's FP8 fast accumulation (see quantize_decoder)

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype | None = None) -> FP8Linear:
        dtype = out_dtype or linear.weight.dtype
        if linear.weight.is_meta:  # an FP8 checkpoint fills these
            n, k = linear.weight.shape
            w = torch.empty(n, k, dtype=FP8_DTYPE, device="meta")
            s = torch.empty(n, 1, dtype=torch.float32, device="meta")
        else:
            w, s = quantize_rowwise(linear.weight.detach())
        return cls(w, s, None if linear.bias is None else linear.bias.detach(), dtype)

    @classmethod
    def concat(cls, parts: list[FP8Linear]) -> FP8Linear:
        """Fused projection: per-row weight scales concatenate exactly."""
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        fused = cls(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]), bias,
                    parts[0].out_dtype)  # fmt: skip
        fused.emulate, fused.fast_accum = parts[0].emulate, parts[0].fast_accum
        start = 0
        for p in parts:  # the parts become views of the fused tensors: no extra memory
            n = p.weight.shape[0]
            p.weight = nn.Parameter(fused.weight[start : start + n], requires_grad=False)
            p.weight_scale = nn.Parameter(fused.weight_scale[start : start + n], requires_grad=False)
            start += n
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.emulate or not x.is_cuda:
            w = dequantize(self.weight, self.weight_scale, torch.float32)
            xq, xs = quantize_rowwise(x2)
            y = F.linear(dequantize(xq, xs, torch.float32), w, None if self.bias is None else self.bias.float())
            return y.to(self.out_dtype).reshape(*lead, -1)
        xq, xs = quantize_rowwise(x2)  # torch.compile fuses this into the preceding norm / activation kernel
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(), bias=self.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)  # fmt: skip
        return y.to(self.out_dtype).reshape(*lead, -1)


def quantize_decoder(
    model: nn.Module,
    emulate: bool = False,
    skip_layers: Collection[int] = (),
    skip_projections: Collection[str] = (),
    fast_accum: bool = True,
) -> None:
    """Replace the decoder's projections by FP8Linear in place (from bf16 weights, or meta ones before an
    FP8 checkpoint is loaded). `emulate` allows non-FP8 devices (tests only). `skip_layers` (decoder layer
    indices) and `skip_projections` (names such as "down_proj") stay in bf16. `fast_accum`: Hopper's FP8
    fast accumulation, 5.5% faster per t2i step on an H200 at no measurable cost in accuracy
    (bench/results/fp8-levers-h200.json)."""
    unknown = set(skip_projections) - {name for _, name in DECODER_PROJECTIONS}
    if unknown:
        raise ValueError(f"skip_projections: unknown projection(s) {sorted(unknown)}")
    for group in FUSED_GROUPS:  # a fused matmul is all FP8 or all bf16
        if 0 < len(group & set(skip_projections)) < len(group):
            raise ValueError(f"skip_projections: {sorted(group)} are fused together; skip all or none of them")
    for index, layer in enumerate(model.model.language_model.layers):
        # a fused bf16 model: drop the fused tensors (the separate linears are views of them); the next
        # fuse_projections() fuses the FP8 modules instead
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_weight = attn.qkv_bias = mlp.gate_up = None
        attn.use_fused = mlp.use_fused = False
        if index in skip_layers:
            continue
        for parent_name, name in DECODER_PROJECTIONS:
            if name in skip_projections:
                continue
            parent = getattr(layer, parent_name)
            lin = getattr(parent, name)
            if isinstance(lin, FP8Linear):
                continue
            q = FP8Linear.from_linear(lin, out_dtype=model.dtype if not lin.weight.is_meta else None)
            q.emulate, q.fast_accum = emulate, fast_accum
            setattr(parent, name, q)
    model.quantize = "fp8"


QUANTIZE_FILE = "hidream_quantize.json"  # marks an FP8 checkpoint written by `hidream-serve quantize`


def save_fp8_checkpoint(model: nn.Module, source_dir, out_dir) -> None:
    """Write the quantized model's weights (e4m3 projections + fp32 scales, the rest as loaded) and copy the
    config, tokenizer and preprocessor files, so that `out_dir` loads directly."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in source_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors") and f.name != QUANTIZE_FILE:
            shutil.copy2(f, out_dir / f.name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    meta = {"quantize": "fp8", "format": "float8_e4m3fn", "weight_scale": "per output channel, fp32 (N, 1)",
            "activation_scale": "dynamic per row", "projections": [".".join(p) for p in DECODER_PROJECTIONS]}
    (out_dir / QUANTIZE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

"""The HiDream-O1-Image network: Qwen3-VL (vision tower + text decoder) plus pixel heads.

Sequence seen by the decoder for one sample:

    [ prefix: text tokens and VLM image tokens ][ tms ][ target patches ][ ref patches ]
      causal among themselves                    attend to everything

The prefix never depends on the noisy image, so its keys and values are computed once per
caption (`encode_prefix`) and reused at every denoising step and for every seed (`denoise`).
Parameter names follow the official checkpoint (`model.language_model.*`, `model.visual.*`,
`model.x_embedder.*`, `model.t_embedder1.*`, `model.final_layer2.*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU extra; PyTorch SDPA otherwise
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None
try:  # FlashAttention-3, Hopper only (scripts/build-fa3.sh)
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:  # pragma: no cover - depends on the machine
    _fa3_func = None
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLTextRMSNorm,
    Qwen3VLTextRotaryEmbedding,
    Qwen3VLVisionModel,
)

from ..vocabulary import PATCH_SIZE
from .fp8 import FP8Linear

PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE
TIMESTEP_FREQ_DIM = 256


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, hd); cos/sin: (B, T, hd)
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def fa3_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashAttention-3 is importable and built for this GPU, dtype and head size (a reduced build
    such as scripts/build-fa3.sh's holds bf16 kernels for head sizes up to 128 only)."""
    if _fa3_func is None or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        from flash_attn_config import CONFIG

        flags = CONFIG["build_flags"]
    except (ImportError, KeyError):
        flags = {}
    # a head size runs on the smallest built kernel at least as wide (FA3 rounds it up)
    built = [d for d in (64, 96, 128, 192, 256) if not flags.get(f"FLASHATTENTION_DISABLE_HDIM{d}")]
    if head_dim % 8 or not any(d >= head_dim for d in built):
        return False
    if dtype == torch.float16:
        return not flags.get("FLASHATTENTION_DISABLE_FP16")
    return dtype == torch.bfloat16


# ----------------------------------------------------------------------------- pixel heads


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t*1000 (cos half first), then a two-layer MLP."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (N,) in [0, 1]
        half = TIMESTEP_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = (t * 1000)[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 256)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, D)


class BottleneckPatchEmbed(nn.Module):
    """32x32x3 pixel patch -> hidden/4 -> hidden."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj1 = nn.Linear(PATCH_DIM, hidden // 4, bias=False)
        self.proj2 = nn.Linear(hidden // 4, hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (B, L, 3072) -> (B, L, D)
        return self.proj2(self.proj1(patches))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, PATCH_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, 3072)
        return self.linear(h)


# ----------------------------------------------------------------------------- text decoder


@dataclass
class LayerKV:
    k: torch.Tensor  # (1, P, KVH, hd), rope applied
    v: torch.Tensor  # (1, P, KVH, hd)


@dataclass
class PrefixCache:
    """Keys and values of one caption's prefix, per decoder layer."""

    layers: list[LayerKV]
    length: int


def _fuse_linears(linears: list[nn.Linear], attr: str = "weight") -> torch.Tensor:
    """Concatenate the linears' weights (or biases) and re-point each linear at its slice: no extra memory."""
    fused = torch.cat([getattr(lin, attr).detach() for lin in linears])
    start = 0
    for lin in linears:
        n = getattr(lin, attr).shape[0]
        setattr(lin, attr, nn.Parameter(fused[start : start + n], requires_grad=False))
        start += n
    return fused


class TextMLP(nn.Module):
    """SwiGLU MLP; `fuse()` merges gate and up projections into one matmul (inference only)."""

    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.gate_up: torch.Tensor | None = None
        self.gate_up_fp8: FP8Linear | None = None  # fused projection of a quantize=fp8 model
        self.use_fused = False

    def fuse(self) -> None:
        if self.gate_up is not None or self.gate_up_fp8 is not None:
            return
        if isinstance(self.gate_proj, FP8Linear):
            self.gate_up_fp8 = FP8Linear.concat([self.gate_proj, self.up_proj])
        else:
            self.gate_up = _fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused:
            fused = self.gate_up_fp8(x) if self.gate_up_fp8 is not None else F.linear(x, self.gate_up)
            gate, up = fused.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class TextAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.q_norm = Qwen3VLTextRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = Qwen3VLTextRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.qkv_fp8: FP8Linear | None = None  # fused projection of a quantize=fp8 model
        self.use_fused = False
        self.kernel = "sdpa"  # or "fa3": set through HiDreamO1.use_attention_kernel

    def fuse(self) -> None:
        """One matmul for q, k and v (inference only; the separate linears become views of it)."""
        if self.qkv_weight is not None or self.qkv_fp8 is not None:
            return
        if isinstance(self.q_proj, FP8Linear):
            self.qkv_fp8 = FP8Linear.concat([self.q_proj, self.k_proj, self.v_proj])
            return
        self.qkv_weight = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if self.q_proj.bias is not None:
            self.qkv_bias = _fuse_linears([self.q_proj, self.k_proj, self.v_proj], attr="bias")

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Token-major q (B, T, H, hd), k and v (B, T, KVH, hd): the layout flash kernels read."""
        B, T, _ = x.shape
        hd = self.head_dim
        if self.use_fused:
            fused = self.qkv_fp8(x) if self.qkv_fp8 is not None else F.linear(x, self.qkv_weight, self.qkv_bias)
            q, k, v = fused.split(
                [self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_heads, hd))
        k = self.k_norm(k.view(B, T, self.n_kv, hd))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(B, T, self.n_kv, hd)

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        # q: (B, T, H, hd); k, v: (B, S, KVH, hd)
        B, T, _, _ = q.shape
        if self.kernel == "fa3":  # native GQA
            return self.o_proj(_fa3_func(q, k, v, causal=causal).reshape(B, T, -1))
        if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return self.o_proj(_flash_attn_func(q, k, v, causal=causal).reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # head-major views for SDPA
        if q.is_cuda and self.n_kv != self.n_heads:
            # expanded heads keep PyTorch on a fast kernel whatever the GQA support of the build
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = Qwen3VLTextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = Qwen3VLTextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = TextMLP(cfg)

    def forward_prefix(self, x, cos, sin) -> tuple[torch.Tensor, LayerKV]:
        """Causal pass over the prefix; returns its output and its keys/values."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        x = x + self.self_attn.attend(q, k, v, causal=True)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, LayerKV(k, v)

    def forward_generated(
        self, x, cos, sin, prefixes: list[LayerKV], out_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full attention of generated tokens over their group's prefix and themselves.

        x: (N, G, D), caption-major: the rows split into len(prefixes) equal groups, group k attending to
        prefixes[k] (one caption); each group is one attention call.
        `out_index` (G',): compute outputs only for these token positions (all tokens still serve as keys
        and values); for the last layer, whose outputs are read only at the target tokens. An index
        tensor rather than a slice, so its length can stay symbolic in a compiled graph.
        """
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        if out_index is not None:
            x, q = x.index_select(1, out_index), q.index_select(1, out_index)  # (N, G', D), (N, G', H, hd)
        outs = []
        n = x.shape[0] // len(prefixes)  # rows per group (sizes stay symbolic when compiled)
        for g, kv in enumerate(prefixes):
            rows = slice(g * n, (g + 1) * n)
            k_all = torch.cat([kv.k.expand(n, -1, -1, -1), k[rows]], dim=1)  # (n, P+G, KVH, hd)
            v_all = torch.cat([kv.v.expand(n, -1, -1, -1), v[rows]], dim=1)
            outs.append(self.self_attn.attend(q[rows], k_all, v_all, causal=False))
        x = x + torch.cat(outs, dim=0)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = Qwen3VLTextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = Qwen3VLTextRotaryEmbedding(cfg)

    def rope(self, x: torch.Tensor, positions: torch.Tensor):
        # positions: (3, B, T) -> cos/sin (B, T, hd) in x's dtype, computed in float32
        return self.rotary_emb(x, positions)


# ----------------------------------------------------------------------------- whole model


class HiDreamO1Model(nn.Module):
    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        text_cfg = config.text_config
        self.visual = Qwen3VLVisionModel._from_config(config.vision_config)
        self.language_model = TextModel(text_cfg)
        self.t_embedder1 = TimestepEmbedder(text_cfg.hidden_size)
        self.x_embedder = BottleneckPatchEmbed(text_cfg.hidden_size)
        self.final_layer2 = FinalLayer(text_cfg.hidden_size)


class HiDreamO1(nn.Module):
    """Top-level module; its state-dict keys match the checkpoint (`model.*`)."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.model = HiDreamO1Model(config)

    @property
    def device(self) -> torch.device:
        return self.model.x_embedder.proj1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.x_embedder.proj1.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Vision tower: merged image embeddings (N_tok, D) and the DeepStack features."""
        visual = self.model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
        if isinstance(out, tuple):  # older transformers 5.x return (merged, deepstack)
            return out[0], out[1]
        return out.pooler_output, out.deepstack_features

    @torch.no_grad()
    def encode_prefix(
        self,
        input_ids: torch.Tensor,  # (P,)
        positions: torch.Tensor,  # (3, P)
        image_embeds: torch.Tensor | None = None,  # (N_img, D) for the image-pad tokens, in order
        deepstack: list[torch.Tensor] | None = None,
    ) -> PrefixCache:
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids[None])  # (1, P, D)
        image_mask = input_ids == self.config.image_token_id
        if image_embeds is not None:
            x[0, image_mask] = image_embeds.to(x.dtype)
        cos, sin = lm.rope(x, positions[:, None])
        kvs = []
        for i, layer in enumerate(lm.layers):
            x, kv = layer.forward_prefix(x, cos, sin)
            kvs.append(kv)
            if deepstack is not None and i < len(deepstack):
                x[0, image_mask] = x[0, image_mask] + deepstack[i].to(x.dtype)
        return PrefixCache(kvs, int(input_ids.shape[0]))

    def fuse_projections(self, enabled: bool = True) -> None:
        """Fused q/k/v and gate/up matmuls for inference (same math, fewer and larger kernels)."""
        for layer in self.model.language_model.layers:
            for mod in (layer.self_attn, layer.mlp):
                if enabled:
                    mod.fuse()
                mod.use_fused = enabled

    def use_attention_kernel(self, kernel: str) -> None:
        """"sdpa" (PyTorch, backend chosen by the caller's sdpa_kernel context) or "fa3" (see fa3_supports)."""
        if kernel not in ("sdpa", "fa3"):
            raise ValueError(f"attention kernel must be 'sdpa' or 'fa3', got {kernel!r}")
        for layer in self.model.language_model.layers:
            layer.self_attn.kernel = kernel

    def gen_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (N, G, hd) for the generated tokens; constant over a run, so computed once."""
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        return self.model.language_model.rope(probe, positions.to(self.device))

    def denoise(
        self,
        t_emb_input: torch.Tensor,  # (N,) flow time t in [0, 1]
        patches: torch.Tensor,  # (N, L_tgt + L_ref, 3072) noisy target patches then clean ref patches
        rope: tuple[torch.Tensor, torch.Tensor],  # from gen_rope: positions of [tms, target, refs]
        prefixes: list[PrefixCache],  # one per caption; the rows split into equal caption-major groups
        target_len: int,
        layer_fn=None,  # optional compiled replacement of DecoderLayer.forward_generated
    ) -> torch.Tensor:
        """One network evaluation; returns the clean-image prediction for the target, (N, L_tgt, 3072)."""
        m = self.model
        lm = m.language_model
        t_tok = m.t_embedder1(t_emb_input)[:, None]  # (N, 1, D)
        x = torch.cat([t_tok.to(self.dtype), m.x_embedder(patches.to(self.dtype))], dim=1)  # (N, G, D)
        cos, sin = rope
        last = len(lm.layers) - 1
        target_index = torch.arange(1, 1 + target_len, device=x.device)  # only the target is read out
        for i, layer in enumerate(lm.layers):
            kvs = [cache.layers[i] for cache in prefixes]
            out_index = target_index if i == last else None
            if layer_fn is None:
                x = layer.forward_generated(x, cos, sin, kvs, out_index)
            else:
                x = layer_fn(layer, x, cos, sin, kvs, out_index)
        return m.final_layer2(lm.norm(x))  # (N, L_tgt, 3072)

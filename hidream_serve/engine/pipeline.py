"""The denoising pipeline: settings -> conditioning -> prefix caches -> noise -> timesteps -> denoise -> decode.

One call denoises several candidates (seeds) of one request in a batch. Each candidate's image
depends only on its own seed and the settings: its initial noise comes from a CPU generator seeded
with seed + 1 (as the official pipeline draws it) and its per-step noise from a second CPU generator
seeded the same way (the official pipeline seeds the global RNG with seed + 1 right before the loop).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import LoadedCheckpoint, load_checkpoint
from .conditioning import Conditioning, ConditioningBuilder
from .images import patches_to_uint8
from .network import PrefixCache, fa3_supports
from .noise import PrefetchedNoise, initial_noise
from .params import (
    GenerationParams,
    SamplerSettings,
    check_mode_inputs,
    check_reference_image,
    check_seeds,
    resolve_sampler,
)  # fmt: skip
from .schedulers import make_scheduler

MIN_SIGMA = 0.001


@dataclass
class StepState:
    """What a per-step hook sees: the clean-image prediction of every still-active candidate."""

    step: int  # 0-based index of the step just taken
    num_steps: int
    seeds: list[int]  # active candidates, in batch order
    x0: torch.Tensor  # (B, L, 3072) conditional prediction in [-1, 1]
    width: int
    height: int

    def preview(self, i: int) -> Image.Image:
        x01 = (self.x0[i].float() + 1) / 2
        return Image.fromarray(patches_to_uint8(x01, self.height, self.width))


# A hook may return the batch positions of the candidates to keep; None keeps all.
StepHook = Callable[[StepState], "Sequence[int] | None"]


@dataclass
class Candidate:
    seed: int
    image: Image.Image | None  # None if pruned
    pruned_at_step: int | None = None
    preview: Image.Image | None = None  # last prediction of a pruned candidate
    steps_computed: int = 0


@dataclass
class GenerationResult:
    candidates: list[Candidate]
    settings: dict
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


@dataclass
class PreparedRequest:
    cond: Conditioning
    sampler: SamplerSettings
    prefixes: list[PrefixCache]  # conditional, then unconditional when CFG is on
    warnings: list[str]

    def settings(self) -> dict:
        s = self.sampler
        c = self.cond
        return {
            "width": c.width, "height": c.height, "recipe": s.recipe, "steps": s.steps, "guidance": s.guidance,
            "shift": s.shift, "scheduler": s.scheduler, "timesteps": list(s.timesteps) if s.timesteps else None,
            "noise_scale_start": s.noise_scale_start, "noise_scale_end": s.noise_scale_end,
            "noise_clip_std": s.noise_clip_std, "ref_sizes": [list(r) for r in c.ref_sizes],
            "vlm_ref_sizes": [list(r) for r in c.vlm_sizes], "target_tokens": c.target_len, "ref_tokens": c.ref_len,
            "prefix_tokens": [p.length for p in self.prefixes],
        }  # fmt: skip


def noise_scale_schedule(start: float, end: float, n: int) -> list[float]:
    """Per-step noise scale of the flash sampler: linear from start to end over the n steps."""
    if n == 1:
        return [start]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


_CUDNN_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
ATTENTION_ORDERS = {  # SDPA backend order per preference; with "fa3", SDPA runs only where FA3 does not
    "cudnn": _CUDNN_FIRST,
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "fa3": _CUDNN_FIRST,
}


def resolve_attention(attention: str, model) -> str:
    """"auto": FlashAttention-3 where it is built for this GPU, dtype and head size, else cuDNN-first SDPA."""
    choices = ["auto", *ATTENTION_ORDERS]
    if attention not in choices:
        raise ValueError(f"attention must be one of {choices}, got {attention!r}")
    fa3 = fa3_supports(model.device, model.dtype, model.config.text_config.head_dim)
    if attention == "auto":
        return "fa3" if fa3 else "cudnn"
    if attention == "fa3" and not fa3:
        raise ValueError("attention 'fa3' needs FlashAttention-3 built for this GPU (Hopper), dtype and head size "
                         "(scripts/build-fa3.sh)")
    return attention


@contextlib.contextmanager
def attention_backends(device: torch.device, prefer: str = "cudnn"):
    """On CUDA prefer cuDNN attention (Hopper kernels), then flash; elsewhere PyTorch's default choice.

    Must also be active while torch.compile traces, since the traced graph fixes the kernel.
    """
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, name) for name in ATTENTION_ORDERS[prefer]]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order
        ctx = sdpa_kernel(order)
    with ctx:
        yield


def _generated_layer(layer, x, cos, sin, prefixes, out_index=None, attention="cudnn"):
    # Reading `attention` makes its value part of a compiled graph's guards: a graph fixes the SDPA kernel
    # chosen while it was traced, so pipelines preferring other kernels must not share it.
    if attention not in ATTENTION_ORDERS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_ORDERS)}, got {attention!r}")
    return layer.forward_generated(x, cos, sin, prefixes, out_index)


# Inductor options of `compile_tuning`: coordinate descent over the launch settings (block sizes, warps) of
# the kernels Inductor generates, timed on the GPU while compiling
COMPILE_TUNING = {"coordinate_descent_tuning": True}


class CompiledLayer:
    """`DecoderLayer.forward_generated` through torch.compile. The prefix length (it changes with every
    prompt) is always a symbolic size; with `symbolic_shapes`, so are the candidates, the generated tokens
    and the target length, and a service compiles a handful of graphs once (with and without CFG, last layer
    or not, one candidate or more) instead of one per image size and batch."""

    def __init__(self, attention: str = "cudnn", symbolic_shapes: bool = True, options: dict | None = None):
        self.attention = attention
        self.symbolic_shapes = symbolic_shapes
        # static shapes compile one graph per (batch, tokens): a service sees many over its life
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.options = options  # Inductor config
        self.fn = torch.compile(_generated_layer, dynamic=False, options=options)

    def __call__(self, layer, x, cos, sin, prefixes, out_index=None):
        mark = torch._dynamo.maybe_mark_dynamic
        for kv in prefixes:
            mark(kv.k, 1)
            mark(kv.v, 1)
        if self.symbolic_shapes:
            for t in (x, cos, sin):
                mark(t, 0)
                mark(t, 1)
            if out_index is not None:
                mark(out_index, 0)
        return self.fn(layer, x, cos, sin, prefixes, out_index, self.attention)


class HiDreamPipeline:
    """Engine entry point. `max_batch` candidates denoise together (CFG doubles the rows); `fuse` merges
    q/k/v and gate/up matmuls; `compile` runs the decoder layer through torch.compile (GPU), and
    `compile_tuning` has Inductor tune the launch settings of the kernels it generates (norms, rope, SiLU gate)
    while compiling: slower compiles, faster steps (bench/results)."""

    def __init__(
        self, checkpoint: LoadedCheckpoint, max_batch: int = 4, fuse: bool = True, compile: bool = False,
        attention: str = "auto", compile_tuning: bool = True,
    ):  # fmt: skip
        self.model = checkpoint.model
        self.attention = resolve_attention(attention, self.model)
        self.conditioning = ConditioningBuilder(checkpoint.tokenizer, self.model.config, checkpoint.vision_cfg)
        self.max_batch = max_batch
        self.model.fuse_projections(fuse)
        self.layer_fn = None
        if compile:
            self.layer_fn = CompiledLayer(self.attention, options=COMPILE_TUNING if compile_tuning else None)

    @contextlib.contextmanager
    def _attention(self):
        # set on every call: pipelines may share one model with different preferences (as the benchmark does)
        self.model.use_attention_kernel("fa3" if self.attention == "fa3" else "sdpa")
        with attention_backends(self.device, self.attention):
            yield

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None, **options
    ):
        return cls(load_checkpoint(path, device, dtype, quantize=quantize), **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def warm_up(self, width: int, height: int) -> float:
        """Run each compiled graph once (with and without CFG, one and two candidates) at this size, so
        that the first requests do not wait for compilation; returns the seconds it took. Other sizes,
        prompts and ref layouts reuse these graphs (their sizes are symbolic)."""
        t0 = time.perf_counter()
        for recipe, steps in (("full", 4), ("dev", 2)):  # full: 4 reaches every UniPC path
            for seeds in ([0], [0, 1]):
                params = GenerationParams(mode="t2i", prompt="warm-up", width=width, height=height, exact_size=True,
                                          recipe=recipe, steps=steps)  # fmt: skip
                self(params, seeds)
        return time.perf_counter() - t0

    # 1. check inputs ----------------------------------------------------------------------------
    def check_inputs(self, params: GenerationParams) -> tuple[SamplerSettings, list[str]]:
        check_mode_inputs(params)
        for i, img in enumerate(params.refs):
            check_reference_image(img, f"refs[{i}]")
        return resolve_sampler(params)

    # 2-3. conditioning and prefix caches ------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, params: GenerationParams) -> PreparedRequest:
        sampler, warnings = self.check_inputs(params)
        cond = self.conditioning.build(params, with_uncond=sampler.uses_cfg)
        image_embeds = deepstack = None
        if cond.vision is not None:
            image_embeds, deepstack = self.model.encode_images(
                cond.vision.pixel_values.to(self.device), cond.vision.grid_thw.to(self.device)
            )
        with self._attention():
            prefixes = [
                self.model.encode_prefix(
                    c.prefix_ids.to(self.device), c.prefix_positions.to(self.device), image_embeds, deepstack
                )
                for c in cond.captions
            ]
        return PreparedRequest(cond, sampler, prefixes, warnings + cond.warnings)

    # 4-7. noise, timesteps, denoising loop, decode ------------------------------------------------
    @torch.no_grad()
    def __call__(self, params: GenerationParams, seeds: Sequence[int], on_step: StepHook | None = None):
        t0 = time.perf_counter()
        seeds = check_seeds(seeds)
        prep = self.prepare(params)
        t1 = time.perf_counter()
        candidates: list[Candidate] = []
        for start in range(0, len(seeds), self.max_batch):
            candidates += self.denoise(prep, seeds[start : start + self.max_batch], on_step)
        t2 = time.perf_counter()
        timings = {"prepare_s": t1 - t0, "denoise_s": t2 - t1}
        return GenerationResult(candidates, prep.settings(), prep.warnings, timings)

    def denoise(self, prep: PreparedRequest, seeds: list[int], on_step: StepHook | None = None) -> list[Candidate]:
        cond, s = prep.cond, prep.sampler
        dev, dtype = self.device, self.dtype
        z = initial_noise(seeds, cond.height, cond.width, s.noise_scale_start).to(dev, dtype)
        sched = make_scheduler(s.scheduler, s.shift)
        sched.set_timesteps(s.steps, list(s.timesteps) if s.timesteps else None)
        timesteps = sched.timesteps
        n = len(timesteps)
        step_gens = [torch.Generator("cpu").manual_seed(sd + 1) for sd in seeds]
        if s.scheduler == "flash":  # draws noise at each of its first num_steps steps
            draws = min(n, sched.num_steps)
            step_gens = [PrefetchedNoise(g, tuple(z.shape[1:]), s.noise_clip_std, z.device, draws) for g in step_gens]
        noise_scales = noise_scale_schedule(s.noise_scale_start, s.noise_scale_end, n)

        active = list(range(len(seeds)))
        results = {sd: Candidate(sd, None) for sd in seeds}
        ref = None if cond.ref_patches is None else cond.ref_patches.to(dev, dtype)
        # generated-token rope per caption, (1, G, hd); expanded to the batch in _predict
        ropes = [self.model.gen_rope(c.gen_positions[:, None]) for c in cond.captions]
        t_fracs = timesteps.float() / 1000.0
        # the network's time input for every step, copied once: no host-device sync inside the loop
        t_ins = (1.0 - t_fracs).to(dev)
        for i in range(n):
            sigma = t_fracs[i].clamp_min(MIN_SIGMA)

            x0 = self._predict(prep, z, ref, t_ins[i].reshape(1), ropes)  # list per caption of (B, L, 3072)
            v = [(x.to(torch.float32) - z.to(torch.float32)) / sigma for x in x0]
            guided = v[0] if len(v) == 1 else v[1] + s.guidance * (v[0] - v[1])
            z = sched.step(
                (-guided).float(), z.float(), generators=[step_gens[a] for a in active],
                noise_scale=noise_scales[i], noise_clip_std=s.noise_clip_std,
            ).to(dtype)  # fmt: skip
            for a in active:
                results[seeds[a]].steps_computed += 1

            if on_step is not None:
                state = StepState(i, n, [seeds[a] for a in active], x0[0], cond.width, cond.height)
                keep = on_step(state)
                if keep is not None and i < n - 1:
                    keep = self._check_keep(keep, len(active))
                    for pos in sorted(set(range(len(active))) - set(keep)):
                        pruned = results[seeds[active[pos]]]
                        pruned.pruned_at_step, pruned.preview = i, state.preview(pos)
                    z = z.index_select(0, torch.tensor(keep, device=z.device))
                    sched.select(keep)
                    active = [active[k] for k in keep]

        pixels = patches_to_uint8(((z + 1) / 2).float(), cond.height, cond.width)  # (B, H, W, 3)
        for row, a in enumerate(active):
            results[seeds[a]].image = Image.fromarray(pixels[row])
        return [results[sd] for sd in seeds]

    @staticmethod
    def _check_keep(keep, n_active: int) -> list[int]:
        keep = sorted(set(int(k) for k in keep))
        if not keep or keep[0] < 0 or keep[-1] >= n_active:
            raise ValueError(f"step hook returned invalid positions {keep} for {n_active} candidates")
        return keep

    def _predict(self, prep: PreparedRequest, z: torch.Tensor, ref, t_in: torch.Tensor, ropes) -> list[torch.Tensor]:
        """Clean-image predictions of every caption for every candidate, in one batched network call."""
        B = z.shape[0]
        n_caps = len(prep.prefixes)
        patches = z if ref is None else torch.cat([z, ref[None].expand(B, -1, -1)], dim=1)
        patches = patches.repeat(n_caps, 1, 1)  # (n_caps*B, L+Lr, 3072), caption-major
        cos = torch.cat([c.expand(B, -1, -1) for c, _ in ropes])  # (n_caps*B, G, hd)
        sin = torch.cat([s.expand(B, -1, -1) for _, s in ropes])
        t = t_in.to(self.device).expand(n_caps * B)  # no copy when already there (the loop passes it so)
        with self._attention():
            x0 = self.model.denoise(t, patches, (cos, sin), prep.prefixes, prep.cond.target_len, self.layer_fn)
        return [x0[k * B : (k + 1) * B] for k in range(n_caps)]

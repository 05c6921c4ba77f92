"""Runtime tunables of each deployment, delivered as Ray Serve `user_config` and applied in `reconfigure`.

They can be changed on a running application (`serve deploy` with a new `user_config`) without
restarting replicas. `AppArgs` (services/app.py) carries the initial values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hidream_serve.scoring.settings import ModeWeights, RoleWeights


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterConfig(_Config):
    seeds_per_call: int = Field(2, ge=1, le=256, description="seeds per generator call (one batch on one replica)")
    prune_group_size: int = Field(4, ge=1, le=256, description="at least this many seeds per call when a request "
                                  "prunes (pruning ranks the candidates within one call)")  # fmt: skip
    generate_timeout_s: float = Field(900.0, gt=0, description="compute deadline of one seed group, counted from "
                                      "when a replica starts it (time queued does not count)")  # fmt: skip
    queue_timeout_s: float = Field(3600.0, gt=0, description="longest wait of a seed group for a replica; the "
                                   "queue itself is bounded by the Generator's max_queued_requests (503 beyond)")  # fmt: skip
    replica_retries: int = Field(2, ge=0, le=16, description="per request: seed groups rerun on another replica "
                                 "when theirs is lost (same seeds, same images); past it the request is a 503")  # fmt: skip
    score_timeout_s: float = Field(120.0, gt=0, description="deadline of the scorer call; past it, unscored")
    retry_after_s: float = Field(5.0, ge=0, description="Retry-After sent with 503 when overloaded")
    max_body_bytes: int = Field(300 * 2**20, ge=1024, description="largest request body accepted (413 above)")
    ready_cache_s: float = Field(2.0, ge=0, description="how long /readyz reuses its answer")
    ref_pixels_per_request: int = Field(50_000_000, ge=4096, description="reference pixels one request may hold "
                                        "after each ref is reduced to what the engine uses (422 naming the ref "
                                        "beyond)")  # fmt: skip
    ref_decode_pixels: int = Field(60_000_000, ge=4096, description="reference pixels decoded at full size at "
                                   "once in the router process, across requests (the rest wait)")  # fmt: skip
    ref_decode_wait_s: float = Field(30.0, gt=0, description="longest wait for that budget; past it, 503")
    release_memory_pixels: int = Field(4_000_000, ge=0, description="after a request that decoded at least this "
                                       "many reference pixels, freed memory is given back to the OS")  # fmt: skip
    sweep_max_images: int = Field(256, ge=1, le=100_000, description="largest cells x seeds of one sweep "
                                  "(POST /v1/sweeps; 422 naming `axes` above)")  # fmt: skip


class GeneratorConfig(_Config):
    max_batch: int = Field(4, ge=1, le=256, description="candidates denoised in one forward (memory bound)")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for torch (None: leave)")
    png_compress_level: int = Field(4, ge=0, le=9)


class EngineOptions(_Config):
    """Load-time options of the HiDream pipeline (a change restarts the generator replicas).
    Only the options set are passed, so unset ones keep the engine's own defaults."""

    fuse: bool | None = Field(None, description="fused q/k/v and gate/up projections")
    compile: bool | None = Field(None, description="torch.compile the decoder layer (GPU; first call per shape "
                                 "compiles)")  # fmt: skip
    compile_tuning: bool | None = Field(None, description="with compile: tune the launch settings of the "
                                        "kernels the compiler generates (~0.5% faster steps on H100, warm-up "
                                        "15-20 s longer)")  # fmt: skip
    attention: Literal["auto", "fa3", "cudnn", "flash"] | None = Field(
        None, description="attention kernel: auto (FlashAttention-3 where built for the GPU, else cuDNN SDPA), "
        "fa3, or an SDPA preference")
    quantize: Literal["fp8"] | None = Field(None, description="fp8: decoder projections in FP8 e4m3 (GPUs with "
                                            "FP8 tensor cores; docs/fp8.md)")  # fmt: skip
    gpu_memory_gib: float | None = Field(None, gt=0, le=4096, description="(cuda) the most GPU memory this "
                                         "replica's tensors may hold: to share a card, or to run within a "
                                         "smaller card's memory (an allocation past it frees cached blocks, "
                                         "then fails as out of memory)")  # fmt: skip
    warm_up_size: int | None = Field(None, ge=64, le=4096, description="at start, generate once at this edge "
                                     "size so compilation happens before the replica takes requests (with "
                                     "compile; the graphs then serve every size)")  # fmt: skip


class ScorerConfig(_Config):
    batch_size: int = Field(16, ge=1, le=1024, description="images per scorer forward")
    torch_threads: int | None = Field(None, ge=1, le=1024)
    weights: ModeWeights = Field(default_factory=ModeWeights, description="composite weights per mode and scorer "
                                 "(pickscore, clip, fidelity, sharpness, exposure); unset ones keep the built-in "
                                 "weights (docs/scoring.md)")  # fmt: skip
    role_weights: RoleWeights = Field(default_factory=RoleWeights, description="how much a reference of each role "
                                      "counts in reference fidelity")  # fmt: skip
    ref_cache_size: int = Field(32, ge=0, le=4096, description="reference embeddings kept between calls (pruning "
                                "stages of one request score against the same refs)")  # fmt: skip


def replica_name() -> str:
    """`Deployment#replica` of the current Serve replica, or `local` outside Serve."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_tag}"
    except Exception:  # noqa: BLE001 - not inside a replica
        return "local"


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


class JobsConfig(_Config):
    """The Jobs deployment's user_config: how jobs run, report and are kept."""

    max_running: int = Field(4, ge=1, le=1024, description="jobs running at once (the rest wait in order)")
    preview_at: list[float] = Field([0.25, 0.5, 0.75], max_length=16,
                                    description="fractions of the steps after which a preview event is sent")  # fmt: skip
    preview_size: int = Field(384, ge=16, le=2048, description="longest side of a preview image")
    preview_format: Literal["jpeg", "webp"] = "jpeg"
    retry_unavailable_s: float = Field(3600.0, ge=0, description="how long a job retries a seed group that meets "
                                       "back-pressure or a lost replica before giving it up")  # fmt: skip
    events_wait_s: float = Field(2.0, gt=0, le=60, description="longest wait of one event poll (SSE keep-alive)")
    progress_every_s: float = Field(2.0, gt=0, le=60, description="while a job runs, a progress event for each "
                                    "unfinished candidate at least this often: its last step again when no step "
                                    "ended since (a group waiting for a replica, a slow step, scoring)")  # fmt: skip
    retention_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="jobs that finished longer ago than this "
                                   "are deleted")  # fmt: skip
    retention_quota_bytes: int | None = Field(None, ge=0, description="result files above this are deleted, "
                                              "oldest finished job first")  # fmt: skip
    retention_interval_s: float = Field(600.0, gt=0, description="how often retention runs")
    webhook_secret: str | None = Field(None, min_length=16, description="HMAC-SHA256 key of webhook signatures "
                                       "(unset: $HIDREAM_WEBHOOK_SECRET; neither: jobs with a webhook are refused)")  # fmt: skip
    webhook_attempts: int = Field(5, ge=1, le=20, description="deliveries tried (backoff 1, 2, 4... s)")
    webhook_backoff_s: float = Field(1.0, gt=0, le=600)
    sweep_tile_size: int = Field(256, ge=32, le=1024, description="longest side of a candidate on a sweep's "
                                 "contact sheet")  # fmt: skip

    @field_validator("preview_at")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("each preview fraction must be in (0, 1]")
        return sorted(set(v))


class JobStoreOptions(_Config):
    """Where the Jobs deployment keeps its SQLite store and result files (unset: under the cache directory;
    on a cluster, a shared volume)."""

    db_path: str | None = None
    results_dir: str | None = None

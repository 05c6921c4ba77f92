"""Request and response models of the jobs API (`/v1/jobs`): a job is a generate request with its mode,
run asynchronously, with progress, events, cancel and results as files."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hidream_serve.vocabulary import Mode

from .protocol import Debug, GenerateRequest, ScoreDetail, Timings
from .sweeps_protocol import SweepResult

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
EVENT_KINDS = ("queued", "started", "progress", "preview", "candidate", "cell", "scored", *TERMINAL)


EventKind = Literal["queued", "started", "progress", "preview", "candidate", "cell", "scored", "succeeded",
                    "failed", "cancelled"]  # fmt: skip


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., max_length=2048, pattern=r"^https?://[^\s]+$", description="http(s) URL to POST to")
    events: list[EventKind] = Field(["succeeded", "failed", "cancelled"], min_length=1, max_length=10,
                                    description="which events to send; the final ones send the job's body")  # fmt: skip


class JobRequest(GenerateRequest):
    """`POST /v1/jobs`: every field of `POST /v1/generate/{mode}`, the mode, and an optional webhook."""

    mode: Mode
    webhook: Webhook | None = None


class JobUrls(BaseModel):
    self_: str = Field(..., alias="self", serialization_alias="self")
    events: str
    cancel: str
    result: str


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    created_at: float
    urls: JobUrls


class CandidateProgress(BaseModel):
    seed: int
    cell: int | None = Field(None, description="a sweep's cell (null for a generate job)")
    step: int = Field(0, description="steps done")
    pruned: bool = False
    score: float | None = None


class JobError(BaseModel):
    field: str | None = None
    message: str
    type: str = "error"


class JobCandidate(BaseModel):
    seed: int
    score: float | None = None
    scores: dict[str, ScoreDetail] | None = None
    url: str | None = Field(None, description="/v1/jobs/{id}/images/{seed}.png (a pruned one's last preview)")
    pruned: bool = False
    pruned_at_step: int | None = None
    steps_computed: int = 0
    replica: str | None = None


class JobWinner(BaseModel):
    seed: int
    score: float | None
    url: str = Field(..., description="the PNG; its text chunks carry prompt, seed, mode and settings")


class JobResult(BaseModel):
    """The generate response's body, with image URLs instead of base64."""

    id: str
    mode: Mode
    scored: bool
    winner: JobWinner
    candidates: list[JobCandidate]
    settings: dict[str, Any]
    warnings: list[str]
    steps_computed: int
    steps_full: int
    timings: Timings
    debug: Debug | None = Field(None, description="which generator replica made which seeds, each group's timings")


class JobView(BaseModel):
    id: str
    kind: Literal["generate", "sweep"] = "generate"
    mode: Mode
    status: JobStatus
    queue_position: int | None = Field(None, description="0-based among queued jobs; null unless queued")
    steps_done: int = 0
    steps_total: int = 0
    candidates: list[CandidateProgress] = Field(default_factory=list)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    settings: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    error: JobError | None = None
    result: JobResult | SweepResult | None = None
    urls: JobUrls


class JobList(BaseModel):
    data: list[JobView]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next (older) page")


def job_urls(job_id: str) -> JobUrls:
    base = f"/v1/jobs/{job_id}"
    return JobUrls(**{"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel", "result": base})


def image_url(job_id: str, seed: int) -> str:
    return f"/v1/jobs/{job_id}/images/{seed}.png"

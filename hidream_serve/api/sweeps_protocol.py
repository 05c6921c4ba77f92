"""Request and result models of `POST /v1/sweeps`: a generate request, axes of values to try, seeds per cell.

Axis values are checked by building each cell as a generate request (hidream_serve/sweeps.py), so that a bad
value is a 422 naming the axis and its index (`axes.shift[2]`), with the generate route's own message.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hidream_serve.vocabulary import HARD_MAX_N, Mode

from .protocol import GenerateRequest, ScoreDetail, Timings

MAX_AXIS_VALUES = 64
AXES = ("shift", "guidance", "steps", "recipe", "scheduler", "preset", "prompt", "seeds", "refs")

AxisValues = list[Any]


def _axis(description: str):
    return Field(None, min_length=1, max_length=MAX_AXIS_VALUES, description=description)


class SweepAxes(BaseModel):
    """Each axis is a list of values; the cells are the cartesian product, in this field order."""

    model_config = ConfigDict(extra="forbid")

    shift: AxisValues | None = _axis("values of `shift`")
    guidance: AxisValues | None = _axis("values of `guidance`")
    steps: AxisValues | None = _axis("values of `steps`")
    recipe: AxisValues | None = _axis("`full` / `dev`")
    scheduler: AxisValues | None = _axis("scheduler names")
    preset: AxisValues | None = _axis("preset names (GET /v1/presets), or null for none")
    prompt: AxisValues | None = _axis("prompts")
    seeds: AxisValues | None = _axis("a first seed (the cell runs seed, seed+1, ... n of them) or a list of seeds")
    refs: AxisValues | None = _axis("subsets of the base's refs: by index ([0, 2, 3]) or by role "
                                    "([\"face\", \"garment\"])")  # fmt: skip

    def named(self) -> dict[str, list]:
        """The axes given, in the product's order."""
        return {a: getattr(self, a) for a in AXES if getattr(self, a) is not None}


class SweepBase(GenerateRequest):
    mode: Mode


class SweepRequest(BaseModel):
    """`POST /v1/sweeps`."""

    model_config = ConfigDict(extra="forbid")

    base: SweepBase = Field(..., description="a generate request with its `mode`; every cell starts from it")
    axes: SweepAxes = Field(default_factory=SweepAxes)
    n: int | None = Field(None, ge=1, le=HARD_MAX_N, description="seeds per cell (default: the base's n or "
                          "seeds, else 1); the same seeds in every cell unless `axes.seeds` varies them")  # fmt: skip
    max_cells: int | None = Field(None, ge=1, le=100_000, description="refuse the sweep (422) if the product has "
                                  "more cells than this")  # fmt: skip


class SweepCandidate(BaseModel):
    seed: int
    score: float | None = Field(None, description="composite over the whole sweep (comparable across cells)")
    cell_score: float | None = Field(None, description="composite within its cell, as best-of-N scores it")
    scores: dict[str, ScoreDetail] | None = None
    url: str | None = None
    pruned: bool = False
    steps_computed: int = 0
    replica: str | None = None


class SweepCell(BaseModel):
    cell: int
    values: dict[str, Any] = Field(..., description="this cell's value of each axis")
    labels: dict[str, str] = Field(..., description="the values as the contact sheet writes them")
    settings: dict[str, Any] = Field(default_factory=dict, description="effective settings, as a generate call "
                                     "reports them")  # fmt: skip
    warnings: list[str] = Field(default_factory=list)
    candidates: list[SweepCandidate] = Field(default_factory=list)
    best: float | None = Field(None, description="the highest `score` among its candidates")
    best_seed: int | None = None
    mean: float | None = Field(None, description="the mean `score` of its candidates")
    rank: int | None = Field(None, description="1 = the best cell (by mean, then best)")


class SweepFiles(BaseModel):
    contact_sheet: str
    table_csv: str
    table_json: str


class SweepResult(BaseModel):
    """A finished sweep's body (`result` of GET /v1/jobs/{id})."""

    id: str
    kind: str = "sweep"
    mode: Mode
    axes: list[str]
    scored: bool
    cells: list[SweepCell]
    ranking: list[int] = Field(..., description="cell indices, best to worst")
    warnings: list[str]
    files: SweepFiles
    timings: Timings

"""Sweeps without the service: the cells of a sweep (the cartesian product of its axes over a base request),
their labels, the field an invalid value is reported on, the sweep-wide scores, the ranking and the table.

Pure functions over plain values, shared by the route (validation before a job is accepted), the Jobs
replica (which expands the stored spec again on every run, so a resumed sweep runs the same cells) and tests.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .engine.errors import InvalidInput
from .vocabulary import ROLES

# Where a sweep keeps a cell's candidate in the job store: slot = cell * SLOT_STRIDE + the seed's position.
SLOT_STRIDE = 1_000_000
SHEET, TABLE_CSV, TABLE_JSON = "contact-sheet.png", "table.csv", "table.json"
_LABEL_CHARS = 36


@dataclass
class Cell:
    index: int
    values: dict[str, Any]  # axis -> this cell's value
    labels: dict[str, str]  # axis -> the value as written on the sheet
    body: dict  # the cell's generate request (no mode), its seeds explicit
    fields: dict[str, str] = field(default_factory=dict)  # axis -> "axes.<axis>[<i>]"

    @property
    def seeds(self) -> list[int]:
        return list(self.body["seeds"])

    def slot(self, seed: int) -> int:
        return self.index * SLOT_STRIDE + self.seeds.index(seed)


def label(axis: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"  # 1.0, 2.5
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) if axis == "refs" else ",".join(str(v) for v in value)
    text = str(value)
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 3] + "..."


def seeds_per_cell(base: dict, n: int | None) -> int:
    if n is not None:
        return n
    if base.get("seeds"):
        return len(base["seeds"])
    return int(base.get("n") or 1)


def _base_seeds(base: dict, n: int) -> list[int]:
    if base.get("seeds"):
        if len(base["seeds"]) != n:
            raise InvalidInput("n", f"n={n} but the base gives {len(base['seeds'])} seeds")
        return list(base["seeds"])
    first = base.get("seed")
    if first is None:
        raise InvalidInput("base.seed", "the sweep's first seed was not resolved")
    return [first + i for i in range(n)]


def _refs_subset(base_refs: list[dict], value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(where, "must be a non-empty list of ref indices ([0, 2]) or roles ([\"face\"])")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        bad = [v for v in value if not 0 <= v < len(base_refs)]
        if bad:
            raise InvalidInput(where, f"ref index {bad[0]} is out of range: the base has {len(base_refs)} refs")
        if len(set(value)) != len(value):
            raise InvalidInput(where, "a ref index appears twice")
        return [base_refs[v] for v in value]
    if all(isinstance(v, str) for v in value):
        bad = [v for v in value if v not in ROLES]
        if bad:
            raise InvalidInput(where, f"unknown role {bad[0]!r}: roles are {list(ROLES)}")
        return [r for r in base_refs if r.get("role") in value]
    raise InvalidInput(where, "give either ref indices or roles, not a mix")


def _apply(body: dict, axis: str, value: Any, base: dict, n: int, where: str) -> None:
    if axis == "refs":
        body["refs"] = _refs_subset(base.get("refs") or [], value, where)
    elif axis == "seeds":
        if isinstance(value, int) and not isinstance(value, bool):
            body["seeds"] = [value + i for i in range(n)]
        elif isinstance(value, list) and value:
            body["seeds"] = list(value)
        else:
            raise InvalidInput(where, "must be a first seed or a non-empty list of seeds")
    elif axis == "preset" and value is None:
        body.pop("preset", None)
    else:
        body[axis] = value


def expand(base: dict, axes: dict[str, list], n: int) -> list[Cell]:
    """The cells, the cartesian product of the axes in their order (the last axis varies fastest). `base` is
    the generate request's fields as the client set them (no mode), its first seed or seeds resolved."""
    names = list(axes)
    seeds = None if "seeds" in axes else _base_seeds(base, n)
    cells = []
    for index, picks in enumerate(itertools.product(*(range(len(axes[a])) for a in names))):
        body = {k: v for k, v in base.items() if k not in ("seed", "seeds", "n")}
        body["seeds"] = seeds
        values, labels, fields = {}, {}, {}
        for axis, i in zip(names, picks):
            value, where = axes[axis][i], f"axes.{axis}[{i}]"
            _apply(body, axis, value, base, n, where)
            values[axis], labels[axis], fields[axis] = value, label(axis, value), where
        cells.append(Cell(index, values, labels, body, fields))
    return cells


_ALIASES = {"seed": "seeds", "n": "seeds"}


def axis_field(error_field: str | None, cell: Cell) -> str:
    """The sweep field to blame for a cell's error on `error_field`: the axis that sets that field in the cell
    (`axes.shift[2]`), else the base's field (`base.width`)."""
    top = re.split(r"[.\[]", error_field or "")[0]
    top = _ALIASES.get(top, top)
    if top in cell.fields:
        return cell.fields[top]
    return f"base.{error_field}" if error_field else "base"


# -- results ------------------------------------------------------------------------------------------------


def sweep_scores(cells: list[list[dict | None]]) -> list[list[float | None]]:
    """One composite over every candidate of the sweep, from the breakdowns each cell's scoring gave (raw score
    and weight per scorer): z-scored across the whole sweep instead of within a cell, so that cells compare.
    A candidate without a breakdown (unscored, pruned) gets None."""
    flat = [(ci, k, b) for ci, cell in enumerate(cells) for k, b in enumerate(cell) if b]
    out: list[list[float | None]] = [[None] * len(cell) for cell in cells]
    if not flat:
        return out
    from hidream_serve.scoring.composite import combine  # torch: loaded in the Jobs replica, at a sweep's end

    names = list(dict.fromkeys(name for _, _, b in flat for name in b))
    raw = {name: [(b.get(name) or {}).get("raw") for _, _, b in flat] for name in names}
    weights = {name: next(float(b[name]["weight"] or 0.0) for _, _, b in flat if name in b) for name in names}
    composite, _ = combine(raw, weights, len(flat))
    for (ci, k, _), score in zip(flat, composite):
        out[ci][k] = score
    return out


def cell_summary(scores: list[float | None], seeds: list[int]) -> tuple[float | None, int | None, float | None]:
    """(best score, its seed (ties: the lowest), mean score) of a cell's candidates."""
    scored = [(s, seed) for s, seed in zip(scores, seeds) if s is not None and math.isfinite(s)]
    if not scored:
        return None, (min(seeds) if seeds else None), None
    best, best_seed = max(scored, key=lambda t: (t[0], -t[1]))
    return best, best_seed, sum(s for s, _ in scored) / len(scored)


def ranking(summaries: list[tuple[float | None, float | None]]) -> list[int]:
    """Cell indices best to worst by mean score, then best score; unscored cells last, in order."""
    def key(i: int):
        best, mean = summaries[i]
        return (mean is None, -(mean or 0.0), best is None, -(best or 0.0), i)

    return sorted(range(len(summaries)), key=key)


def table_rows(result: dict) -> list[dict]:
    """One row per cell: index, rank, each axis's label, seeds, best, best seed, mean, the best image's URL."""
    rows = []
    for cell in result["cells"]:
        best_url = next((c["url"] for c in cell["candidates"] if c["seed"] == cell["best_seed"]), None)
        rows.append({"cell": cell["cell"], "rank": cell["rank"], **{a: cell["labels"][a] for a in result["axes"]},
                     "n": len(cell["candidates"]), "best": cell["best"], "best_seed": cell["best_seed"],
                     "mean": cell["mean"], "best_url": best_url})  # fmt: skip
    return rows


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()

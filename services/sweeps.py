"""Sweeps as jobs (kind `sweep`): checking a sweep before it is accepted (the route), running it (the Jobs
replica, through JobRunner's seed-group fan-out), and its view, files and images.

A sweep's stored request is its spec (`base`, `axes`, `n`, the first seed resolved), never the cells: they are
expanded again on every run (`hidream_serve/sweeps.py:expand`), so a resumed sweep runs the same cells and keeps
the candidates already stored. A candidate is stored under its slot (`Cell.slot`): the same seed in two cells
is two images.

Running: 1. every cell's engine params; 2. every cell's seed groups not stored yet, ordered so that cells of
the same shapes (output size, ref count and sizes) run one after another on the replicas, all submitted at
once so they spread over every generator replica; 3. as a cell's groups finish, its candidates are scored
together (one scorer call, as best-of-N) and a `cell` event reports it; 4. the sweep-wide composite (each
scorer's raw score z-scored over the whole sweep, so that cells compare), ranking, contact sheet and tables.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from hidream_serve import contact_sheet
from hidream_serve.api.errors import BadRequest, NotFound, ServiceError, Unavailable, classify, validation_error
from hidream_serve.api.jobs_protocol import CandidateProgress, JobError, JobView, job_urls
from hidream_serve.api.protocol import RANDOM_SEED_BOUND, Defaults, GenerateRequest, Limits, Timings
from hidream_serve.api.sweeps_protocol import SweepFiles, SweepRequest, SweepResult
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import recipe_for
from hidream_serve.scoring.context import ScoreContext
from hidream_serve.sweeps import (
    SHEET,
    SLOT_STRIDE,
    TABLE_CSV,
    TABLE_JSON,
    Cell,
    axis_field,
    cell_summary,
    expand,
    ranking,
    seeds_per_cell,
    sweep_scores,
    table_csv,
    table_rows,
)  # fmt: skip

from .config import RouterConfig
from .fanout import Scored, group_size, pick_winner, score_candidates, split_seeds
from .messages import GroupJob, GroupResult, PreviewImage, StepProgress

log = logging.getLogger("ray.serve.hidream.jobs")

FILES = (SHEET, TABLE_CSV, TABLE_JSON)
MEDIA_TYPES = {SHEET: "image/png", TABLE_CSV: "text/csv; charset=utf-8", TABLE_JSON: "application/json"}


def file_url(job_id: str, name: str) -> str:
    return f"/v1/jobs/{job_id}/{name}"


def cell_image_url(job_id: str, cell: int, seed: int) -> str:
    return f"/v1/jobs/{job_id}/cells/{cell}/images/{seed}.png"


# 1. before a sweep is accepted (the router) ---------------------------------------------------------------


def prepare(body: SweepRequest, limits: Limits, defaults: Defaults, config: RouterConfig,
            has_scorer: bool) -> dict:  # fmt: skip
    """The stored request of a sweep, after every cell has passed the generate validation; InvalidInput
    naming the axis value (`axes.shift[2]`) or the base field (`base.width`) otherwise."""
    from .router import validate  # the generate route's whole check

    base = body.base.model_dump(mode="json", by_alias=True, exclude_unset=True)
    mode = base.pop("mode")
    axes = body.axes.named()
    n = seeds_per_cell(base, body.n)
    if n > limits.max_n:
        raise InvalidInput("n", f"at most {limits.max_n} seeds per cell, got {n}")
    if "seeds" not in base and "seed" not in base and "seeds" not in axes:
        base["seed"] = secrets.randbelow(RANDOM_SEED_BOUND)  # the same random seeds in every cell
    count = math.prod(len(v) for v in axes.values())
    if body.max_cells is not None and count > body.max_cells:
        raise InvalidInput("max_cells", f"the axes give {count} cells, more than max_cells={body.max_cells}")
    if count * n > config.sweep_max_images:
        raise InvalidInput("axes", f"{count} cells x {n} seeds = {count * n} images, more than this server's "
                           f"limit of {config.sweep_max_images} per sweep")  # fmt: skip
    cells = expand(base, axes, n)
    requests = [_cell_request(c) for c in cells]  # the schema of every cell first: cheap
    for cell, req in zip(cells, requests):
        try:
            validate(req, mode, limits, defaults)
        except (InvalidInput, BadRequest) as e:
            raise InvalidInput(axis_field(e.field, cell), f"{e.message} (cell {cell.index}: "
                               f"{_describe(cell) or 'the base'})") from None  # fmt: skip
        if req.prune_plan() and not has_scorer:
            raise InvalidInput(axis_field("prune", cell), "pruning needs a scorer and this server has none")
    return {"kind": "sweep", "mode": mode, "base": base, "axes": axes, "n": n}


def _cell_request(cell: Cell) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate_json(json.dumps(cell.body))
    except ValidationError as e:
        err = validation_error(e.errors())
        raise InvalidInput(axis_field(err.field, cell), err.message) from None


def _describe(cell: Cell) -> str:
    return ", ".join(f"{a}={v}" for a, v in cell.labels.items())


def cells_of(spec: dict) -> list[Cell]:
    return expand(spec["base"], spec["axes"], spec["n"])


# 2. running (the Jobs replica) ------------------------------------------------------------------------------


@dataclass
class Prepared:
    cell: Cell
    request: GenerateRequest
    params: object
    seeds: list[int]
    prune: object

    @property
    def shape(self) -> tuple:
        p = self.params
        return (p.width, p.height, p.exact_size, len(p.refs), tuple(r.size for r in p.refs))


@dataclass
class CellOutcome:
    candidates: list[Scored]
    settings: dict
    warnings: list[str] = field(default_factory=list)


async def run(runner, job_id: str) -> None:
    """Run a stored sweep on `runner` (JobRunner): its live state, events, store and generator/scorer calls."""
    store = runner.store
    spec = store.get(job_id).request
    mode = spec["mode"]
    try:
        prepared = []
        for cell in cells_of(spec):
            request = GenerateRequest.model_validate(cell.body)
            params, seeds = await asyncio.to_thread(request.to_engine, mode, runner.limits, runner.defaults)
            prepared.append(Prepared(cell, request, params, seeds, request.prune_plan()))
    except Exception as e:  # noqa: BLE001 - validated at submission; a changed limit can still refuse it
        await runner._fail(job_id, classify(e))
        return
    from .job_runner import Live

    live = runner.live.setdefault(job_id, Live())
    live.candidates = {p.cell.slot(s): CandidateProgress(seed=s, cell=p.cell.index) for p in prepared for s in p.seeds}
    store.set_status(job_id, "running")
    await runner.event(job_id, "started", {"cells": len(prepared), "seeds": spec["n"]})
    t0 = time.perf_counter()
    stored = store.candidates(job_id)
    for slot, meta in stored.items():
        if slot in live.candidates:
            live.candidates[slot].step = meta["steps_computed"]
    for p in prepared:
        steps = _cell_steps(p.cell, runner.defaults)
        for s in p.seeds:
            if p.cell.slot(s) not in stored:
                runner.expect_progress(job_id, {"cell": p.cell.index, "seed": s, "step": 0, "steps": steps})
    work = []
    for p in prepared:
        for g in split_seeds(p.seeds, group_size(runner.router_config, bool(p.prune))):
            if not all(p.cell.slot(s) in stored for s in g):
                work.append((p, g))
    work.sort(key=lambda w: w[0].shape)  # stable: the same shapes in a row, cells in order within a shape
    groups: dict[int, list[asyncio.Task]] = {p.cell.index: [] for p in prepared}
    for p, g in work:
        stream = _cell_stream(runner, p.cell)
        groups[p.cell.index].append(asyncio.ensure_future(runner._group(job_id, live, p.params, g, p.prune,
                                                                         stream=stream)))  # fmt: skip
    cell_tasks = [asyncio.ensure_future(_finish_cell(runner, job_id, p, groups[p.cell.index])) for p in prepared]
    try:
        outcomes = await asyncio.gather(*cell_tasks, return_exceptions=True)
    except asyncio.CancelledError:  # cancel(): stop every group, keep what finished
        for t in [t for ts in groups.values() for t in ts] + cell_tasks:
            t.cancel()
        await asyncio.gather(*[t for ts in groups.values() for t in ts], *cell_tasks, return_exceptions=True)
        await _finish_cancelled(runner, job_id, prepared)
        return
    bad = next((e for e in outcomes if isinstance(e, BadRequest)), None)
    if bad is not None or all(isinstance(e, BaseException) for e in outcomes):
        await runner._fail(job_id, bad or classify(outcomes[0]))
        return
    t_gen = time.perf_counter() - t0
    result = _result(job_id, mode, spec, prepared, outcomes, Timings(generate=t_gen, total=t_gen))
    await asyncio.to_thread(write_files, store, job_id, result, runner.config.sweep_tile_size)
    await runner.event(job_id, "scored", {"scored": result["scored"], "ranking": result["ranking"]})
    store.set_status(job_id, "succeeded", result=result)
    top = result["cells"][result["ranking"][0]]
    best = next((c for c in top["candidates"] if c["seed"] == top["best_seed"]), None)
    await runner.event(job_id, "succeeded", {"best": {"cell": top["cell"], "seed": top["best_seed"],
                                                      "score": top["best"], "url": best and best["url"]},
                                             "contact_sheet": file_url(job_id, SHEET)})  # fmt: skip


def _cell_stream(runner, cell: Cell):
    """JobRunner._group's stream handler for one cell: progress and candidates under the cell's slots."""

    async def stream(job_id: str, live, job: GroupJob) -> GroupResult:
        result = None
        async for msg in runner.generate_stream(job):
            if isinstance(msg, StepProgress):
                for s in msg.seeds:
                    live.candidates[cell.slot(s)].step = msg.step
                    await runner.event(job_id, "progress", {"cell": cell.index, "seed": s, "step": msg.step,
                                                            "steps": msg.steps})  # fmt: skip
            elif isinstance(msg, PreviewImage):
                await runner.event(job_id, "preview", {"cell": cell.index, "seed": msg.seed, "step": msg.step,
                                                       "media_type": msg.media_type,
                                                       "image": base64.b64encode(msg.image).decode()})  # fmt: skip
            elif isinstance(msg, GroupResult):
                result = msg
        if result is None:
            raise ServiceError("the generator's stream ended without a result")
        for c in result.candidates:
            preview = c.preview if c.pruned_at_step is not None else None
            meta = {"cell": cell.index, "seed": c.seed, "steps_computed": c.steps_computed,
                    "pruned_at_step": c.pruned_at_step, "replica": result.replica, "settings": result.settings,
                    "warnings": result.warnings, "score": preview.score if preview else None,
                    "scores": preview.breakdown if preview else None}  # fmt: skip
            if c.png is not None:
                await asyncio.to_thread(runner.store.save_candidate, job_id, cell.slot(c.seed), c.png, meta)
            live.candidates[cell.slot(c.seed)] = CandidateProgress(seed=c.seed, cell=cell.index, step=c.steps_computed,
                                                                   pruned=c.pruned_at_step is not None)  # fmt: skip
            await runner.event(job_id, "candidate", {"cell": cell.index, "seed": c.seed,
                                                     "pruned": c.pruned_at_step is not None,
                                                     "steps_computed": c.steps_computed,
                                                     "url": cell_image_url(job_id, cell.index, c.seed)})  # fmt: skip
        return result

    return stream


def _stored(store, job_id: str, p: Prepared) -> tuple[list[Scored], list[dict]]:
    stored = store.candidates(job_id)
    out, metas = [], []
    for seed in p.seeds:
        meta = stored.get(p.cell.slot(seed))
        if meta is None:
            continue
        png = store.image_path(job_id, p.cell.slot(seed)).read_bytes()
        out.append(Scored(seed=seed, png=png, replica=meta["replica"], steps_computed=meta["steps_computed"],
                          pruned_at_step=meta["pruned_at_step"], score=meta["score"], scores=meta["scores"]))  # fmt: skip
        metas.append(meta)
    return out, metas


async def _finish_cell(runner, job_id: str, p: Prepared, tasks: list[asyncio.Task]) -> CellOutcome:
    """Wait for the cell's groups, then score its candidates together and report the cell."""
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [classify(e) for e in outcomes if isinstance(e, BaseException)]
    bad = next((e for e in failed if isinstance(e, BadRequest)), None)
    if bad is not None:
        raise bad
    warnings = [f"a seed group was not generated: {e.message}" for e in failed]
    candidates, metas = await asyncio.to_thread(_stored, runner.store, job_id, p)
    if not candidates:
        raise failed[0] if failed else Unavailable(f"cell {p.cell.index}: no candidate was generated")
    for m in metas:
        warnings.extend(w for w in m.get("warnings", []) if w not in warnings)
    context = ScoreContext.for_params(p.params)
    score = None
    if runner.score is not None:
        async def score(prompt, pngs):
            return await runner.score(prompt, pngs, context)
    await score_candidates(p.params.prompt, candidates, score, runner.router_config, warnings)
    winner = pick_winner(candidates)
    await runner.event(job_id, "cell", {"cell": p.cell.index, "values": p.cell.labels, "winner": winner.seed,
                                        "candidates": [{"seed": c.seed, "score": c.score} for c in candidates]})  # fmt: skip
    return CellOutcome(candidates, {**metas[0]["settings"]}, warnings)


def _result(job_id: str, mode: str, spec: dict, prepared: list[Prepared], outcomes: list, timings: Timings) -> dict:
    warnings: list[str] = []
    ok = [o if isinstance(o, CellOutcome) else None for o in outcomes]
    for p, o in zip(prepared, outcomes):
        if not isinstance(o, CellOutcome):
            warnings.append(f"cell {p.cell.index} ({_describe(p.cell)}) failed: {classify(o).message}")
    scores = sweep_scores([[c.scores for c in o.candidates] if o else [] for o in ok])
    cells = []
    for p, o, cell_scores in zip(prepared, ok, scores):
        cands = []
        for c, s in zip(o.candidates if o else [], cell_scores):
            cands.append({"seed": c.seed, "score": s, "cell_score": c.score, "scores": c.scores,
                          "url": cell_image_url(job_id, p.cell.index, c.seed), "pruned": c.pruned_at_step is not None,
                          "steps_computed": c.steps_computed, "replica": c.replica})  # fmt: skip
        best, best_seed, mean = cell_summary(cell_scores, [c.seed for c in (o.candidates if o else [])])
        settings = {**(o.settings if o else {}), **p.request.settings_notes(mode), "seeds": p.seeds}
        cell_warnings = [*p.request.effective(mode).warnings, *(o.warnings if o else [])]
        cells.append({"cell": p.cell.index, "values": p.cell.values, "labels": p.cell.labels, "settings": settings,
                      "warnings": list(dict.fromkeys(cell_warnings)), "candidates": cands, "best": best,
                      "best_seed": best_seed, "mean": mean})  # fmt: skip
    order = ranking([(c["best"], c["mean"]) for c in cells])
    for rank, i in enumerate(order, 1):
        cells[i]["rank"] = rank
    scored = any(c["score"] is not None for cell in cells for c in cell["candidates"])
    files = SweepFiles(contact_sheet=file_url(job_id, SHEET), table_csv=file_url(job_id, TABLE_CSV),
                       table_json=file_url(job_id, TABLE_JSON))  # fmt: skip
    res = SweepResult(id=job_id, mode=mode, axes=list(spec["axes"]), scored=scored, cells=cells, ranking=order,
                      warnings=warnings, files=files, timings=timings)  # fmt: skip
    return res.model_dump(mode="json", by_alias=True)


def files_dir(store, job_id: str) -> Path:
    return store.results_dir / job_id


def write_files(store, job_id: str, result: dict, tile: int) -> None:
    """The contact sheet and the table (CSV, JSON) beside the job's images (retention deletes them together)."""
    images = {}
    for cell in result["cells"]:
        for c in cell["candidates"]:
            path = store.image_path(job_id, cell["cell"] * SLOT_STRIDE + cell["settings"]["seeds"].index(c["seed"]))
            if path.is_file():
                images[(cell["cell"], c["seed"])] = path.read_bytes()
    rows = table_rows(result)
    out = files_dir(store, job_id)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((SHEET, contact_sheet.render(result, images, tile)), (TABLE_CSV, table_csv(rows).encode()),
                       (TABLE_JSON, json.dumps(rows, indent=1).encode())):  # fmt: skip
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out / name)


async def _finish_cancelled(runner, job_id: str, prepared: list[Prepared]) -> None:
    done = []
    for p in prepared:
        for c in (await asyncio.to_thread(_stored, runner.store, job_id, p))[0]:
            done.append({"cell": p.cell.index, "seed": c.seed, "url": cell_image_url(job_id, p.cell.index, c.seed),
                         "steps_computed": c.steps_computed})  # fmt: skip
    live = runner.live.get(job_id)
    progress = [c.model_dump() for c in live.candidates.values()] if live is not None else []
    runner.store.set_status(job_id, "cancelled", result={"candidates": done, "progress": progress})
    await runner.event(job_id, "cancelled", {"candidates": done})


# 3. view, files and images (the Jobs replica) -------------------------------------------------------------


def _cell_steps(cell: Cell, defaults: Defaults) -> int:
    body = cell.body
    steps = body.get("steps", defaults.steps)
    if steps is not None:
        return int(steps)
    recipe = body.get("recipe") or defaults.recipe
    return recipe_for(recipe, len(body.get("refs") or [])).steps


def view(job, live, store, defaults: Defaults) -> JobView:
    """GET /v1/jobs/{id} of a sweep: per (cell, seed) progress; `result` the SweepResult once it succeeded."""
    cells = cells_of(job.request)
    stored = store.candidates(job.id)
    kept = {(p["cell"], p["seed"]): CandidateProgress(**p) for p in (job.result or {}).get("progress", [])}
    candidates, total = [], 0
    for cell in cells:
        steps = _cell_steps(cell, defaults)
        total += steps * len(cell.seeds)
        for s in cell.seeds:
            slot = cell.slot(s)
            if live is not None and slot in live.candidates:
                candidates.append(live.candidates[slot])
            elif (cell.index, s) in kept:  # a cancelled sweep: the steps each candidate had done
                candidates.append(kept[(cell.index, s)])
            else:
                meta = stored.get(slot)
                candidates.append(CandidateProgress(seed=s, cell=cell.index, step=meta["steps_computed"] if meta else 0,
                                                    pruned=bool(meta and meta["pruned_at_step"] is not None)))  # fmt: skip
    result = job.result if job.status == "succeeded" else None
    if result is not None:
        scores = {(c["cell"], k["seed"]): k["score"] for c in result["cells"] for k in c["candidates"]}
        for c in candidates:
            c.score = scores.get((c.cell, c.seed))
    warnings = list((result or {}).get("warnings") or [])
    settings = {"cells": len(cells), "seeds_per_cell": job.request["n"], "axes": job.request["axes"]}
    return JobView(id=job.id, kind="sweep", mode=job.request["mode"], status=job.status,
                   queue_position=store.queue_position(job.id), candidates=candidates,
                   steps_done=sum(c.step for c in candidates), steps_total=total, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, settings=settings, warnings=warnings,
                   error=JobError(**job.error) if job.error else None, result=result, urls=job_urls(job.id))  # fmt: skip


def read_file(store, job, name: str) -> bytes:
    if job.request.get("kind") != "sweep":
        raise NotFound(f"job {job.id} is not a sweep", field="id")
    path = files_dir(store, job.id) / name
    if name not in FILES or not path.is_file():
        raise NotFound(f"sweep {job.id} has no {name} (it is written when the sweep succeeds)", field="id")
    return path.read_bytes()


def read_image(store, job, cell: int, seed: int) -> bytes:
    if job.request.get("kind") != "sweep":
        raise NotFound(f"job {job.id} is not a sweep", field="id")
    cells = cells_of(job.request)
    if not 0 <= cell < len(cells):
        raise NotFound(f"sweep {job.id} has no cell {cell}", field="cell")
    if seed not in cells[cell].seeds or not store.image_path(job.id, cells[cell].slot(seed)).is_file():
        raise NotFound(f"sweep {job.id} cell {cell} has no image for seed {seed}", field="seed")
    return store.image_path(job.id, cells[cell].slot(seed)).read_bytes()

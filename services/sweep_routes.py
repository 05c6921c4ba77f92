"""Routes of presets and sweeps, on the router's FastAPI app: `GET /v1/presets`, `POST /v1/sweeps` (a job of
kind `sweep`, docs/sweeps.md) and a sweep's files (`/v1/jobs/{id}/contact-sheet.png`, `table.csv`,
`table.json`, `cells/{cell}/images/{seed}.png`). Stateless like job_routes: the Jobs deployment owns the store."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from hidream_serve.api.errors import error_response
from hidream_serve.api.jobs_protocol import JobCreated
from hidream_serve.api.protocol import ERROR_RESPONSES
from hidream_serve.api.sweeps_protocol import SweepRequest
from hidream_serve.presets import PRESETS
from hidream_serve.sweeps import SHEET, TABLE_CSV, TABLE_JSON

from . import sweeps

api = APIRouter(tags=["sweeps"])


@api.get("/v1/presets")
async def list_presets() -> dict:
    """The named presets: mode, shift, guidance, the ref roles kept and dropped, and why."""
    return {"object": "list", "data": [p.view() for p in PRESETS.values()]}


def _router():
    return serve.get_replica_context().servable_object


@api.post("/v1/sweeps", status_code=202, response_model=JobCreated, responses=ERROR_RESPONSES)
async def create_sweep(body: SweepRequest, request: Request,
                       idempotency_key: str | None = Header(None, max_length=255)) -> JSONResponse:  # fmt: skip
    """A sweep as a job of kind `sweep`: every cell is checked like a generate call before it is accepted (a bad
    value is a 422 naming it, e.g. `axes.shift[2]`); follow it with the /v1/jobs routes."""
    router = _router()
    try:
        stored = await asyncio.to_thread(sweeps.prepare, body, router.limits, router.defaults, router.config,
                                         router.scorer is not None)  # fmt: skip
        client_body = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
        view = await router.jobs.submit.remote(stored, idempotency_key, client_body)
    except Exception as e:  # noqa: BLE001 - the one mapping, in hidream_serve.api.errors
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    created = JobCreated(id=view["id"], status=view["status"], created_at=view["created_at"], urls=view["urls"])
    return JSONResponse(created.model_dump(mode="json", by_alias=True), status_code=202,
                        headers={"Location": view["urls"]["self"]})  # fmt: skip


async def _file(request: Request, job_id: str, name: str) -> Response:
    router = _router()
    try:
        data = await router.jobs.sweep_file.remote(job_id, name)
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    return Response(data, media_type=sweeps.MEDIA_TYPES[name])


@api.get("/v1/jobs/{job_id}/contact-sheet.png", responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
async def contact_sheet(job_id: str, request: Request) -> Response:
    """A finished sweep's contact sheet: rows and columns labelled by the axis values, each candidate's score
    under it, each cell's winner framed."""
    return await _file(request, job_id, SHEET)


@api.get("/v1/jobs/{job_id}/table.csv", responses={200: {"content": {"text/csv": {}}}, **ERROR_RESPONSES})
async def table_as_csv(job_id: str, request: Request) -> Response:
    """One row per cell: cell, rank, each axis's value, n, best, best_seed, mean, best_url."""
    return await _file(request, job_id, TABLE_CSV)


@api.get("/v1/jobs/{job_id}/table.json", responses=ERROR_RESPONSES)
async def table_as_json(job_id: str, request: Request) -> Response:
    """The rows of table.csv as a JSON list."""
    return await _file(request, job_id, TABLE_JSON)


@api.get("/v1/jobs/{job_id}/cells/{cell}/images/{seed}.png",
         responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})  # fmt: skip
async def cell_image(job_id: str, cell: int, seed: int, request: Request) -> Response:
    router = _router()
    try:
        png = await router.jobs.sweep_image.remote(job_id, cell, seed)
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    return Response(png, media_type="image/png")

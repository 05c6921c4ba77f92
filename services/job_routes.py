"""The jobs API routes (`/v1/jobs`), on the router's FastAPI app. Stateless: each call forwards to the
`Jobs` deployment, which owns the store. Validation is the generate route's, complete before a job is
accepted, so a bad job is a 422 naming the field, never a failed job later."""

from __future__ import annotations

import asyncio
import contextvars
import json

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from hidream_serve.api.errors import BadRequest, error_response
from hidream_serve.api.jobs_protocol import TERMINAL, JobCreated, JobList, JobRequest, JobStatus, JobView
from hidream_serve.api.protocol import ERROR_RESPONSES, GenerateRequest
from hidream_serve.engine.errors import InvalidInput

from .config import RouterConfig

api = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _router():
    return serve.get_replica_context().servable_object


_CANCELLING: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones to its tasks


def cancel_soon(router, job_ids: list[str]) -> None:
    """Cancel the jobs from a task of its own, outside the request's context: Serve cancels the calls a cancelled
    request made (a client gone), which would include these, and interrupts any await in the request's task."""

    async def cancel_all():
        await asyncio.gather(*(router.jobs.cancel.remote(j) for j in job_ids), return_exceptions=True)

    task = contextvars.Context().run(asyncio.get_running_loop().create_task, cancel_all())
    _CANCELLING.add(task)
    task.add_done_callback(_CANCELLING.discard)


def stored_request(body: GenerateRequest, mode: str, seeds: list[int], router_config: RouterConfig) -> dict:
    """The request as the job runs it: the client's fields, with the seeds resolved (random ones included), and
    the router's live fan-out settings (seed groups, deadlines, retries), so that a resumed job makes the same
    images and a `reconfigure` of the router reaches the jobs submitted after it."""
    stored = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
    stored.pop("seed", None)
    stored.pop("n", None)
    stored["seeds"] = seeds
    stored["mode"] = mode
    stored["router"] = router_config.model_dump(mode="json")
    return stored


@api.post("", status_code=202, response_model=JobCreated, responses=ERROR_RESPONSES)
async def create_job(body: JobRequest, request: Request,
                     idempotency_key: str | None = Header(None, max_length=255)) -> JSONResponse:  # fmt: skip
    router = _router()
    rid = request.state.request_id
    try:
        from .router import validate

        _params, seeds, _pre = await asyncio.to_thread(validate, body, body.mode, router.limits, router.defaults)
        if body.prune_plan() and router.scorer is None:
            raise InvalidInput("prune", "pruning needs a scorer and this server has none configured")
        client_body = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
        stored = stored_request(body, body.mode, seeds, router.config)
        view = await router.jobs.submit.remote(stored, idempotency_key, client_body)
    except Exception as e:  # noqa: BLE001 - the one mapping, in hidream_serve.api.errors
        return error_response(e, rid, router.config.retry_after_s)
    created = JobCreated(id=view["id"], status=view["status"], created_at=view["created_at"], urls=view["urls"])
    return JSONResponse(created.model_dump(mode="json", by_alias=True), status_code=202,
                        headers={"Location": view["urls"]["self"]})  # fmt: skip


@api.get("", response_model=JobList, responses=ERROR_RESPONSES)
async def list_jobs(request: Request, status: JobStatus | None = None, limit: int = Query(20, ge=1, le=100),
                    cursor: str | None = Query(None, pattern=r"^[0-9]{1,18}$")) -> JSONResponse:  # fmt: skip
    router = _router()
    try:
        page = await router.jobs.list.remote(status, limit, None if cursor is None else int(cursor))
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    return JSONResponse(page)


async def _forward(request: Request, method: str, *args) -> JSONResponse:
    router = _router()
    try:
        return JSONResponse(await getattr(router.jobs, method).remote(*args))
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)


@api.get("/{job_id}", response_model=JobView, responses=ERROR_RESPONSES)
async def get_job(job_id: str, request: Request) -> JSONResponse:
    return await _forward(request, "get", job_id)


@api.post("/{job_id}/cancel", response_model=JobView, responses=ERROR_RESPONSES)
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    return await _forward(request, "cancel", job_id)


@api.delete("/{job_id}", response_model=JobView, responses=ERROR_RESPONSES)
async def delete_job(job_id: str, request: Request) -> JSONResponse:
    return await _forward(request, "cancel", job_id)


@api.get("/{job_id}/images/{seed}.png", responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
async def job_image(job_id: str, seed: int, request: Request) -> Response:
    router = _router()
    try:
        png = await router.jobs.image.remote(job_id, seed)
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    return Response(png, media_type="image/png")


@api.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES})
async def job_events(job_id: str, request: Request, last_event_id: str | None = Header(None),
                     after: int | None = Query(None, ge=0)) -> Response:  # fmt: skip
    """Server-Sent Events: the job's events so far, then live ones, ending with its final event. Resume with
    `Last-Event-ID` (or `?after=`). A comment line keeps an idle stream alive every couple of seconds."""
    router = _router()
    rid = request.state.request_id
    try:
        if last_event_id is not None and not last_event_id.isdigit():
            raise BadRequest("Last-Event-ID must be an event id (digits)", field="Last-Event-ID")
        start = int(last_event_id) if last_event_id is not None else (after or 0)
        first = await router.jobs.events.remote(job_id, start)  # 404 before the stream starts
    except Exception as e:  # noqa: BLE001
        return error_response(e, rid, router.config.retry_after_s)

    async def stream():
        events, cursor = first, start
        while True:
            if not events:
                yield ": keep-alive\n\n"
            for e in events:
                cursor = e["id"]
                yield f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e['data'])}\n\n"
                if e["kind"] in TERMINAL:
                    return
            if await request.is_disconnected():
                return
            events = await router.jobs.events.remote(job_id, cursor)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

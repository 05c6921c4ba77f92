"""The OpenAI-compatible Images API on the router's FastAPI app: `POST /v1/images/generations` (JSON) and
`POST /v1/images/edits` (multipart), for the `openai` client and anything else that speaks it (docs/openai.md).

Each returned image is one job (`services/jobs.py`): the request is validated exactly like `POST /v1/jobs`
(every job before any is submitted, so a bad request starts nothing), the jobs run their best-of-`best_of`
fan-out, and the answer carries each job's winner. Streaming sends the previews of each job's first candidate
as partial images, then the winner. Errors are in OpenAI's shape (`hidream_serve/api/openai_protocol.py`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import UploadFile

from hidream_serve.api.errors import BadRequest, Unavailable, classify, error_response
from hidream_serve.api.jobs_protocol import TERMINAL, JobRequest, image_url
from hidream_serve.api.openai_protocol import (
    MEDIA_TYPES,
    ImageEditRequest,
    ImageGenerationRequest,
    OpenAIError,
    OutputFormat,
    from_validation,
    job_param,
    unsupported,
)  # fmt: skip
from hidream_serve.api.protocol import ERROR_RESPONSES, GenerateRequest
from hidream_serve.engine.errors import InvalidInput

from . import metrics
from .job_routes import cancel_soon, stored_request

api = APIRouter(tags=["openai"])

_ERRORS = {400: {"description": 'OpenAI\'s error shape: {"error": {"message", "type", "param", "code"}}'}}


def _router():
    return serve.get_replica_context().servable_object


def _body_doc(model, content_type: str, files: dict | None = None) -> dict:
    schema = model.model_json_schema()
    if files:  # file parts, which the model does not hold
        schema["properties"] = {**files, **schema["properties"]}
        schema["required"] = [*files, *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


_IMAGE_FILES = {"image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                          "description": "the input images (also sent as `image[]`); one: edit, several: ip"}}  # fmt: skip


def _error_response(err: BaseException, retry_after_s: float) -> JSONResponse:
    """OpenAI's error body: a bad request (our 422 or 400) is a 400 `invalid_request_error` naming `param`."""
    if isinstance(err, ValidationError):  # the OpenAI request's own model
        err = from_validation(err)
    if not isinstance(err, OpenAIError):
        svc = classify(err, retry_after_s)
        if isinstance(svc, BadRequest):
            err = OpenAIError(svc.message, param=job_param(svc.field))
        else:
            kind = "invalid_request_error" if svc.status < 500 else "server_error"
            err = OpenAIError(svc.message, param=job_param(svc.field), code=svc.type, status=svc.status, type_=kind)
            return JSONResponse(err.body(), status_code=err.status, headers=svc.headers())
    return JSONResponse(err.body(), status_code=err.status)


# 1. the routes -----------------------------------------------------------------------------------------------
@api.post("/v1/images/generations", responses=_ERRORS, openapi_extra=_body_doc(ImageGenerationRequest, "application/json"))
async def generations(request: Request) -> Response:
    router = _router()
    mode = "unknown"  # until the request is read
    try:
        try:
            raw = json.loads(await request.body())
        except ValueError as e:
            raise OpenAIError(f"the body is not valid JSON: {e}", param=None, code="invalid_json") from None
        if not isinstance(raw, dict):
            raise OpenAIError("the body must be a JSON object", param=None)
        if raw.get("mask") is not None:
            raise unsupported("mask", "masks are not supported (generations take no image)")
        body = ImageGenerationRequest.model_validate(raw)
        mode = body.job_mode()
        response = await _answer(request, body, mode, [], "image_generation")
    except Exception as e:  # noqa: BLE001 - every error in OpenAI's shape
        response = _error_response(e, router.config.retry_after_s)
    metrics.request("openai", mode, response.status_code)
    return response


@api.post("/v1/images/edits", responses=_ERRORS, openapi_extra=_body_doc(ImageEditRequest, "multipart/form-data", _IMAGE_FILES))
async def edits(request: Request) -> Response:
    router = _router()
    mode = "unknown"  # until the request is read
    try:
        fields, images = await _read_form(request)
        body = ImageEditRequest.model_validate(fields)
        mode = body.job_mode(len(images))
        refs = [{"image": base64.b64encode(data).decode(), "role": role}
                for data, role in zip(images, body.ref_roles(len(images)))]  # fmt: skip
        response = await _answer(request, body, mode, [{k: v for k, v in r.items() if v is not None} for r in refs],
                                 "image_edit")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - every error in OpenAI's shape
        response = _error_response(e, router.config.retry_after_s)
    metrics.request("openai", mode, response.status_code)
    return response


@api.get("/v1/images/files/{job_id}/{seed}.{fmt}",
         responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}}, **ERROR_RESPONSES})  # fmt: skip
async def image_file(job_id: str, seed: int, fmt: OutputFormat, request: Request,
                     compression: int | None = Query(None, ge=0, le=100)) -> Response:  # fmt: skip
    """A job's candidate as jpeg or webp (the `url` of a non-png `output_format`); png is /v1/jobs/{id}/images.
    A file route like that one: its errors are the service's usual body, not OpenAI's."""
    router = _router()
    try:
        png = await router.jobs.image.remote(job_id, seed)
        data, _ = await asyncio.to_thread(_encode, png, fmt, compression)
    except Exception as e:  # noqa: BLE001
        return error_response(e, request.state.request_id, router.config.retry_after_s)
    return Response(data, media_type=MEDIA_TYPES[fmt])


async def _read_form(request: Request) -> tuple[dict[str, Any], list[bytes]]:
    """The multipart body: `image` / `image[]` files, and every other part as a field (`roles[]` -> `roles`)."""
    try:
        form = await request.form()
    except Exception as e:  # noqa: BLE001 - not multipart, or malformed
        raise OpenAIError(f"the body must be multipart/form-data: {e}", param=None) from None
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if name == "mask":
            raise unsupported("mask", "masks are not supported; describe the edit in the prompt")
        if name == "image":
            if not isinstance(value, UploadFile):
                raise OpenAIError("image must be a file part", param="image")
            images.append(await value.read())
        elif isinstance(value, UploadFile):
            raise OpenAIError(f"{name} must be a text field, not a file", param=name)
        elif key.endswith("[]"):
            fields.setdefault(name, []).append(value)
        else:
            fields[name] = value
    if not images:
        raise OpenAIError("an edit needs at least one `image` file", param="image", code="missing_required_parameter")
    return fields, images


class _ClosingStream(StreamingResponse):
    """Closes its event generator when the response ends, however it ends: a client that went away cancels the
    request's task while the generator waits at a `yield`, and its cleanup (cancelling the jobs) would otherwise
    run only when the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# 2. validate and submit ----------------------------------------------------------------------------------------
async def _answer(request: Request, body, mode: str, refs: list[dict], event_prefix: str) -> Response:
    router = _router()
    if body.model is not None and body.model not in (router.info.model_name, router.info.model):
        raise OpenAIError(f"this server serves {router.info.model_name!r}, not {body.model!r}", param="model",
                          code="model_not_found")  # fmt: skip
    bodies = body.job_bodies(mode, refs, "preset" in GenerateRequest.model_fields)
    jobs = await _submit(router, bodies)
    if body.stream:
        return _ClosingStream(_stream(router, body, jobs, event_prefix), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    try:
        ends = await asyncio.gather(*(_follow(router, job_id) for job_id, _ in jobs))
        images = [await _winner(router, job_id, end, body) for (job_id, _), end in zip(jobs, ends)]
    except BaseException:
        cancel_soon(router, [j for j, _ in jobs])  # a failed image or a client gone: the other jobs stop too
        raise
    base = str(request.base_url).rstrip("/")
    data = []
    for (job_id, _), (seed, score, encoded, _size) in zip(jobs, images):
        item: dict[str, Any] = {"seed": seed, "score": score, "job_id": job_id}
        if body.response_format == "url":
            item["url"] = base + _file_path(job_id, seed, body.output_format, body.output_compression)
        else:
            item["b64_json"] = base64.b64encode(encoded).decode()
        data.append(item)
    out: dict[str, Any] = {"created": int(time.time()), "data": data, "output_format": body.output_format,
                           "size": images[0][3]}  # fmt: skip
    if body.quality is not None:
        out["quality"] = body.quality
    return JSONResponse(out)


async def _submit(router, bodies: list[dict]) -> list[tuple[str, list[int]]]:
    """Validate every job like `POST /v1/jobs`, then submit them all: [(job id, its seeds)]."""
    from .router import validate

    checked = []
    for body in bodies:
        try:
            req = JobRequest.model_validate(body)
        except ValidationError as e:
            raise from_validation(e, job_param) from None
        _params, seeds, _pre = await asyncio.to_thread(validate, req, req.mode, router.limits, router.defaults)
        checked.append((req, seeds))
    jobs = []
    for req, seeds in checked:
        view = await router.jobs.submit.remote(stored_request(req, req.mode, seeds, router.config), None, None)
        jobs.append((view["id"], seeds))
    return jobs


# 3. following the jobs -----------------------------------------------------------------------------------------
async def _follow(router, job_id: str, on_event=None) -> dict:
    """Read the job's events until its final one, which is returned."""
    cursor = 0
    while True:
        for e in await router.jobs.events.remote(job_id, cursor):
            cursor = e["id"]
            if on_event is not None:
                await on_event(e)
            if e["kind"] in TERMINAL:
                return e


async def _winner(router, job_id: str, end: dict, body) -> tuple[int, float | None, bytes, str]:
    """(seed, score, the image in the requested format, "WxH") of a finished job; a failed one raises."""
    if end["kind"] == "failed":
        err = end["data"]["error"]
        if err.get("type") == "invalid_input":
            raise InvalidInput(err.get("field") or "body", err["message"])
        raise Unavailable(f"the image could not be made: {err['message']}", field=err.get("field"))
    if end["kind"] == "cancelled":
        raise Unavailable(f"job {job_id} was cancelled")
    winner = end["data"]["winner"]
    png = await router.jobs.image.remote(job_id, winner["seed"])
    encoded, size = await asyncio.to_thread(_encode, png, body.output_format, body.output_compression)
    return winner["seed"], winner.get("score"), encoded, size


async def _stream(router, body, jobs: list[tuple[str, list[int]]], prefix: str):
    """SSE: `<prefix>.partial_image` for up to `partial_images` previews of each job's first candidate, then
    `<prefix>.completed` per image; an `error` event (OpenAI's error body) if one fails."""
    queue: asyncio.Queue = asyncio.Queue()
    completed = 0  # images whose completed event is queued
    common = {"background": body.background or "auto", "output_format": body.output_format,
              "quality": body.quality or "auto"}  # fmt: skip

    def sse(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    async def follow(index: int, job_id: str, first_seed: int) -> None:
        nonlocal completed
        sent = 0

        async def on_event(e):
            nonlocal sent
            d = e["data"]
            if e["kind"] == "preview" and d["seed"] == first_seed and sent < body.partial_images:
                image, size = await asyncio.to_thread(_encode, base64.b64decode(d["image"]), body.output_format,
                                                      body.output_compression)  # fmt: skip
                await queue.put(sse(f"{prefix}.partial_image", {
                    "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(image).decode(),
                    "partial_image_index": sent, "image_index": index, "created_at": int(time.time()),
                    "size": size, **common}))  # fmt: skip
                sent += 1

        try:
            end = await _follow(router, job_id, on_event)
            seed, score, image, size = await _winner(router, job_id, end, body)
            await queue.put(sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed", "b64_json": base64.b64encode(image).decode(), "image_index": index,
                "seed": seed, "score": score, "job_id": job_id, "created_at": int(time.time()), "size": size,
                "usage": _NO_USAGE, **common}))  # fmt: skip
            completed += 1
        except Exception as e:  # noqa: BLE001 - becomes the stream's error event
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(follow(i, job_id, seeds[0])) for i, (job_id, seeds) in enumerate(jobs)]
    done = 0
    try:
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                err = json.loads(_error_response(item, router.config.retry_after_s).body)
                yield sse("error", err)
                return
            else:
                yield item
    finally:  # no await here: a cancelled request's task is cancelled again at each one
        for t in tasks:
            t.cancel()
        if completed < len(tasks):  # an image failed, or the client went away (Serve cancels our event reads)
            cancel_soon(router, [j for j, _ in jobs])


# usage counts: no token accounting here (the completed event's `usage` field is required by OpenAI's schema)
_NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
             "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # fmt: skip


# 4. image formats ----------------------------------------------------------------------------------------------
def _file_path(job_id: str, seed: int, fmt: str, compression: int | None) -> str:
    if fmt == "png":
        return image_url(job_id, seed)
    query = "" if compression is None else f"?compression={compression}"
    return f"/v1/images/files/{job_id}/{seed}.{fmt}{query}"


def _encode(image: bytes, fmt: str, compression: int | None) -> tuple[bytes, str]:
    """The image (a stored PNG, or a JPEG/WebP preview) in `fmt` (compression: jpeg/webp quality, default 100),
    and its size "WxH". A PNG asked as png is returned as stored, with its text chunks."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        size = f"{im.width}x{im.height}"
        if fmt == "png" and im.format == "PNG":
            return image, size
        buf = io.BytesIO()
        rgb = im.convert("RGB")
        if fmt == "png":
            rgb.save(buf, format="PNG")
        else:
            rgb.save(buf, format=fmt.upper(), quality=100 if compression is None else compression)
        return buf.getvalue(), size

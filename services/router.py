"""HTTP ingress: validates a request completely, admits it, runs it as a job (the Jobs deployment fans best-of-N
out to the generator replicas and scores the candidates), answers.

Routes: `POST /v1/generate/{mode}`, `GET /v1/models`, `GET /healthz` (alive), `GET /readyz` (503 until
a generator and the scorer replica are running), and the jobs, sweeps, OpenAI and studio routes. Validation
(schema, image decoding, every engine input rule, operator limits) happens here, before any generator is asked,
so a bad request never occupies a GPU. Errors become responses in one place: `hidream_serve.api.errors`.
"""


import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers

from hidream_serve.api.checks import precheck
from hidream_serve.api.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    PayloadTooLarge,
    Unavailable,
    classify,
    error_response,
    from_body,
    install_error_handlers,
    replica_lost,
)  # fmt: skip
from hidream_serve.api.images import PixelBudget, RefBudget, b64, release_after
from hidream_serve.api.protocol import (
    CandidateOut,
    Debug,
    ERROR_RESPONSES,
    Defaults,
    GenerateRequest,
    GenerateResponse,
    Limits,
    Timings,
    Winner,
    schema_with_limits,
)  # fmt: skip
from hidream_serve.api.request_id import REQUEST_ID_HEADER, RequestIds
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import DEV, FULL
from hidream_serve.vocabulary import MODES, RECIPES, ROLES, SCHEDULERS, Mode

from . import job_routes, metrics, openai_routes, studio_routes, sweep_routes
from .config import RouterConfig
from .admission import Admission
from .fanout import group_size
from .job_routes import cancel_soon
from .messages import AppInfo

log = logging.getLogger("ray.serve.hidream.router")  # under Serve's logger: replica logs

app = FastAPI(title="hidream-serve", version="0.1.0",
              description="HiDream-O1-Image: every mode behind one HTTP API, best-of-N on Ray Serve",
              docs_url=None, redoc_url=None)  # /docs from local assets, no CDN: services/studio_routes.py  # fmt: skip


def _config() -> RouterConfig:
    """The live RouterConfig of this replica. (Serve freezes a copy of `app` at decoration time, so
    middleware and handlers cannot share module state with the deployment; they ask the replica.)"""
    try:
        return serve.get_replica_context().servable_object.config
    except Exception:  # noqa: BLE001 - outside a replica, or before __init__ finished
        return RouterConfig()


def _limits() -> Limits:
    """This replica's operator limits, which the OpenAPI schema and the validation messages state."""
    try:
        return serve.get_replica_context().servable_object.limits
    except Exception:  # noqa: BLE001 - outside a replica, or before __init__ finished
        return Limits()


def _app_name() -> str | None:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a replica
        return None


def _openapi() -> dict:
    return schema_with_limits(FastAPI.openapi(app), _limits())


install_error_handlers(app, retry_after_s=lambda: _config().retry_after_s, limits=_limits)
app.openapi = _openapi


class _Ingress:
    """ASGI middleware in front of everything: the request id and start time, and the body-size limit.

    The limit is enforced on the bytes actually received, not only on `Content-Length` (a chunked upload
    has none): the body is read here, up to the limit, and replayed to the app; past the limit the answer
    is 413 and the rest is never read."""

    def __init__(self, app):
        self.app = app
        self.request_ids = RequestIds()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Serve's proxy assigns each request an id and passes it in `x-request-id` (and echoes it back).
        headers = Headers(scope=scope)
        try:
            rid = self.request_ids.assign(headers.get(REQUEST_ID_HEADER))
        except BadRequest as err:
            return await error_response(err, uuid.uuid4().hex)(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"], state["t0"] = rid, time.perf_counter()
        limit = _config().max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            err = PayloadTooLarge(f"request body is {length} bytes, more than {limit}", field="body")
            return await error_response(err, rid)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                chunks = None
                break
            size += len(message.get("body", b""))
            if size > limit:
                err = PayloadTooLarge(f"request body is more than {limit} bytes", field="body")
                return await error_response(err, rid)(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if chunks is None:
            return await self.app(scope, _replay([message], receive), send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    """An ASGI `receive` that gives these messages first, then defers to the real one (disconnects)."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


app.add_middleware(_Ingress)
app.include_router(job_routes.api)  # before @serve.ingress(app), which freezes a copy of the app
app.include_router(openai_routes.api)  # /v1/images/generations and /v1/images/edits (OpenAI's API)
app.include_router(sweep_routes.api)  # /v1/presets, /v1/sweeps and a sweep's files
app.include_router(studio_routes.api)  # the web studio at /, and /docs offline


def validate(body: GenerateRequest, mode: str, limits: Limits, defaults: Defaults,
             ref_budget: RefBudget | None = None):  # fmt: skip
    """The whole request check (decodes the reference images within `ref_budget`): (params, seeds, precheck's
    answer)."""
    params, seeds = body.to_engine(mode, limits, defaults, ref_budget)
    release_after(params, ref_budget)  # what the full-size decodes left, and the reduced refs once done
    pre = precheck(params, seeds, limits, body.prune_plan())
    pre["warnings"][:0] = body.effective(mode).warnings  # refs a preset dropped, first
    return params, seeds, pre



def _result_of(view: dict, retry_after_s: float) -> dict:
    """A finished job's result; a failed or cancelled job raises the error its call answers with."""
    if view["status"] == "succeeded":
        return view["result"]
    if view["status"] == "cancelled":
        raise Conflict(f"job {view['id']} was cancelled (POST /v1/jobs/{view['id']}/cancel) before it finished",
                       field="id")  # fmt: skip
    raise from_body(view.get("error") or {}, retry_after_s)


@serve.deployment(name="Router", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Router:
    def __init__(self, scorer: DeploymentHandle | None, info: AppInfo, jobs: DeploymentHandle):
        self.scorer = scorer  # set when a scorer is configured (pruning needs one); the jobs call it
        self.jobs = jobs  # the Jobs deployment: runs every image request, and owns the store
        self.limits, self.defaults = info.limits, info.defaults
        self.info = info
        self.config = RouterConfig()
        self._ready: tuple[float, bool, dict] | None = None
        self.decode_budget = PixelBudget(self.config.ref_decode_pixels, self.config.ref_decode_wait_s)
        self.admission = Admission(_app_name())  # the queue bound (services/admission.py)

    def reconfigure(self, user_config: dict) -> None:
        self.config = RouterConfig.model_validate(user_config or {})
        self.decode_budget.pixels = self.config.ref_decode_pixels
        self.decode_budget.wait_s = self.config.ref_decode_wait_s

    async def drain(self) -> int:
        """Admit nothing more and wait until the admitted generate requests are done (at most queue, compute and
        scoring deadlines); the seed groups still running when it gives up. Called on stop (services/serve_run.py)."""
        self.admission.closed = True
        c = self.config
        deadline = time.monotonic() + c.queue_timeout_s + c.generate_timeout_s + c.score_timeout_s
        while self.admission.groups and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self.admission.groups

    def ref_budget(self) -> RefBudget:
        """A request's reference-decoding budget (hidream_serve/api/images.py), from the live config."""
        return RefBudget(self.config.ref_pixels_per_request, self.decode_budget, self.config.release_memory_pixels)

    # -- generate -----------------------------------------------------------------------------------
    @app.post("/v1/generate/{mode}", response_model=GenerateResponse, response_model_exclude_none=False,
              responses=ERROR_RESPONSES)  # fmt: skip
    async def generate(self, mode: Mode, body: GenerateRequest, request: Request) -> JSONResponse:
        """A job that the call waits for (services/jobs.py runs it, as every job): validated here, admitted
        against the generator replicas' capacity, then answered with the images inline."""
        rid = request.state.request_id
        t0 = request.state.t0
        job_id, ended = None, False
        try:
            # decoding the refs (base64 + PIL) and the checks are CPU work: off the event loop, in one go
            params, seeds, pre = await asyncio.to_thread(validate, body, mode, self.limits, self.defaults,
                                                         self.ref_budget())  # fmt: skip
            prune = body.prune_plan()
            if prune and self.scorer is None:
                raise InvalidInput("prune", "pruning needs a scorer and this server has none configured")
            t_valid = time.perf_counter() - t0
            del params  # the Jobs replica decodes the refs again from the stored request
            async with self.admission.admit(len(seeds), group_size(self.config, bool(prune)), self.config):
                stored = {**job_routes.stored_request(body, mode, seeds, self.config), "sync": True}
                t_submit = time.perf_counter()
                job_id = (await self.jobs.submit.remote(stored))["id"]
                t_wait = time.perf_counter()
                view = await self._wait_for(job_id)
            ended = True
            result = _result_of(view, self.config.retry_after_s)
            full = body.return_ == "all"
            seeds_out = [c["seed"] for c in result["candidates"]] if full else [result["winner"]["seed"]]
            t_images = time.perf_counter()
            fetched = await asyncio.gather(*(self.jobs.image.remote(job_id, s) for s in seeds_out),
                                           return_exceptions=True)  # fmt: skip
            pngs = {s: png for s, png in zip(seeds_out, fetched) if not isinstance(png, BaseException)}
            if result["winner"]["seed"] not in pngs:  # a candidate with no image comes back without one
                raise fetched[seeds_out.index(result["winner"]["seed"])]
            # the job's trips, for Server-Timing: storing the request, waiting for the job, reading its images
            spans = {"submit": t_wait - t_submit, "wait": t_images - t_wait, "images": time.perf_counter() - t_images,
                     "job": result["timings"]["total"]}  # fmt: skip
        except asyncio.CancelledError:  # the client went away: its job stops too
            if job_id is not None and not ended:
                cancel_soon(self, [job_id])
            raise
        except Exception as e:  # noqa: BLE001 - the one mapping, in hidream_serve.api.errors
            if job_id is not None and not ended:
                cancel_soon(self, [job_id])
            failed = error_response(e, rid, self.config.retry_after_s)
            metrics.request("generate", mode, failed.status_code)
            return failed

        t_encode = time.perf_counter()
        candidates = [
            CandidateOut(seed=c["seed"], score=c["score"], scores=c["scores"],
                         image=b64(pngs[c["seed"]]) if c["seed"] in pngs and full else None, pruned=c["pruned"],
                         pruned_at_step=c["pruned_at_step"], steps_computed=c["steps_computed"],
                         replica=c["replica"])  # fmt: skip
            for c in result["candidates"]
        ]
        winner = result["winner"]
        resp = GenerateResponse(
            id=rid, job_id=job_id, mode=mode, scored=result["scored"],
            winner=Winner(seed=winner["seed"], score=winner["score"], image=b64(pngs[winner["seed"]])),
            candidates=candidates, settings=result["settings"],
            warnings=list(dict.fromkeys(pre["warnings"] + result["warnings"])),
            steps_computed=result["steps_computed"], steps_full=result["steps_full"],
            timings=Timings(**{**result["timings"], "validate": t_valid, "total": time.perf_counter() - t0}),
            debug=Debug.model_validate(result["debug"] or {}),
        )  # fmt: skip
        log.info("request %s %s n=%d job=%s winner=%d total=%.2fs", rid, mode, len(seeds), job_id, winner["seed"],
                 resp.timings.total)  # fmt: skip
        response = JSONResponse(resp.model_dump(mode="json", by_alias=True))
        # what the body cannot carry about itself: the job's trips, building and serialising the body (base64
        # included), and the whole time in the router up to here (ms, https://www.w3.org/TR/server-timing/)
        now = time.perf_counter()
        spans |= {"encode": now - t_encode, "router": now - t0}
        timing = ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in spans.items())
        response.headers["Server-Timing"] = timing
        metrics.request("generate", mode, response.status_code)
        return response

    async def _wait_for(self, job_id: str) -> dict:
        """The job's view once it has ended. The job bounds its own groups (queue and compute deadlines) and its
        scoring; past those and a minute more the call gives up (504). A Jobs replica that is lost meanwhile is
        replaced, resumes the job from the store, and is asked again."""
        c = self.config
        deadline = time.monotonic() + c.queue_timeout_s + c.generate_timeout_s + c.score_timeout_s + 60
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the request took too long")
            try:
                view = await self.jobs.wait.remote(job_id, min(left, 60.0))
            except Exception as e:  # noqa: BLE001 - only a lost Jobs replica is retried
                if not replica_lost(e) and not isinstance(classify(e), Unavailable):
                    raise
                log.warning("job %s: the Jobs replica is not available (%s); asking again", job_id, type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            if view is not None:
                return view

    # -- metadata and probes ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict:
        def recipe(r) -> dict:
            return {"steps": r.steps, "guidance": r.guidance, "shift": r.shift, "scheduler": r.scheduler,
                    "fixed_timesteps": r.timesteps is not None}  # fmt: skip

        return {
            "object": "list",
            "data": [{"id": self.info.model_name, "object": "model", "checkpoint": self.info.model,
                      "owned_by": "hidream-serve"}],  # fmt: skip
            "checkpoint": self.info.model,
            "scorer": self.info.scorers["clip"] if self.info.scorers else None,
            "scorers": self.info.scorers,
            "modes": list(MODES),
            "recipes": {name: recipe(r) for name, r in zip(RECIPES, (FULL, DEV))},
            "schedulers": list(SCHEDULERS),
            "ref_roles": list(ROLES),
            "limits": self.limits.model_dump(),
            "defaults": self.defaults.model_dump(),
            "seeds_per_call": self.config.seeds_per_call,
        }

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        now = time.monotonic()
        if self._ready is None or now - self._ready[0] > self.config.ready_cache_s:
            ready, detail = await asyncio.to_thread(self._check_ready)
            self._ready = (now, ready, detail)
        _, ready, detail = self._ready
        if ready:
            return JSONResponse({"status": "ready", "deployments": detail})
        retry = Unavailable("not ready", retry_after_s=self.config.retry_after_s).headers()
        return JSONResponse({"status": "not_ready", "deployments": detail}, status_code=503, headers=retry)

    def _check_ready(self) -> tuple[bool, dict]:
        """Ready when every model deployment of this application has at least one running replica."""
        try:
            app_name = serve.get_replica_context().app_name
            status = serve.status().applications[app_name]
        except Exception as e:  # noqa: BLE001 - no controller answer means not ready
            return False, {"error": type(e).__name__}
        needed = ["Generator"] + (["Scorer"] if self.scorer is not None else [])
        detail, ready = {}, True
        for name in needed:
            dep = status.deployments.get(name)
            running = 0 if dep is None else sum(n for st, n in dep.replica_states.items() if str(st).endswith("RUNNING"))
            detail[name] = {"running_replicas": running, "status": None if dep is None else str(dep.status.value)}
            ready = ready and running > 0
        return ready, detail

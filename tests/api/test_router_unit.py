"""Router pieces that need no running Ray: readiness from Serve's status, the live config lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request

from hidream_serve.api.errors import install_error_handlers
from hidream_serve.api.protocol import GenerateRequest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

router_mod = pytest.importorskip("services.router")
CHECK_READY = router_mod.Router.func_or_class._check_ready


def patch_serve(monkeypatch, fake):
    # Serve re-creates the ingress class, so its methods carry their own globals: patch those.
    monkeypatch.setitem(CHECK_READY.__globals__, "serve", fake)


def _status(gen_running: int, scorer_running: int | None):
    deps = {"Generator": SimpleNamespace(replica_states={"ReplicaState.RUNNING": gen_running, "STARTING": 1},
                                         status=SimpleNamespace(value="UPDATING"))}  # fmt: skip
    if scorer_running is not None:
        deps["Scorer"] = SimpleNamespace(replica_states={"RUNNING": scorer_running}, status=SimpleNamespace(value="HEALTHY"))
    return SimpleNamespace(applications={"app": SimpleNamespace(deployments=deps)})


@pytest.mark.parametrize(
    "gen, scorer, has_scorer, ready",
    [(0, 1, True, False), (1, 0, True, False), (2, 1, True, True), (1, None, True, False), (1, None, False, True)],
)
def test_ready_only_when_generator_and_scorer_run(monkeypatch, gen, scorer, has_scorer, ready):
    fake = SimpleNamespace(get_replica_context=lambda: SimpleNamespace(app_name="app"),
                           status=lambda: _status(gen, scorer))  # fmt: skip
    patch_serve(monkeypatch, fake)
    ok, detail = CHECK_READY(SimpleNamespace(scorer=object() if has_scorer else None))
    assert ok is ready
    assert detail["Generator"]["running_replicas"] == gen


def test_not_ready_when_the_controller_does_not_answer(monkeypatch):
    def boom():
        raise ConnectionError("no controller")

    patch_serve(monkeypatch, SimpleNamespace(get_replica_context=boom, status=boom))
    ok, detail = CHECK_READY(SimpleNamespace(scorer=None))
    assert not ok and detail == {"error": "ConnectionError"}


def test_config_lookup_outside_a_replica_gives_defaults():
    from services.config import RouterConfig

    assert router_mod._config() == RouterConfig()


# -- validation off the event loop (review item 1) ---------------------------------------------------------

GENERATE = router_mod.Router.func_or_class.generate


def test_decoding_and_checks_run_off_the_event_loop_in_one_thread_call(monkeypatch):
    """to_engine (base64 + PIL decoding of the refs) and precheck must not block the router's event loop."""
    import asyncio
    import json
    import threading

    from hidream_serve.api.protocol import Defaults, Limits
    from hidream_serve.engine.errors import InvalidInput
    from services.config import RouterConfig

    threads = {}
    real_to_engine = GenerateRequest.to_engine

    def to_engine(self, *args, **kwargs):
        threads["to_engine"] = threading.get_ident()
        return real_to_engine(self, *args, **kwargs)

    def precheck(params, seeds, limits, prune=None):
        threads["precheck"] = threading.get_ident()
        raise InvalidInput("prompt", "stop here")

    monkeypatch.setattr(GenerateRequest, "to_engine", to_engine)
    validate = GENERATE.__globals__["validate"]
    monkeypatch.setitem(validate.__globals__, "precheck", precheck)
    router = SimpleNamespace(limits=Limits(), defaults=Defaults(), config=RouterConfig(), scorer=None, generator=None,
                             ref_budget=lambda: None)  # fmt: skip
    request = SimpleNamespace(state=SimpleNamespace(request_id="rid-1", t0=0.0))
    body = GenerateRequest.model_validate({"prompt": "a fox"})

    async def main():
        return threading.get_ident(), await GENERATE(router, "t2i", body, request)

    loop_thread, response = asyncio.run(main())
    assert response.status_code == 422 and json.loads(response.body)["error"]["field"] == "prompt"
    assert threads["to_engine"] != loop_thread and threads["precheck"] == threads["to_engine"]


# -- readiness, routing errors and the body limit over ASGI (no Ray) -----------------------------------------


def test_not_ready_retry_after_rounds_up_like_every_503():
    """/readyz's Retry-After comes from the same ServiceError.headers() as every other 503 (ceil, not int)."""
    import asyncio

    from services.config import RouterConfig

    readyz = router_mod.Router.func_or_class.readyz
    router = SimpleNamespace(_ready=None, config=RouterConfig(retry_after_s=2.2), _check_ready=lambda: (False, {}))
    response = asyncio.run(readyz(router))
    assert response.status_code == 503 and response.headers["retry-after"] == "3"


def _client(app):
    from starlette.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def test_routing_errors_carry_the_request_id():
    r = _client(router_mod.app).get("/v1/nothing", headers={"x-request-id": "rid-404"})
    assert r.status_code == 404
    assert r.json() == {"error": {"type": "not_found", "message": "Not Found", "request_id": "rid-404"}}


def _small_limit(monkeypatch, limit=4096):
    from services.config import RouterConfig

    monkeypatch.setattr(router_mod, "_config", lambda: RouterConfig(max_body_bytes=limit))


def test_chunked_upload_without_content_length_is_held_to_the_body_limit(monkeypatch):
    """A chunked body has no Content-Length: the limit is enforced on the bytes received."""
    _small_limit(monkeypatch)

    def chunks():
        for _ in range(10):
            yield b"A" * 1000

    r = _client(router_mod.app).post("/v1/generate/t2i", content=chunks(), headers={"x-request-id": "rid-big"})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"type": "payload_too_large", "field": "body", "request_id": "rid-big",
                                 "message": "request body is more than 4096 bytes"}  # fmt: skip
    r = _client(router_mod.app).post("/v1/generate/t2i", content=b"A" * 5000)  # with Content-Length, as before
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_a_body_under_the_limit_reaches_the_app_whole(monkeypatch):
    import json

    _small_limit(monkeypatch)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(router_mod._Ingress)

    @app.post("/echo")
    async def echo(body: dict, request: Request):
        return {"keys": sorted(body), "size": len(json.dumps(body)), "rid": request.state.request_id}

    payload = json.dumps({"prompt": "x" * 3000, "n": 2}).encode()

    def chunks():
        for i in range(0, len(payload), 700):
            yield payload[i : i + 700]

    r = _client(app).post("/echo", content=chunks(), headers={"content-type": "application/json",
                                                              "x-request-id": "rid-ok"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == {"keys": ["n", "prompt"], "size": len(payload), "rid": "rid-ok"}


def test_malformed_json_names_the_body_not_a_character_position():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/g")
    async def g(body: GenerateRequest):
        return {}

    r = _client(app).post("/g", content=b'{"prompt": x}', headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "body" and err["type"] == "invalid_input"
    assert "not valid JSON" in err["message"] and "11" in err["message"], err


def test_models_lists_the_protocol_roles():
    import asyncio
    import typing

    from hidream_serve.api.protocol import Defaults, Limits, Role
    from services.config import RouterConfig

    models = router_mod.Router.func_or_class.models
    from services.messages import AppInfo

    info = AppInfo(model="m", model_name="m", scorers=None, limits=Limits(), defaults=Defaults())
    router = SimpleNamespace(info=info, limits=Limits(), defaults=Defaults(), config=RouterConfig())
    d = asyncio.run(models(router))
    assert d["ref_roles"] == list(typing.get_args(Role))

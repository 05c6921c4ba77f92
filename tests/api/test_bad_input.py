"""Bad and ignored input over HTTP on the ingress app (issue 14, items 2, 7, 8, 9), without Ray: the router's
FastAPI app through a TestClient, with a fake replica standing in for the deployment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hidream_serve.api.protocol import Defaults, ErrorResponse, GenerateRequest, Limits
from hidream_serve.api.request_id import RequestIds
from hidream_serve.engine.errors import InvalidInput
from tests._images import b64, noise_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

router_mod = pytest.importorskip("services.router")
LIMITS = Limits(max_n=8, max_steps=50, max_prompt_chars=300, max_refs=6)


@pytest.fixture
def client(monkeypatch):
    """The ingress app as a replica with LIMITS would serve it (FastAPI asks the replica for `self`)."""
    import ray.serve
    from starlette.testclient import TestClient

    from services.config import RouterConfig

    replica = SimpleNamespace(limits=LIMITS, defaults=Defaults(), config=RouterConfig(), scorer=None, generator=None)
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))
    return TestClient(router_mod.app, raise_server_exceptions=False)


def post(client, body: bytes, content_type: str | None = "application/json", **headers):
    if content_type:
        headers["content-type"] = content_type
    return client.post("/v1/generate/t2i", content=body, headers=headers)


def field_error(r, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    return ErrorResponse.model_validate(r.json()).error.model_dump()  # the declared error shape


# -- item 2: bodies that cannot be read as JSON --------------------------------------------------------------


@pytest.mark.parametrize(
    "body, why",
    [
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),  # Latin-1, not UTF-8
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"prompt": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, "nested too deeply"),
    ],
)
def test_an_unreadable_body_is_a_422_naming_the_body(client, body, why):
    err = field_error(post(client, body))
    assert err["type"] == "invalid_input" and err["field"] == "body" and why in err["message"], err
    assert err["request_id"]


def test_a_body_that_is_not_declared_json_says_so(client):
    err = field_error(post(client, b'{"prompt": "a fox"}', content_type="text/plain"))
    assert err["field"] == "body" and "Content-Type: application/json" in err["message"], err


# -- item 9: control characters in text that reaches the model and the PNG's text chunks ---------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "a fox\x00<script>"}, "prompt"),
        ({"prompt": "a fox \x1b[31m"}, "prompt"),
        ({"prompt": "a fox\x85"}, "prompt"),
        ({"prompt": "a fox", "layout_boxes": [{"bbox": [0, 1, 0, 1], "text": "x\x00"}]}, "layout_boxes[0].text"),
    ],
)
def test_control_characters_are_a_422_naming_the_field(client, body, field):
    err = field_error(client.post("/v1/generate/t2i", json=body))
    assert err["field"] == field and "control character" in err["message"], err


def test_tabs_newlines_and_non_ascii_text_are_accepted():
    prompt = "a fox\n\tin the snow, «ünïcødé» 狐狸 🦊\r\n"
    assert GenerateRequest.model_validate({"prompt": prompt}).prompt == prompt


# -- item 9: x-request-id --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", [b"a" * 5000, b"two words", b"id\xe9", b"a\x00"])
def test_a_malformed_request_id_is_a_422_naming_the_header(client, rid):
    err = field_error(client.get("/healthz", headers=[(b"x-request-id", rid)]))
    assert err["field"] == "x-request-id", err
    assert err["request_id"] != rid.decode("latin-1") and len(err["request_id"]) <= 128


def test_a_plain_request_id_is_kept_and_a_reused_one_made_unique(client):
    first = field_error(client.get("/v1/nothing", headers={"x-request-id": "trace-1.a:b_c"}), 404)
    again = field_error(client.get("/v1/nothing", headers={"x-request-id": "trace-1.a:b_c"}), 404)
    assert first["request_id"] == "trace-1.a:b_c"
    assert again["request_id"].startswith("trace-1.a:b_c.") and again["request_id"] != first["request_id"]


def test_request_ids_remember_a_bounded_number():
    ids = RequestIds(remember=3)
    assert [ids.assign(r) for r in ("a", "b", "c")] == ["a", "b", "c"]
    assert ids.assign("a") != "a"  # still remembered
    for r in ("d", "e", "f", "g"):
        ids.assign(r)
    assert ids.assign("a") == "a" and len(ids._recent) == 3  # forgotten, so usable again
    assert len({ids.assign(None) for _ in range(5)} | {ids.assign("") for _ in range(5)}) == 10


# -- item 8: the server's limits, in the schema and in the messages ------------------------------------------


def test_openapi_states_the_configured_limits(client):
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]

    def bound(name, keyword):
        p = props[name]
        return next(v[keyword] for v in p.get("anyOf", [p]) if keyword in v)

    assert bound("n", "maximum") == LIMITS.max_n
    assert bound("seeds", "maxItems") == LIMITS.max_n
    assert bound("steps", "maximum") == LIMITS.max_steps
    assert bound("prompt", "maxLength") == LIMITS.max_prompt_chars
    assert bound("refs", "maxItems") == LIMITS.max_refs
    error = schema["paths"]["/v1/generate/{mode}"]["post"]["responses"]
    assert all(error[str(s)]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
               for s in (413, 422, 500, 503, 504))  # fmt: skip


@pytest.mark.parametrize(
    "body, field, limit",
    [
        ({"prompt": "a", "n": 10000}, "n", LIMITS.max_n),
        ({"prompt": "a", "steps": 500}, "steps", LIMITS.max_steps),
        ({"prompt": "a" * 20001}, "prompt", LIMITS.max_prompt_chars),
        ({"prompt": "a", "seeds": list(range(300))}, "seeds", LIMITS.max_n),
    ],
)
def test_past_the_protocol_bound_the_message_quotes_the_servers_limit(client, body, field, limit):
    err = field_error(client.post("/v1/generate/t2i", json=body))
    assert err["field"] == field and f"at most {limit} (this server's limit)" in err["message"], err


def test_a_snapped_size_over_the_limit_quotes_the_size_asked_for():
    from hidream_serve.api.checks import precheck

    limits = Limits(max_pixels=1024 * 1024)
    body = GenerateRequest.model_validate({"prompt": "a", "width": 512, "height": 512})
    params, seeds = body.to_engine("t2i", limits)
    with pytest.raises(InvalidInput) as e:
        precheck(params, seeds, limits)
    assert e.value.field == "width" and e.value.message.startswith("512x512 snaps to the trained size 2048x2048")
    assert "exact_size" in e.value.message


# -- item 7: input that has no effect gets a warning -----------------------------------------------------------

VALIDATE = router_mod.validate


def warnings_for(mode: str, body: dict) -> list[str]:
    """The warnings the router's validation gives this request (they lead the response's `warnings`)."""
    body = {"prompt": "a fox", "width": 256, "height": 256, "exact_size": True, "steps": 2, **body}
    _, _, pre = VALIDATE(GenerateRequest.model_validate(body), mode, Limits(), Defaults())
    return pre["warnings"]


def refs(n: int) -> list[dict]:
    return [{"image": b64(noise_image(40, 32, seed=i))} for i in range(n)]


def box(i: int, size: float = 0.2) -> list[float]:
    x = 0.1 * i
    return [x, x + size, 0.1, 0.1 + size]


def test_a_layout_that_draws_everything_it_is_given_has_no_warnings():
    assert warnings_for("layout", {"refs": refs(2), "layout_boxes": [box(0), box(1)]}) == []


def test_layout_box_text_is_not_drawn():
    boxes = [box(0), {"bbox": box(1), "text": "a red hat"}, {"bbox": box(2), "text": "SALE"}]
    (w,) = warnings_for("layout", {"refs": refs(3), "layout_boxes": boxes})
    assert w.startswith("layout_boxes[1].text, layout_boxes[2].text not used"), w


def test_boxes_beyond_the_five_largest_are_named():
    sizes = [0.3, 0.05, 0.3, 0.3, 0.04, 0.3, 0.3]  # boxes 1 and 4 are the smallest
    boxes = [box(i, s) for i, s in enumerate(sizes)]
    ws = warnings_for("layout", {"refs": refs(7), "layout_boxes": boxes})
    assert any(w.startswith("layout_boxes[1], layout_boxes[4] not drawn: only the 5 largest") for w in ws), ws
    assert any(w.startswith("refs[1], refs[4]: no drawn box") for w in ws), ws  # their boxes are the undrawn ones


def test_more_refs_than_boxes_and_more_boxes_than_refs():
    (w,) = warnings_for("layout", {"refs": refs(3), "layout_boxes": [box(0)]})
    assert w.startswith("refs[1], refs[2]: no drawn box"), w
    (w,) = warnings_for("layout", {"refs": refs(1), "layout_boxes": [box(0), box(1), box(2)]})
    assert w.startswith("layout_boxes[1], layout_boxes[2]: no reference image"), w


def test_shift_under_the_dev_recipes_fixed_timesteps():
    assert any("shift is not used" in w for w in warnings_for("t2i", {"recipe": "dev", "steps": 28, "shift": 100.0}))
    assert warnings_for("t2i", {"recipe": "dev", "steps": 28}) == []  # no shift asked for: nothing to say
    ws = warnings_for("t2i", {"recipe": "dev", "steps": 10, "shift": 2.0})  # spaced by the scheduler: shift acts
    assert not any("shift" in w for w in ws), ws


def test_guidance_below_one_acts_as_none():
    assert any("guidance below 1" in w for w in warnings_for("t2i", {"guidance": 0.5}))
    assert warnings_for("t2i", {"guidance": 0.0}) == warnings_for("t2i", {"guidance": 3.0}) == []


def test_prune_with_a_single_candidate():
    prune = {"at": 0.5, "keep": 0.5}
    assert any("prune has no effect" in w for w in warnings_for("t2i", {"n": 1, "prune": prune}))
    assert warnings_for("t2i", {"n": 4, "prune": prune}) == []


# -- references too small for one patch at their edge: a 422 naming the field before anything runs ---------------


def validation_error(mode: str, body: dict) -> InvalidInput:
    body = {"prompt": "a fox", "steps": 2, "exact_size": True, **body}
    with pytest.raises(InvalidInput) as e:
        VALIDATE(GenerateRequest.model_validate(body), mode, Limits(), Defaults())
    return e.value


def test_a_layout_too_small_for_its_references_names_width():
    # 64x64 with four refs and boxes: five references share the sequence (the picture of the boxes is one),
    # each at an edge of 24 px, under one patch
    e = validation_error("layout", {"width": 64, "height": 64, "refs": refs(4), "layout_boxes": [box(0), box(1)]})
    assert e.field == "refs[0].image" and "less than one 32-pixel patch" in e.message, e.message
    assert "5 references (the layout picture counts as one)" in e.message and "edge of 24 px" in e.message


def test_an_elongated_reference_names_its_index():
    thin = {"image": b64(noise_image(160, 10, seed=3))}  # 16:1, at an edge of 96 px: 384x24, no whole patch high
    e = validation_error("ip", {"width": 128, "height": 128, "refs": [refs(1)[0], thin]})
    assert e.field == "refs[1].image" and "a 160x10 image" in e.message, e.message


def test_the_smallest_layout_that_fits_is_accepted():
    assert warnings_for("layout", {"width": 64, "height": 64, "refs": refs(1), "layout_boxes": [box(0, 0.5)]}) == []

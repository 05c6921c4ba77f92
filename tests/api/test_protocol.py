"""Request model, conversion to engine params, the model-free precheck, and the error mapping (no Ray)."""

from __future__ import annotations

import json
import pickle

import pytest
from tests._images import b64, noise_image, solid_image
from pydantic import ValidationError

from hidream_serve.api.checks import precheck
from hidream_serve.api.errors import (
    BadRequest,
    Internal,
    ServiceError,
    Unavailable,
    classify,
    error_response,
    format_loc,
    validation_error,
)  # fmt: skip
from hidream_serve.api.protocol import RANDOM_SEED_BOUND, Defaults, GenerateRequest, Limits
from hidream_serve.engine.errors import CheckpointError, InvalidInput, Overloaded
from hidream_serve.engine.params import GenerationParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

LIMITS = Limits(max_n=8, max_steps=20, max_pixels=512 * 512, max_refs=4, max_image_bytes=200_000,
                max_image_pixels=1_000_000, max_prompt_chars=100)  # fmt: skip
SMALL = {"width": 128, "height": 128, "exact_size": True, "steps": 2}


def ref(seed=0, w=48, h=40, role=None):
    d = {"image": b64(noise_image(w, h, seed))}
    if role:
        d["role"] = role
    return d


def convert(mode, body, limits=LIMITS, defaults=None):
    req = GenerateRequest.model_validate(body)
    params, seeds = req.to_engine(mode, limits, defaults)
    precheck(params, seeds, limits)
    return params, seeds


def field_of(mode, body, limits=LIMITS) -> str:
    """The field named by the first error this body raises, at whichever layer catches it."""
    try:
        convert(mode, body, limits)
    except ValidationError as e:
        return validation_error(e.errors()).field
    except InvalidInput as e:
        return e.field
    raise AssertionError("no error raised")


# -- conversion ------------------------------------------------------------------------------------


def test_t2i_converts_with_defaults_and_seed_run():
    params, seeds = convert("t2i", {"prompt": "a fox", "seed": 5, "n": 3, **SMALL, "guidance": 3.5, "return": "all"})
    assert isinstance(params, GenerationParams) and params.mode == "t2i" and params.prompt == "a fox"
    assert seeds == [5, 6, 7]
    assert (params.width, params.height, params.exact_size, params.steps, params.guidance) == (128, 128, True, 2, 3.5)
    assert params.recipe == "full" and params.scheduler is None and params.refs == []


def test_server_defaults_fill_unset_fields():
    d = Defaults(recipe="dev", width=256, height=192, exact_size=True, steps=3, n=2)
    req = GenerateRequest.model_validate({"prompt": "x"})
    params, seeds = req.to_engine("t2i", LIMITS, d)
    assert (params.recipe, params.width, params.height, params.exact_size, params.steps) == ("dev", 256, 192, True, 3)
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < RANDOM_SEED_BOUND


def test_explicit_seeds_and_matching_n():
    _, seeds = convert("t2i", {"prompt": "x", "seeds": [9, 3, 40], "n": 3, **SMALL})
    assert seeds == [9, 3, 40]


def test_refs_roles_and_layout_boxes_reach_the_engine():
    body = {"prompt": "two cats", "refs": [ref(1, role="subject"), ref(2)], **SMALL,
            "layout_boxes": [[0.0, 0.5, 0.1, 0.9], {"bbox": [0.5, 1.0, 0.1, 0.9], "text": "cat two"}]}  # fmt: skip
    params, _ = convert("layout", body)
    assert [r.size for r in params.refs] == [(48, 40), (48, 40)] and params.ref_roles == ["subject", None]
    assert params.layout_boxes == [[0.0, 0.5, 0.1, 0.9], {"bbox": [0.5, 1.0, 0.1, 0.9], "text": "cat two"}]


def test_every_mode_converts():
    cases = {"t2i": [], "edit": [ref()], "ip": [ref(1, role="face")], "skeleton": [ref(1), ref(2, role="pose")],
             "layout": [ref()]}  # fmt: skip
    for mode, refs in cases.items():
        body = {"prompt": "p", "refs": refs, **SMALL}
        if mode == "layout":
            body["layout_boxes"] = [[0.1, 0.9, 0.1, 0.9]]
        params, _ = convert(mode, body)
        assert params.mode == mode and len(params.refs) == len(refs)


def test_precheck_reports_effective_size_and_snapping_warning():
    req = GenerateRequest.model_validate({"prompt": "x", "width": 300, "height": 200})
    params, seeds = req.to_engine("t2i", Limits())
    pre = precheck(params, seeds, Limits())
    assert (pre["width"], pre["height"]) == (2496, 1664) and any("snapped" in w for w in pre["warnings"])


# -- validation: every rule names its field ---------------------------------------------------------------

RULES = [
    ("t2i", {"prompt": "x", "colour": "red"}, "colour"),
    ("t2i", {"prompt": "x", "n": 0}, "n"),
    ("t2i", {"prompt": "x", "n": 9}, "n"),
    ("t2i", {"prompt": "x", "n": 1000}, "n"),
    ("t2i", {"prompt": "x", "n": "4"}, "n"),
    ("t2i", {"prompt": "x", "steps": 0}, "steps"),
    ("t2i", {"prompt": "x", "steps": 21}, "steps"),
    ("t2i", {"prompt": "x", "steps": 201}, "steps"),
    ("t2i", {"prompt": "x", "recipe": "full"}, "recipe"),  # recipe's 50 steps exceed this server's 20
    ("t2i", {"prompt": "x", "recipe": "turbo"}, "recipe"),
    ("t2i", {"prompt": "x", "scheduler": "ddim"}, "scheduler"),
    ("t2i", {"prompt": "x", "guidance": 31}, "guidance"),
    ("t2i", {"prompt": "x", "shift": 0}, "shift"),
    ("t2i", {"prompt": "x", "seed": 1, "seeds": [1, 2]}, "seeds"),
    ("t2i", {"prompt": "x", "seeds": [1, 2], "n": 3}, "n"),
    ("t2i", {"prompt": "x", "seeds": [1, 1]}, "seeds"),
    ("t2i", {"prompt": "x", "seeds": []}, "seeds"),
    ("t2i", {"prompt": "x", "seeds": [1, -2]}, "seeds[1]"),
    ("t2i", {"prompt": "x", "seeds": list(range(9))}, "seeds"),
    ("t2i", {"prompt": "x", "seed": -1}, "seed"),
    ("t2i", {"prompt": "x", "seed": 2**63 - 2, "n": 2}, "seed"),
    ("t2i", {"prompt": "x", "return": "best"}, "return"),
    ("t2i", {"prompt": ""}, "prompt"),
    ("t2i", {"prompt": "x" * 101}, "prompt"),
    ("t2i", {"prompt": "x", "refs": [ref()]}, "refs"),
    ("t2i", {"prompt": "x", "width": 100, "height": 128, "exact_size": True, "steps": 2}, "width"),
    ("t2i", {"prompt": "x", "width": 1024, "height": 1024, "exact_size": True, "steps": 2}, "width"),
    ("t2i", {"prompt": "x", "width": 32}, "width"),
    ("t2i", {"prompt": "x", "prune": [{"at": 0.5, "keep": 0.5}, {"at": 0.5, "keep": 0.2}]}, "prune"),
    ("t2i", {"prompt": "x", "prune": {"at": 1.5, "keep": 0.5}}, "prune[0].at"),
    ("edit", {"prompt": "x"}, "refs"),
    ("edit", {"prompt": "x", "refs": [ref(1), ref(2)]}, "refs"),
    ("edit", {"prompt": "x", "refs": [{"image": "%%%"}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": b64(solid_image(2000, 600))}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": b64(noise_image(300, 300))}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"image": b64(solid_image(340, 20))}]}, "refs[0].image"),
    ("edit", {"prompt": "x", "refs": [{"path": "/etc/passwd"}]}, "refs[0].image"),
    ("ip", {"prompt": "x", "refs": [{"image": "aaaa", "role": "hat"}]}, "refs[0].role"),
    ("ip", {"prompt": "x", "refs": [ref()] * 5}, "refs"),
    ("skeleton", {"prompt": "x", "refs": [ref()]}, "refs"),
    ("layout", {"prompt": "x", "refs": [ref()]}, "layout_boxes"),
    ("layout", {"prompt": "x", "refs": [ref()], "layout_boxes": [[0.6, 0.2, 0.0, 1.0]]}, "layout_boxes[0]"),
    ("layout", {"prompt": "x", "refs": [ref()], "layout_boxes": [[0.1, 0.2, 0.3, 0.4], [0.0, 1.5, 0.0, 1.0]]},
     "layout_boxes[1]"),
    ("layout", {"prompt": "x", "refs": [ref()], "layout_boxes": [[0.1, 0.2, 0.3]]}, "layout_boxes[0].bbox"),
    ("layout", {"prompt": "x", "refs": [ref()], "layout_boxes": [[0.1, 0.1001, 0.3, 0.4]], **SMALL},
     "layout_boxes[0]"),  # empty at 128 px
    ("ip", {"prompt": "x", "refs": [ref()], "layout_boxes": [[0.1, 0.2, 0.3, 0.4]]}, "layout_boxes"),
    ("ip", {"prompt": "x", "refs": [ref(), ref()], "keep_original_aspect": True}, "keep_original_aspect"),
    # the engine then outputs about KEEP_ASPECT_EDGE**2 = 2048**2 pixels, whatever width/height say
    ("edit", {"prompt": "x", "refs": [ref()], "keep_original_aspect": True}, "keep_original_aspect"),
]  # fmt: skip


@pytest.mark.parametrize("mode, body, field", RULES, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(RULES)])
def test_validation_rule_names_the_field(mode, body, field):
    body = {**SMALL, **body} if "width" not in body and "recipe" not in body and "steps" not in body else body
    assert field_of(mode, body) == field


def test_prune_plan_is_sorted_and_accepts_one_stage_or_a_list():
    one = GenerateRequest.model_validate({"prompt": "x", "prune": {"at": 0.5, "keep": 0.5}})
    assert one.prune_plan().stages == ((0.5, 0.5),)
    two = GenerateRequest.model_validate({"prompt": "x", "prune": [{"at": 0.7, "keep": 0.5}, {"at": 0.3, "keep": 0.8}]})
    assert [at for at, _ in two.prune_plan().stages] == [0.3, 0.7]
    assert GenerateRequest.model_validate({"prompt": "x"}).prune_plan() is None


def test_unknown_mode_is_invalid_input():
    req = GenerateRequest.model_validate({"prompt": "x"})
    with pytest.raises(InvalidInput) as e:
        req.to_engine("paint", LIMITS)
    assert e.value.field == "mode"


# -- errors ----------------------------------------------------------------------------------------------


def test_format_loc():
    assert format_loc(("body", "refs", 0, "image")) == "refs[0].image"
    assert format_loc(("path", "mode")) == "mode"
    assert format_loc(("body",)) == "body"
    assert format_loc(("body", "layout_boxes", 1, "bbox", 2)) == "layout_boxes[1].bbox[2]"


def test_classify_maps_engine_errors():
    assert classify(InvalidInput("refs[2]", "bad")).status == 422
    assert classify(InvalidInput("refs[2]", "bad")).field == "refs[2]"
    assert classify(Overloaded("busy")).status == 503
    assert isinstance(classify(CheckpointError("/secret/path missing")), Internal)
    assert classify(TimeoutError()).status == 504
    leaked = classify(RuntimeError("/home/secret/token=abc"))
    assert leaked.status == 500 and "secret" not in leaked.message


def test_service_errors_pickle_by_value():
    for err in (BadRequest("m", field="refs[1].image"), Unavailable("busy", retry_after_s=7)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.field == err.field and back.retry_after_s == err.retry_after_s


def test_ray_wrappers_are_unwrapped():
    ray_exc = pytest.importorskip("ray.exceptions")
    serve_exc = pytest.importorskip("ray.serve.exceptions")
    wrapped = ray_exc.RayTaskError("generate", "tb", BadRequest("nope", field="refs[0]"))
    assert classify(wrapped).field == "refs[0]" and classify(wrapped).status == 422
    bp = classify(serve_exc.BackPressureError(num_queued_requests=5, max_queued_requests=5))
    assert bp.status == 503 and bp.headers()["Retry-After"] == "5"


def test_error_response_shape():
    r = error_response(InvalidInput("refs[0].image", "cannot decode"), "rid-1")
    assert r.status_code == 422
    assert json.loads(r.body) == {"error": {"type": "invalid_input", "message": "cannot decode",
                                            "field": "refs[0].image", "request_id": "rid-1"}}  # fmt: skip
    r = error_response(Unavailable("busy", retry_after_s=2.2))
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    r = error_response(KeyError("internal detail"))
    assert r.status_code == 500 and "internal detail" not in r.body.decode()


def test_service_error_is_its_own_class():
    assert issubclass(BadRequest, ServiceError) and BadRequest.status == 422


# -- keep_original_aspect against max_pixels (review item 4) ------------------------------------------------


@pytest.mark.parametrize("size", [(48, 40), (40, 48), (1000, 1000), (3000, 200), (4096, 4096), (9000, 4500),
                                  (5000, 7001), (2047, 2049), (333, 4321)])  # fmt: skip
def test_keep_aspect_size_is_the_engines_output_size(size):
    from PIL import Image

    from hidream_serve.engine.sizing import fit_to_area, keep_aspect_size
    from hidream_serve.vocabulary import KEEP_ASPECT_EDGE

    assert keep_aspect_size(*size) == fit_to_area(Image.new("RGB", size), KEEP_ASPECT_EDGE).size


def test_keep_original_aspect_is_checked_against_max_pixels():
    body = {"prompt": "x", "refs": [ref(1, w=64, h=48)], "keep_original_aspect": True, "steps": 2}
    params, seeds = GenerateRequest.model_validate(body).to_engine("edit", Limits())
    pre = precheck(params, seeds, Limits())  # the default limit allows it, and the size is known up front
    assert (pre["width"], pre["height"]) == (2336, 1760)
    with pytest.raises(InvalidInput) as e:
        precheck(params, seeds, Limits(max_pixels=2336 * 1760 - 1))
    assert e.value.field == "keep_original_aspect" and "2336x1760" in e.value.message


# -- malformed JSON and parse-time prune checks (review items 5, 8) ----------------------------------------


def test_malformed_json_is_named_body_with_the_position_in_the_message():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 11), "msg": "JSON decode error", "input": {},
                             "ctx": {"error": "Expecting value"}}])  # fmt: skip
    assert err.field == "body" and "character 11" in err.message and "Expecting value" in err.message


def test_prune_stages_are_checked_when_the_request_is_parsed():
    with pytest.raises(ValidationError) as e:
        GenerateRequest.model_validate({"prompt": "x", "prune": [{"at": 0.5, "keep": 0.5}, {"at": 0.5, "keep": 0.2}]})
    err = validation_error(e.value.errors())
    assert err.field == "prune" and err.message == "two stages at the same step fraction"


def test_routing_http_errors_share_the_error_shape():
    from hidream_serve.api.errors import HTTPError

    r = error_response(HTTPError("Method Not Allowed", 405, {"Allow": "POST"}), "rid-2")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert json.loads(r.body) == {"error": {"type": "method_not_allowed", "message": "Method Not Allowed",
                                            "request_id": "rid-2"}}  # fmt: skip
    back = pickle.loads(pickle.dumps(HTTPError("Not Found", 404)))
    assert back.status == 404 and back.type == "not_found"
    assert Internal("x").status == 500 and Internal("x").type == "internal_error"

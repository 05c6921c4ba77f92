"""Shape of the application: what the ingress imports, the error schema, and config rules checked at build."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve


def test_the_ingress_imports_neither_torch_nor_transformers():
    code = "import sys, services.router; print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_error_status_of_generate_is_the_declared_error_body():
    from services.router import app

    schema = app.openapi()
    responses = schema["paths"]["/v1/generate/{mode}"]["post"]["responses"]
    for status in ("413", "422", "503", "504"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), (status, ref)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    detail = schema["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"type", "message", "field"} <= set(detail)


@pytest.mark.parametrize("args, keys", [
    ({"router": {"prune_group_size": 1}}, ["router.prune_group_size"]),
    ({"router": {"seeds_per_call": 8}, "generator": {"max_batch": 4}}, ["router.seeds_per_call", "generator.max_batch"]),
    ({"router": {"prune_group_size": 6}, "generator": {"max_batch": 4}}, ["router.prune_group_size", "generator.max_batch"]),
])  # fmt: skip
def test_a_config_under_which_pruning_cannot_rank_is_refused_at_build(args, keys):
    from pydantic import ValidationError

    from services.app import AppArgs

    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(args)
    assert all(k in str(e.value) for k in keys), str(e.value)
    AppArgs.model_validate({"router": {"seeds_per_call": 4, "prune_group_size": 4}, "generator": {"max_batch": 4}})

"""Fuzz the real service from its own OpenAPI schema (schemathesis): no request may get a 5xx, and every answer
must match the schema. The service runs in-process on the embedded tiny models with small limits, so the
requests the fuzzer gets accepted stay cheap (64x64, at most 2 steps, best-of-2)."""

from __future__ import annotations

from collections import Counter

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("ray")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LIMITS = {"max_n": 2, "max_steps": 2, "max_pixels": 128 * 128, "max_refs": 2, "max_image_bytes": 20_000,
          "max_image_pixels": 256 * 256, "max_prompt_chars": 200}  # fmt: skip
DEFAULTS = {"width": 64, "height": 64, "exact_size": True, "steps": 2}
OPTIONS = cpu_options({"num_replicas": 1, "max_ongoing_requests": 1})
EXAMPLES_PER_OPERATION = 25  # per operation and mode (valid, invalid): a few hundred cases in all


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "prune_group_size": 2, "generate_timeout_s": 60, "score_timeout_s": 30,
                "retry_after_s": 1},
        defaults=DEFAULTS, generator={"max_batch": 2}, limits=LIMITS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, monkeypatch_module):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS) as client:
        wait_ready(client)
        raw = client.get("/openapi.json").json()
        loaded = schemathesis.openapi.from_dict(raw)
        loaded.config.update(base_url=str(client.base_url).rstrip("/"))
        yield loaded


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield mp


def servable_t2i(case) -> None:
    """Make a generated text-to-image body one the engine can run: which refs and boxes a mode needs is a rule the
    schema cannot state, so most fuzzed bodies stop at that 422 and never reach a generator."""
    if isinstance(case.body, dict):
        for field in ("refs", "layout_boxes", "keep_original_aspect"):
            case.body.pop(field, None)
        if not (isinstance(case.body.get("prompt"), str) and case.body["prompt"].strip()):
            case.body["prompt"] = "a red fox"
        if case.operation.label == "POST /v1/jobs":
            case.body["mode"] = "t2i"


def fuzz_operation(operation, mode, base_url: str, statuses: Counter, prepare=None) -> tuple[int, list[str]]:
    """Run the operation's Hypothesis cases in one generation mode: (cases sent, failure descriptions);
    `statuses` counts the answers by operation and status code; `prepare` may adjust each case first."""
    sent, failures = 0, []
    fixed = {"path_parameters": {"mode": "t2i"}} if prepare and "{mode}" in operation.path else {}

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # fmt: skip
    def run(case):
        nonlocal sent
        sent += 1
        if prepare:
            prepare(case)
        try:
            response = case.call(base_url=base_url, timeout=60)
            statuses[(operation.label, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        except Exception as e:  # noqa: BLE001 - a check failed: keep going, report them all
            failures.append(f"{operation.label} [{mode.value}]: {str(e)[:1500]}")

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE or sent:
            raise  # an operation without inputs has no invalid data: only then is there nothing to send
    return sent, failures


def test_no_server_error_and_schema_conformance(api_schema):
    base_url = api_schema.get_base_url()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    sent, failures, statuses = 0, [], Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n, found = fuzz_operation(operation, mode, base_url, statuses)
            sent, failures = sent + n, failures + found
    for operation in (op for op in operations if op.label in ("POST /v1/generate/{mode}", "POST /v1/jobs")):
        n, found = fuzz_operation(operation, GenerationMode.POSITIVE, base_url, statuses, prepare=servable_t2i)
        sent, failures = sent + n, failures + found
    print(f"{sent} cases:", dict(sorted(statuses.items())))
    assert sent >= 200, sent
    generated = sum(n for (label, status), n in statuses.items() if label.startswith("POST /v1/generate") and status == 200)
    accepted_jobs = statuses[("POST /v1/jobs", 202)]
    assert generated >= 3 and accepted_jobs >= 3, "too few valid requests: the fuzzer only exercised the error paths"
    assert not failures, f"{len(failures)} of {sent} cases failed:\n" + "\n\n".join(failures[:20])


def serve_forever(port: int) -> None:
    """The same service on a fixed port until Ctrl-C or SIGTERM, for a long `st run` (docs/reliability.md)."""
    import signal
    import tempfile
    import time
    from unittest import mock

    with tempfile.TemporaryDirectory() as cache, mock.patch("tests._serve.free_port", return_value=port):
        with running_service(cache, service_args(), OPTIONS) as client:
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # after ray.init, which sets its own
            wait_ready(client)
            print(f"ready: http://127.0.0.1:{port}/openapi.json", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    import sys

    serve_forever(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)

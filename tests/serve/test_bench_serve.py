"""bench/bench_serve.py end to end on the CPU: the tiny embedded models, Serve started for real, HTTP requests.

One run in a subprocess (its own Ray) at 128x128 and 2 steps with an empty assets directory (the refs are then
generated), ~40 s on 2 cores; the report it writes is checked against what the service measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import CASES, OVERHEADS, app_config, parse_args, server_timing  # noqa: E402

pytestmark = [pytest.mark.slow]


def test_server_timing_header_parses_to_seconds():
    assert server_timing("encode;dur=12.5, router;dur=1500") == {"encode": 0.0125, "router": 1.5}
    assert server_timing(None) == {} and server_timing("cache;desc=hit") == {}


def test_the_gpu_configuration_is_a_valid_app():
    """What the H200 run builds (no GPU needed to check it): scorer and generators share the first GPU."""
    from services.app import AppArgs, scorer_specs

    app, options = app_config(parse_args(["--gpus", "2"]))
    args = AppArgs.model_validate(app)
    assert args.model == "random:full-size" and args.engine.compile and args.engine.warm_up_size == 2048
    assert set(scorer_specs(args, args.model).values()) == {"random:full-size", None}
    gen, sc = options["Generator"], options["Scorer"]
    assert gen["num_replicas"] == 2 and gen["ray_actor_options"]["num_gpus"] + sc["ray_actor_options"]["num_gpus"] == 1
    assert args.router.seeds_per_call == 2 and args.limits.max_pixels >= 2048 * 2048


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out, assets = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("no-assets")
    cmd = [sys.executable, "bench/bench_serve.py", "--model", "tiny", "--device", "cpu", "--size", "128",
           "--steps", "2", "--warm-up-steps", "1", "--assets", str(assets), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "serve-cpu.md").read_text()
    return json.loads((out / "serve-cpu.json").read_text()), md


def test_every_case_is_measured_and_reported(report):
    rep, md = report
    assert list(rep["cases"]) == list(CASES) and not rep["failed"]
    assert "bench/bench_serve.py --model tiny" in rep["command"] and rep["command"] in md
    for name in CASES:
        assert f"| {name} |" in md
    # no assets there: every ref was generated, and said so
    assert len(rep["assets_generated"]) == 7 and "IP_skeleton/0.face.jpg" in rep["assets_generated"]
    probe = rep["scorer_probe"]  # the scorers alone after Serve stopped: 4 images scored, timed
    assert probe["images"] == 4 and 0 < probe["score_s"] == min(probe["score_s_all"]) and not probe["unavailable"]


def test_the_wall_time_is_split_into_engine_and_measured_overheads(report):
    rep, _ = report
    for name, case in rep["cases"].items():
        over = case["overheads"]
        assert set(over) == set(OVERHEADS), name
        assert 0 < case["engine_wall_s"] < case["http_wall_s"], name
        assert all(v >= 0 for k, v in over.items() if k != "other"), (name, over)
        for k in ("validate_decode", "job_submit", "job_start_finish", "queue_dispatch", "png_encode",
                  "ray_transfer_result", "scoring", "ray_transfer_score", "job_images", "response_encode",
                  "http_proxy"):  # fmt: skip
            assert over[k] > 0, (name, k, over)
        # what is not named is a small rest: the named parts account for the wall time
        assert abs(over["other"]) < 0.25 * case["http_wall_s"], (name, over)
        assert case["steps"] == 2 and case["scored"], name
    assert len(rep["cases"]["bestof4_t2i"]["seeds"]) == 4 and len(rep["cases"]["t2i_n1"]["seeds"]) == 1
    pruned = rep["cases"]["bestof4_t2i_pruned"]
    assert pruned["overheads"]["preview_scoring"] > 0 and pruned["steps_computed"] < pruned["steps_full"]
    assert rep["cases"]["bestof4_t2i"]["overheads"]["preview_scoring"] == 0
    # six refs travel in the request body: it is much larger than a t2i body
    assert rep["cases"]["skeleton6"]["request_bytes"] > 20 * rep["cases"]["t2i_n1"]["request_bytes"]

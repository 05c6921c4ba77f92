"""Every key in the deploy YAML files must be one Ray Serve (or our AppArgs / user_config models) declares.

Ray Serve 2.60 validates the config with pydantic models that ignore unknown keys, so a renamed or
misspelt key (`max_concurrent_queries`, `target_num_ongoing_requests_per_replica`, ...) would be
dropped silently. This walks each file against the schema models, recursively, and fails on any key
that is not a declared field.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

pytest.importorskip("ray.serve")
from ray.serve.schema import ServeDeploySchema

from services.app import AppArgs
from services.config import GeneratorConfig, RouterConfig, ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "deploy" / "serve_config.yaml", ROOT / "deploy" / "local.yaml"]
USER_CONFIGS = {"Router": RouterConfig, "Generator": GeneratorConfig, "Scorer": ScorerConfig}


def _models_in(annotation) -> list[type[BaseModel]]:
    """BaseModel classes anywhere inside a type annotation (Optional, Union, List, Dict values...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def unknown_keys(model: type[BaseModel], data, path: str = "") -> list[str]:
    """Paths of keys in `data` that `model` (recursively) does not declare."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_key = {name: f for name, f in fields.items()}
    by_key.update({f.alias: f for f in fields.values() if f.alias})
    bad = []
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in by_key:
            bad.append(f"{here} (not a field of {model.__name__})")
            continue
        subs = _models_in(by_key[key].annotation)
        if not subs:
            continue
        sub = subs[0]
        if isinstance(value, dict):
            bad += unknown_keys(sub, value, here)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                bad += unknown_keys(sub, item, f"{here}[{i}]")
    return bad


def check_file(data: dict) -> list[str]:
    bad = unknown_keys(ServeDeploySchema, data)
    for i, app in enumerate(data.get("applications", [])):
        assert app["import_path"] == "services.app:build_app"
        bad += unknown_keys(AppArgs, app.get("args", {}), f"applications[{i}].args")
        for j, dep in enumerate(app.get("deployments", [])):
            if dep.get("name") not in USER_CONFIGS:
                bad.append(f"applications[{i}].deployments[{j}].name {dep.get('name')!r} is not a deployment of the app")
                continue
            if "user_config" in dep:
                bad += unknown_keys(USER_CONFIGS[dep["name"]], dep["user_config"],
                                    f"applications[{i}].deployments[{j}].user_config")  # fmt: skip
    return bad


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_key_is_declared_by_the_schema(path):
    data = yaml.safe_load(path.read_text())
    assert check_file(data) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_validates(path):
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)
    for app in data["applications"]:
        args = AppArgs.model_validate(app["args"])
        assert args.model  # both files name the checkpoint explicitly
        for dep in app.get("deployments", []):
            if "user_config" in dep:
                USER_CONFIGS[dep["name"]].model_validate(dep["user_config"])
    assert schema.applications


def test_local_yaml_is_the_embedded_two_replica_cpu_default():
    data = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = data["applications"][0]
    assert app["args"]["model"] == "embedded:tiny" and app["args"]["scorer_model"] == "embedded:tiny-clip"
    assert app["args"]["pickscore_model"] == "embedded:tiny-pickscore"
    assert app["args"]["dino_model"] == "embedded:tiny-dino"
    assert data["http_options"] == {**data["http_options"], "host": "127.0.0.1", "port": 8000}
    deps = {d["name"]: d for d in app["deployments"]}
    assert deps["Generator"]["num_replicas"] == 2
    assert deps["Generator"]["ray_actor_options"]["num_cpus"] <= 1
    assert "num_gpus" not in deps["Generator"]["ray_actor_options"]


def test_production_yaml_has_gpu_autoscaled_generators():
    data = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    app = data["applications"][0]
    gen = {d["name"]: d for d in app["deployments"]}["Generator"]
    assert gen["ray_actor_options"]["num_gpus"] == 1
    auto = gen["autoscaling_config"]
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
    assert "target_ongoing_requests" in auto
    assert gen["max_queued_requests"] > 0 and gen["max_ongoing_requests"] >= 1
    # replicas must be allowed to finish the longest generation before being killed
    assert gen["graceful_shutdown_timeout_s"] > app["args"]["router"]["generate_timeout_s"]
    assert data["http_options"]["request_timeout_s"] > app["args"]["router"]["generate_timeout_s"]


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"max_concurrent_queries": 4}, "deployments[0].max_concurrent_queries"),
        ({"autoscaling_config": {"min_replicas": 1, "target_num_ongoing_requests_per_replica": 1}},
         "autoscaling_config.target_num_ongoing_requests_per_replica"),
        ({"ray_actor_options": {"num_gpu": 1}}, "ray_actor_options.num_gpu"),
        ({"user_config": {"seeds_per_cal": 2}}, "user_config.seeds_per_cal"),
    ],
)  # fmt: skip
def test_the_walker_catches_renamed_keys(patch, expected):
    data = {"applications": [{"name": "a", "import_path": "services.app:build_app", "args": {},
                              "deployments": [{"name": "Router", **patch}]}]}  # fmt: skip
    bad = check_file(data)
    assert len(bad) == 1 and expected in bad[0], bad
    # ...and Ray itself would have accepted the file without a word:
    if "user_config" not in patch:
        ServeDeploySchema.model_validate(data)


def test_the_walker_catches_unknown_app_args():
    data = {"applications": [{"name": "a", "import_path": "services.app:build_app",
                              "args": {"modle": "x", "limits": {"max_N": 3}}}]}  # fmt: skip
    bad = check_file(data)
    assert any("args.modle" in b for b in bad) and any("args.limits.max_N" in b for b in bad)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_calls_the_typed_builder_with_validated_args(path):
    """Serve converts `args:` to AppArgs only if the annotation is a real class (no string annotations)."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.app import build_app

    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    assert call_user_app_builder_with_args_if_necessary(build_app, args).__class__ is Application
    with pytest.raises(Exception, match="modle"):
        call_user_app_builder_with_args_if_necessary(build_app, {**args, "modle": "typo"})


def test_engine_options_are_pipeline_arguments():
    """`args.engine` keys are passed to HiDreamPipeline(...): guard against a rename in the engine."""
    import inspect

    from hidream_serve.engine.pipeline import HiDreamPipeline
    from services.config import EngineOptions

    # the Generator's own: warm_up_size (it calls pipeline.warm_up after loading), gpu_memory_gib (it caps the
    # allocator before loading)
    accepted = set(inspect.signature(HiDreamPipeline.__init__).parameters) | {"warm_up_size", "gpu_memory_gib"}
    accepted |= set(inspect.signature(HiDreamPipeline.from_pretrained).parameters) - {"kwargs", "options"}
    assert set(EngineOptions.model_fields) <= accepted
    assert hasattr(HiDreamPipeline, "warm_up")
    for path in FILES:
        engine = yaml.safe_load(path.read_text())["applications"][0]["args"].get("engine", {})
        assert set(engine) <= accepted


def test_production_yaml_names_real_scorer_directories_and_weights_for_every_mode():
    from hidream_serve.vocabulary import MODES
    from hidream_serve.scoring.settings import SCORER_NAMES
    from services.app import scorer_specs

    args = AppArgs.model_validate(yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
                                  ["applications"][0]["args"])  # fmt: skip
    specs = scorer_specs(args, args.model)
    for key in ("clip", "pickscore", "dino"):
        assert specs[key] and specs[key].startswith("/models/"), specs
    assert set(args.scorer.weights.model_dump()) == set(MODES)
    for mode in MODES:
        w = args.scorer.weights.for_mode(mode)
        assert set(w) == set(SCORER_NAMES) and w["pickscore"] > 0
        assert (w["fidelity"] > 0) == (mode != "t2i")
    assert args.scorer.role_weights.pose == 0 and args.scorer.role_weights.face == 1


def test_unset_scorers_follow_the_generator(monkeypatch):
    """Beside the embedded model the tiny scorers; beside real weights none (never a random judge)."""
    from services.app import scorer_specs

    for env in ("HIDREAM_PICKSCORE_PATH", "HIDREAM_DINO_PATH", "HIDREAM_SCORER_PATH",
                "HIDREAM_PICKSCORE_PROCESSOR_PATH"):  # fmt: skip
        monkeypatch.delenv(env, raising=False)
    tiny = scorer_specs(AppArgs(), "embedded:tiny")
    assert tiny == {"clip": "embedded:tiny-clip", "pickscore": "embedded:tiny-pickscore", "dino": "embedded:tiny-dino",
                    "pickscore_processor": None}  # fmt: skip
    real = scorer_specs(AppArgs(scorer_model="/m/clip"), "/m/hidream")
    assert real["pickscore"] is None and real["dino"] is None and real["clip"] == "/m/clip"
    monkeypatch.setenv("HIDREAM_PICKSCORE_PATH", "/m/pick")
    assert scorer_specs(AppArgs(dino_model="none"), "/m/hidream")["pickscore"] == "/m/pick"
    assert scorer_specs(AppArgs(dino_model="none"), "embedded:tiny")["dino"] is None


def test_the_walker_catches_misspelt_scorer_weights():
    data = {"applications": [{"name": "a", "import_path": "services.app:build_app",
                              "args": {"scorer": {"weights": {"t2i": {"pickscor": 1.0}, "edits": {}},
                                                  "role_weights": {"faces": 1.0}}},
                              "deployments": [{"name": "Scorer", "user_config": {"weights": {"ip": {"dino": 1}}}}]}]}
    bad = check_file(data)
    for key in ("weights.t2i.pickscor", "weights.edits", "role_weights.faces", "user_config.weights.ip.dino"):
        assert any(key in b for b in bad), (key, bad)


@pytest.mark.parametrize(
    "args, key",
    [
        ({"defaults": {"n": 5}, "limits": {"max_n": 4}}, "defaults.n"),
        ({"defaults": {"steps": 30}, "limits": {"max_steps": 20}}, "defaults.steps"),
        ({"limits": {"max_steps": 20}}, "defaults.recipe"),  # the full recipe's 50 steps
        ({"limits": {"max_pixels": 1024 * 1024}}, "defaults.width"),  # 2048x2048 by default
        ({"defaults": {"width": 128, "height": 128}, "limits": {"max_pixels": 1024 * 1024}},
         "defaults.width"),  # not exact: snapped to a trained size, 2048x2048
        ({"defaults": {"width": 100, "height": 128, "exact_size": True}}, "defaults.width"),
    ],
)  # fmt: skip
def test_defaults_outside_the_limits_are_a_config_error(args, key):
    """Otherwise every request leaving the field out would be refused, blaming a field the client never sent."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        AppArgs.model_validate(args)
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.app import build_app

    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        call_user_app_builder_with_args_if_necessary(build_app, args)


def test_defaults_within_the_limits_are_fine():
    AppArgs.model_validate({"defaults": {"width": 128, "height": 128, "exact_size": True, "steps": 2, "n": 4},
                            "limits": {"max_n": 4, "max_steps": 2, "max_pixels": 128 * 128}})  # fmt: skip


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_timeouts_let_every_admitted_request_finish(path):
    """An admitted request may wait `queue_timeout_s` for a replica, compute `generate_timeout_s` and be scored
    within `score_timeout_s`: the proxy must not cut it first, and a stopping Router or Generator replica must
    let a running one finish."""
    data = yaml.safe_load(path.read_text())
    app = data["applications"][0]
    router = RouterConfig.model_validate(app["args"].get("router", {}))
    deployments = {d["name"]: d for d in app["deployments"]}
    request_timeout = data["http_options"]["request_timeout_s"]
    assert router.queue_timeout_s + router.generate_timeout_s + router.score_timeout_s <= request_timeout
    assert deployments["Router"]["graceful_shutdown_timeout_s"] >= router.generate_timeout_s + router.score_timeout_s
    assert deployments["Generator"]["graceful_shutdown_timeout_s"] >= router.generate_timeout_s

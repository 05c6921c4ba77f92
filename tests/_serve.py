"""Start the whole application in-process on CPU (Ray + Serve + the embedded tiny models) for HTTP tests."""

from __future__ import annotations

import contextlib
import os
import socket
import time

TINY_MODELS = {"model": "embedded:tiny", "scorer_model": "embedded:tiny-clip",
               "pickscore_model": "embedded:tiny-pickscore", "dino_model": "embedded:tiny-dino", "device": "cpu"}  # fmt: skip


def tiny_app_args(router: dict, defaults: dict, generator: dict | None = None, scorer: dict | None = None, **more):
    """`AppArgs` for the embedded tiny models on CPU, one torch thread per replica (CI has two cores); `more`
    adds or overrides any other field (`limits`, `jobs`, a model)."""
    from services.app import AppArgs

    return AppArgs(**{**TINY_MODELS, "router": router, "defaults": defaults,
                      "generator": {"max_batch": 4, "torch_threads": 1, **(generator or {})},
                      "scorer": {"batch_size": 8, "torch_threads": 1, **(scorer or {})}, **more})  # fmt: skip


def cpu_options(generator: dict, jobs: dict | None = None) -> dict:
    """Serve deployment options on a small CPU machine: the router and the jobs replica hold no CPU slot, the
    generator replicas and the scorer half a CPU each; `generator` adds replicas, autoscaling, queue bounds."""
    return {
        "Router": {"ray_actor_options": {"num_cpus": 0}},
        "Generator": {**generator, "ray_actor_options": {"num_cpus": 0.5}},
        "Scorer": {"ray_actor_options": {"num_cpus": 0.5}},
        "Jobs": {"ray_actor_options": {"num_cpus": 0}, **(jobs or {})},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(cache_dir: str, args, options: dict, timeout: float = 60, metrics_port: int | None = None):
    """Yield an httpx client on 127.0.0.1 for the app `assemble(args, options)`; shut everything down after.
    `metrics_port`: Ray exports its metrics (and the service's) at http://127.0.0.1:<port>/metrics, every second."""
    import httpx
    import ray
    from ray import serve

    from services.app import assemble

    port = free_port()
    env = {"HIDREAM_SERVE_CACHE": cache_dir, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    metrics = {} if metrics_port is None else {"_metrics_export_port": metrics_port,
                                               "_system_config": {"metrics_report_interval_ms": 1000}}  # fmt: skip
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": env}, **metrics)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(assemble(args, options), name="hidream", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout, trust_env=False) as client:
            yield client
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def wait_ready(client, timeout: float = 120) -> None:
    """Until `/readyz` answers 200 (every deployment has loaded its models)."""
    deadline = time.time() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.time() < deadline, "the service did not become ready"
        time.sleep(0.5)

"""Best-of-N across GPU replicas: the Ray Serve application with G generator replicas (one GPU each).

Full-size architecture with random bf16 weights (`random:full-size`), 2048x2048, full recipe. Measures
one image's latency, best-of-G and best-of-2G wall time, and the throughput of a stream of single-image
requests, against one replica's throughput (images per minute = 60 / single-image time). Writes
bench/results/multi-<gpu>-x<G>.json and .md with the command.

    python bench/bench_multi_gpu.py [--gpus G] [--steps 50] [--out bench/results]
    python bench/bench_multi_gpu.py --tiny-cpu --gpus 4 --size 128 --steps 4   # the same flow on CPU replicas

On the device machines ray is not installed: carry the ray wheel without its `ray/jars` folder (Java
support, unused here) and its missing dependencies, e.g.
    pip download --no-deps ... ray==2.60.0 && zip -d ray-2.60.0-*.whl 'ray/jars/*'
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=None, help="generator replicas (default: every visible GPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--stream-requests", type=int, default=None, help="default: 3 per replica")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny-cpu", action="store_true", help="tiny model on CPU replicas (checks the flow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    import torch
    from _serve import running_service

    from services.app import AppArgs

    gpus = args.gpus or (1 if args.tiny_cpu else torch.cuda.device_count())
    if not args.tiny_cpu and torch.cuda.device_count() < gpus:
        raise SystemExit(f"asked for {gpus} GPUs, {torch.cuda.device_count()} visible")
    body = {"prompt": "a lighthouse on a cliff at dusk, volumetric light", "width": args.size, "height": args.size,
            "exact_size": True, "recipe": "full", "steps": args.steps}  # fmt: skip
    if args.tiny_cpu:
        app_args = AppArgs(model="embedded:tiny", scorer_model="embedded:tiny-clip", device="cpu",
                           router={"seeds_per_call": 1}, generator={"max_batch": 1, "torch_threads": 1})  # fmt: skip
        per_replica = {"num_cpus": 0.5}
        gpu_name = "cpu-tiny"
    else:
        app_args = AppArgs(model="random:full-size", scorer_model="embedded:tiny-clip", device="cuda",
                           dtype="bfloat16", scorer_device="cpu", engine={"compile": not args.no_compile},
                           limits={"max_n": max(16, 2 * gpus), "max_pixels": 3104 * 3104},
                           router={"seeds_per_call": 1, "generate_timeout_s": 1800},
                           generator={"max_batch": 1})  # fmt: skip
        per_replica = {"num_gpus": 1, "num_cpus": 2}
        gpu_name = torch.cuda.get_device_name(0)
    options = {
        "Router": {"ray_actor_options": {"num_cpus": 0}},
        "Generator": {"num_replicas": gpus, "max_ongoing_requests": 1, "max_queued_requests": 1000,
                      "ray_actor_options": per_replica},
        "Scorer": {"ray_actor_options": {"num_cpus": 1}},
    }  # fmt: skip
    import tempfile

    cache = tempfile.mkdtemp(prefix="hidream-multi-")
    with running_service(cache, app_args, options, timeout=3600) as client:
        wait_ready(client, gpus)

        def post(extra: dict) -> dict:
            r = client.post("/v1/generate/t2i", json={**body, **extra})
            r.raise_for_status()
            return r.json()

        def concurrently(bodies: list[dict]) -> tuple[float, list[dict]]:
            out: list = [None] * len(bodies)

            def run(i):
                out[i] = post(bodies[i])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0, out

        # warm-up: every replica compiles its kernels for this shape (twice: the first pass may queue)
        for _ in range(2):
            concurrently([{"seed": 1000 + i} for i in range(gpus)])

        singles = []
        for s in range(3):
            t0 = time.perf_counter()
            post({"seed": 10 + s})
            singles.append(time.perf_counter() - t0)
        single_s = statistics.median(singles)

        results = {}
        for n in (gpus, 2 * gpus):
            t0 = time.perf_counter()
            d = post({"seed": 100, "n": n})
            wall = time.perf_counter() - t0
            results[f"bestof{n}"] = {"wall_s": round(wall, 2), "x_single": round(wall / single_s, 3),
                                     "replicas_used": len(d["debug"]["replicas"])}  # fmt: skip

        m = args.stream_requests or 3 * gpus
        elapsed, _ = concurrently([{"seed": 5000 + i} for i in range(m)])
        throughput = m / elapsed * 60
        one_replica = 60 / single_s
    report = {
        "gpu": gpu_name, "gpus": gpus, "command": command, "size": args.size, "steps": args.steps,
        "single_image_s": round(single_s, 2), "one_replica_images_per_min": round(one_replica, 2),
        "stream": {"requests": m, "seconds": round(elapsed, 2), "images_per_min": round(throughput, 2),
                   "scaling_vs_one_replica": round(throughput / one_replica, 3),
                   "target": f">= {0.9 * gpus:.1f} (0.9 x G)"},
        **results,
        "targets": {"bestof_G_x_single": "<= 1.1"},
    }  # fmt: skip
    write(report, args.out)
    return 0


def wait_ready(client, gpus: int, timeout: float = 1800) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            r = client.get("/readyz")
            if r.status_code == 200 and r.json()["deployments"]["Generator"]["running_replicas"] >= gpus:
                return
        except Exception:  # noqa: BLE001 - the proxy may not be up yet
            pass
        time.sleep(2)
    raise TimeoutError("the application did not become ready")


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slug = f"multi-{report['gpu'].lower().replace('nvidia ', '').replace(' ', '-')}-x{report['gpus']}"
    (out / f"{slug}.json").write_text(json.dumps(report, indent=2))
    g = report["gpus"]
    lines = [
        f"# {report['gpu']} x{g}: best-of-N over {g} generator replicas, {report['size']}x{report['size']}, "
        f"{report['steps']} steps",
        "",
        f"Command: `{report['command']}`",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| one image (s) | {report['single_image_s']} | |",
        f"| stream throughput (images/min) | {report['stream']['images_per_min']} | |",
        f"| throughput vs one replica | {report['stream']['scaling_vs_one_replica']} | {report['stream']['target']} |",
        f"| best-of-{g} wall / one image | {report[f'bestof{g}']['x_single']} | <= 1.1 |",
        f"| best-of-{2 * g} wall / one image | {report[f'bestof{2 * g}']['x_single']} | |",
    ]
    text = "\n".join(lines) + "\n"
    (out / f"{slug}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())

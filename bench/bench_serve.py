"""The Ray Serve application end to end through HTTP: where a request's wall time goes.

Starts the whole app in this process (Ray + Serve, HTTP on 127.0.0.1, built by `services.app.assemble` as the
YAML builds it): G generator replicas, one GPU each, with the full-size architecture and random bf16 weights
(`random:full-size`), and one scorer on the first GPU (a `num_gpus` fraction) with full-size random PickScore
(CLIP-H), CLIP-L and DINOv2-base (`hidream_serve/scoring/random_full.py`). After a warm-up of every case at a few
steps, it sends each case once more and splits the HTTP wall time with what the service reports:

    the response's `timings` (validate, generate, score, score_compute) and `debug.groups` (per seed group:
    dispatch, engine, preview_score, png, returned, seconds, queued), and the `Server-Timing` header (encode,
    router), against the client's own clock.

Writes <out>/serve-<gpu>.json and .md (the command included); the JSON has `cases`, each with `http_wall_s`,
`engine_wall_s` and `overheads` (name -> seconds).

    python bench/bench_serve.py --gpus 1 --out bench/results                      # H200: ~5-6 min
    python bench/bench_serve.py --steps 8 --out /tmp/serve                        # quick look
    python bench/bench_serve.py --model tiny --device cpu --size 128 --steps 2 --out /tmp/serve   # CPU check
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the prompt and the skeleton refs of the engine benchmark (bench/bench_gpu.py), so the engine walls compare
PROMPT = (
    "medium shot, eye-level, front view. A woman is seated in an ornate bedroom, illuminated by candlelight, "
    "with a calm and composed expression; cream satin robe with floral embroidery, pearl drop earrings, a carved "
    "wooden headboard, three lit white candles on a nightstand, warm shadows across the room."
)
SKELETON_REFS = [("0.face.jpg", "face"), ("0.bg.jpg", "background"), ("0.openpose.jpg", "pose"),
                 ("0.part_1.jpg", "garment"), ("0.part_2.jpg", "garment"), ("0.part_3.jpg", "garment")]  # fmt: skip
EDIT_REF = "test.jpg"
EDIT_PROMPT = "make it night, lit by a single street lamp"
SEEDS4 = [42, 43, 44, 45]
PRUNE = [{"at": 0.25, "keep": 0.5}, {"at": 0.5, "keep": 0.5}]  # bench_gpu's bestof4_t2i_pruned schedule
CASES = ("t2i_n1", "bestof4_t2i", "bestof4_t2i_pruned", "skeleton6", "edit")
JOB_CASE = "bestof4_t2i"  # also run as a job (`--job`): progress events and previews against the synchronous call
WARM_STEPS = 4  # every scheduler path once (UniPC's corrector starts at step 3)
OVERHEADS = {  # name -> what it is (the .md legend)
    "validate_decode": "router: body received, parsed, refs base64+image decoded, input checks (timings.validate)",
    "job_submit": "router -> Jobs replica: storing the request as a job (Server-Timing submit)",
    "job_start_finish": "Jobs replica: starting the job, decoding its refs again, storing the result, and the "
                        "answer's trip (Server-Timing wait - job)",
    "queue_dispatch": "Jobs call -> replica start: waiting for a free replica and the group's Ray transfer",
    "replica_thread": "replica: the call minus engine and PNGs (thread hop, engine lock, PNG text)",
    "preview_scoring": "pruning: encoding previews and waiting for their scores, inside the engine call",
    "png_encode": "replica: encoding the group's PNGs (in parallel)",
    "ray_transfer_result": "replica return -> the Jobs replica holds the GroupResult (its PNGs through Ray) and "
                           "has stored them as files",
    "scoring": "scorer: decoding the PNGs and the forwards (timings.score_compute)",
    "ray_transfer_score": "Jobs <-> scorer: the PNGs' trip and the answer (timings.score - score_compute)",
    "job_images": "router: reading the returned PNGs back from the job store through Jobs (Server-Timing images)",
    "response_encode": "router: base64 of the winner, the response model, JSON (Server-Timing encode)",
    "http_proxy": "client <-> Serve proxy <-> router: the bodies both ways (HTTP wall - Server-Timing router)",
    "other": "the rest: the job's own awaits (collecting, picking the winner, its events) and the router's",
}


# ----------------------------------------------------------------------------- inputs


def image_bytes(path: Path, seed: int) -> bytes:
    """The asset's bytes, or a generated 640x768 JPEG when it is missing."""
    if path.is_file():
        return path.read_bytes()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (768, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def case_bodies(assets: Path, size: int, steps: int | None) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """{case: (mode, request body)} and the assets that were generated instead of read."""
    generated = []

    def ref(sub: str, name: str, role: str | None, seed: int) -> dict:
        path = assets / sub / name
        if not path.is_file():
            generated.append(f"{sub}/{name}")
        out = {"image": base64.b64encode(image_bytes(path, seed)).decode()}
        return {**out, "role": role} if role else out

    base = {"width": size, "height": size, "exact_size": True, "recipe": "full"}
    if steps is not None:
        base["steps"] = steps
    cases = {
        "t2i_n1": ("t2i", {**base, "prompt": PROMPT, "seeds": [42]}),
        "bestof4_t2i": ("t2i", {**base, "prompt": PROMPT, "seeds": SEEDS4}),
        "bestof4_t2i_pruned": ("t2i", {**base, "prompt": PROMPT, "seeds": SEEDS4, "prune": PRUNE}),
        "skeleton6": ("skeleton", {**base, "prompt": PROMPT, "seeds": [42],
                                   "refs": [ref("IP_skeleton", n, r, i) for i, (n, r) in enumerate(SKELETON_REFS)]}),
        "edit": ("edit", {**base, "prompt": EDIT_PROMPT, "seeds": [42], "refs": [ref("edit", EDIT_REF, None, 9)]}),
    }  # fmt: skip
    return cases, generated


# ----------------------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(args) -> tuple[dict, dict]:
    """(AppArgs fields, Ray deployment options by name)."""
    cuda = args.device == "cuda"
    scorer_gpu = cuda and args.scorer_device == "cuda"
    if args.model == "full":
        model, scorers = "random:full-size", dict.fromkeys(("scorer_model", "pickscore_model", "dino_model"),
                                                           "random:full-size")  # fmt: skip
    else:
        model = "embedded:tiny"
        scorers = {"scorer_model": "embedded:tiny-clip", "pickscore_model": "embedded:tiny-pickscore",
                   "dino_model": "embedded:tiny-dino"}  # fmt: skip
    engine = {}
    if cuda and args.compile:
        engine = {"compile": True, "compile_tuning": args.compile_tuning, "warm_up_size": args.size}
    if args.attention:
        engine["attention"] = args.attention
    if args.quantize:
        engine["quantize"] = args.quantize
    if args.gpu_memory_gib:
        engine["gpu_memory_gib"] = args.gpu_memory_gib
    threads = None if cuda else 1
    # a CPU scorer beside a GPU generator gets the host's cores (a Ray actor's default is one thread)
    scorer_threads = max(1, (os.cpu_count() or 2) - 2) if cuda and not scorer_gpu else threads
    app = dict(
        model=model, device=args.device, dtype="bfloat16" if cuda else "float32", engine=engine,
        scorer_device=args.scorer_device, **scorers,
        limits={"max_n": 8, "max_steps": 100, "max_pixels": max(args.size**2, 2048**2), "max_refs": 10,
                "max_image_bytes": 20 * 2**20, "max_image_pixels": 50_000_000, "max_prompt_chars": 4000},
        defaults={"recipe": "full", "width": args.size, "height": args.size, "exact_size": True, "n": 1},
        router={"seeds_per_call": args.seeds_per_call, "prune_group_size": min(4, args.max_batch), "generate_timeout_s": 1800,
                "score_timeout_s": 300},
        generator={"max_batch": args.max_batch, "torch_threads": threads},
        scorer={"batch_size": 16, "torch_threads": scorer_threads},
    )  # fmt: skip
    generator_gpus = (1.0 - args.scorer_gpu_fraction if scorer_gpu else 1.0) if cuda else 0
    options = {
        "Router": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        "Generator": {"num_replicas": args.gpus, "max_ongoing_requests": 1, "max_queued_requests": 64,
                      "health_check_timeout_s": 600,
                      "ray_actor_options": {"num_cpus": 1, "num_gpus": generator_gpus}},
        "Scorer": {"num_replicas": 1, "max_ongoing_requests": 8,
                   "ray_actor_options": {"num_cpus": 1, "num_gpus": args.scorer_gpu_fraction if scorer_gpu else 0}},
    }  # fmt: skip
    return app, options


def start_service(args, port: int, cache: str):
    import ray
    from ray import serve

    from services.app import AppArgs, assemble

    app, options = app_config(args)
    # the replicas import `services` and `hidream_serve` from this checkout (keeping a PYTHONPATH already set, FA3's)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"HIDREAM_SERVE_CACHE": cache, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=args.gpus if args.device == "cuda" else 0,
             include_dashboard=False, logging_level="WARNING", log_to_driver=args.verbose,
             runtime_env={"env_vars": env})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 3600})
    serve.run(assemble(AppArgs.model_validate(app), options), name="hidream", route_prefix="/", blocking=False)
    return app, options


def stop_service() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def print_replica_logs(lines: int = 60) -> None:
    """The tail of Serve's replica logs (log_to_driver is off): why a replica did not start."""
    logs = sorted(Path(tempfile.gettempdir(), "ray", "session_latest", "logs", "serve").glob("replica_*.log"))
    for path in logs:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {path.name}", *tail, sep="\n", file=sys.stderr)


def wait_ready(port: int, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            status, _, _ = http_call(port, "GET", "/readyz")
            if status == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the application was not ready after {timeout_s:.0f}s")


# ----------------------------------------------------------------------------- HTTP and measurement


def http_call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 3600):
    """(status, headers, body bytes) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def server_timing(header: str | None) -> dict[str, float]:
    """`Server-Timing: encode;dur=12.3, router;dur=456` -> {"encode": 0.0123, "router": 0.456} (seconds)."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:]) / 1e3
    return out


class GpuMemory:
    """Samples `nvidia-smi` every `period_s`: the peak memory used per GPU and per Serve deployment (a replica's
    process title is `ray::ServeReplica:<app>:<deployment>...`), overall and per phase. No nvidia-smi: empty."""

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.available = shutil.which("nvidia-smi") is not None
        self.phase = "start"
        self.per_gpu: dict[str, dict[str, float]] = {}  # phase -> {gpu index: peak MiB}
        self.per_deployment: dict[str, dict[str, float]] = {}  # phase -> {deployment: peak MiB, replicas summed}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _query(what: str, fields: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    @staticmethod
    def _deployment(pid: str) -> str:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return f"pid {pid}"
        if "ServeReplica:" in title:
            return title.split("ServeReplica:", 1)[1].split(":", 1)[-1].split()[0].split(".")[0]
        return title.split()[0] if title.strip() else f"pid {pid}"

    def _keep(self, table: dict, key: str, mib: float) -> None:
        for phase in (self.phase, "all"):
            row = table.setdefault(phase, {})
            row[key] = max(row.get(key, 0.0), mib)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for index, used in self._query("gpu", "index,memory.used"):
                    self._keep(self.per_gpu, index, float(used))
                now: dict[str, float] = {}
                for pid, used in self._query("compute-apps", "pid,used_memory"):
                    name = self._deployment(pid)
                    now[name] = now.get(name, 0.0) + float(used)
                for name, mib in now.items():
                    self._keep(self.per_deployment, name, mib)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period_s)

    def report(self) -> dict:
        gib = lambda table: {p: {k: round(v / 1024, 2) for k, v in row.items()} for p, row in table.items()}  # noqa: E731
        return {"available": self.available, "per_gpu_gib": gib(self.per_gpu),
                "per_deployment_gib": gib(self.per_deployment)}  # fmt: skip


def send(port: int, mode: str, body: dict) -> dict:
    """One request, timed on the client: the HTTP wall (request sent -> response body read) and the response."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    status, headers, raw = http_call(port, "POST", f"/v1/generate/{mode}", data)
    wall = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"{mode}: HTTP {status}: {raw[:2000].decode(errors='replace')}")
    t1 = time.perf_counter()
    resp = json.loads(raw)
    return {"wall": wall, "client_decode": time.perf_counter() - t1, "resp": resp, "request_bytes": len(data),
            "response_bytes": len(raw), "server_timing": server_timing(headers.get("server-timing"))}  # fmt: skip


def send_job(port: int, mode: str, body: dict) -> dict:
    """The same request as a job (`POST /v1/jobs`), followed on its SSE stream to the end: the wall from submit to
    the final event, the events by kind (progress and previews included), and the finished job's body."""
    t0 = time.perf_counter()
    status, _, raw = http_call(port, "POST", "/v1/jobs", json.dumps({**body, "mode": mode}).encode())
    if status != 202:
        raise RuntimeError(f"job {mode}: HTTP {status}: {raw[:2000].decode(errors='replace')}")
    job_id = json.loads(raw)["id"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    kinds: dict[str, int] = {}
    first_preview = None
    try:
        conn.request("GET", f"/v1/jobs/{job_id}/events")
        resp = conn.getresponse()
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"event: "):
                kind = line[7:].strip().decode()
                kinds[kind] = kinds.get(kind, 0) + 1
                if kind == "preview" and first_preview is None:
                    first_preview = time.perf_counter() - t0
                if kind in ("succeeded", "failed", "cancelled"):
                    break
    finally:
        conn.close()
    wall = time.perf_counter() - t0
    _, _, raw = http_call(port, "GET", f"/v1/jobs/{job_id}")
    job = json.loads(raw)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {mode}: {job['status']}: {job.get('error')}")
    return {"job_wall_s": round(wall, 4), "events": kinds, "first_preview_s": first_preview and round(first_preview, 3),
            "timings": job["result"]["timings"], "seeds": [c["seed"] for c in job["result"]["candidates"]]}  # fmt: skip


def breakdown(sent: dict) -> dict:
    """A case's record: HTTP wall, engine wall and every overhead on the critical path (the slowest group)."""
    resp, wall, st = sent["resp"], sent["wall"], sent["server_timing"]
    t, groups = resp["timings"], resp["debug"]["groups"]
    per_replica: dict[str, float] = {}
    for g in groups:  # groups on one replica run one after another
        per_replica[g["replica"]] = per_replica.get(g["replica"], 0.0) + g["engine"] - g["preview_score"]
    engine_wall = max(per_replica.values())
    slowest = max(groups, key=lambda g: g["seconds"])
    busy = slowest["seconds"] - slowest["queued"]
    over = {
        "validate_decode": t["validate"],
        "job_submit": st.get("submit", 0.0),
        "job_start_finish": max(0.0, st.get("wait", 0.0) - st.get("job", 0.0)),
        "queue_dispatch": slowest["dispatch"] or 0.0,
        "replica_thread": max(0.0, busy - slowest["engine"] - slowest["png"]),
        "preview_scoring": slowest["preview_score"],
        "png_encode": slowest["png"],
        "ray_transfer_result": slowest["returned"] or 0.0,
        "scoring": t["score_compute"],
        "ray_transfer_score": max(0.0, t["score"] - t["score_compute"]),
        "job_images": st.get("images", 0.0),
        "response_encode": st.get("encode", 0.0),
        "http_proxy": max(0.0, wall - st["router"]) if "router" in st else 0.0,
    }
    over["other"] = wall - engine_wall - sum(over.values())
    winner_png = len(base64.b64decode(resp["winner"]["image"]))
    return {
        "http_wall_s": round(wall, 4), "engine_wall_s": round(engine_wall, 4),
        "http_over_engine": round(wall / engine_wall, 4) if engine_wall > 0 else None,
        "overheads": {k: round(v, 4) for k, v in over.items()},
        "seeds": [c["seed"] for c in resp["candidates"]], "steps": resp["settings"].get("steps"),
        "steps_computed": resp["steps_computed"], "steps_full": resp["steps_full"], "scored": resp["scored"],
        "winner": resp["winner"]["seed"], "winner_png_bytes": winner_png, "request_bytes": sent["request_bytes"],
        "response_bytes": sent["response_bytes"], "client_json_decode_s": round(sent["client_decode"], 4),
        "timings": resp["timings"], "server_timing": st, "groups": groups, "warnings": resp["warnings"],
    }  # fmt: skip


def targets(cases: dict) -> dict:
    """The issue's targets: best-of-4 HTTP wall <= 1.05x engine wall; n=1 <= 1.05x + 0.5 s; scoring 4 <= 0.5 s."""
    out = {}
    if "bestof4_t2i" in cases:
        c = cases["bestof4_t2i"]
        out["bestof4_t2i_http_le_1.05x_engine"] = c["http_wall_s"] <= 1.05 * c["engine_wall_s"]
        out["bestof4_t2i_scoring_le_0.5s"] = c["overheads"]["scoring"] <= 0.5
    if "t2i_n1" in cases:
        c = cases["t2i_n1"]
        out["t2i_n1_http_le_1.05x_engine_plus_0.5s"] = c["http_wall_s"] <= 1.05 * c["engine_wall_s"] + 0.5
    return out


def scorer_probe(args, app: dict, cache: str, n: int = 4, repeats: int = 3) -> dict:
    """The app's scorers alone in this process, after Serve is gone (its GPU is free): load time, weights and
    peak GPU memory, and the seconds to score `n` candidates of the benchmark's size (PIL in, no PNG decoding)."""
    import numpy as np
    import torch
    from PIL import Image

    from hidream_serve.embedded import optional_model_dir
    from hidream_serve.scoring.composite import CompositeScorer
    from hidream_serve.scoring.context import ScoreContext
    from hidream_serve.scoring.random_full import is_random_full

    os.environ["HIDREAM_SERVE_CACHE"] = cache  # the embedded tiny ones the replicas built
    specs = {"pickscore": app["pickscore_model"], "clip": app["scorer_model"], "dino": app["dino_model"]}
    cuda = args.scorer_device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    scorer = CompositeScorer.load(**{k: v if is_random_full(v) else optional_model_dir(v) for k, v in specs.items()},
                                  device=args.scorer_device)  # fmt: skip
    sync()
    out = {"specs": specs, "device": args.scorer_device, "load_s": round(time.perf_counter() - t0, 2),
           "unavailable": scorer.unavailable, "images": n, "size": args.size}  # fmt: skip
    if cuda:
        out["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(n)]
    context = ScoreContext(mode="edit", refs=images[:1], roles=[None])  # PickScore, CLIP and DINOv2 all run
    scorer.score(PROMPT, images, context)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        scorer.score(PROMPT, images, context)
        sync()
        times.append(round(time.perf_counter() - t, 4))
    out.update(score_s=min(times), score_s_all=times)
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


# ----------------------------------------------------------------------------- report


def gpu_name(device: str) -> str:
    if device == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()  # fmt: skip
        if out:
            return out[0].strip()
    return "cpu"


def slug(name: str, gpus: int) -> str:
    base = name.lower().replace("nvidia ", "").replace(" ", "-")
    return base if gpus == 1 else f"{base}-x{gpus}"


def write_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serve-{slug(report['gpu'], report['gpus'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    names = list(OVERHEADS)
    lines = [
        f"# Ray Serve end to end through HTTP: {report['gpu']} x{report['gpus']}, {report['size']}x{report['size']}, "
        f"model {report['app']['model']}",
        "",
        f"Command: `{report['command']}`  ",
        f"python {report['python']}, torch {report['torch']}, ray {report['ray']}; engine {report['app']['engine']}; "
        f"scorer on {report['app']['scorer_device']} ({report['app']['pickscore_model']} PickScore, CLIP, DINOv2); "
        f"router seeds_per_call {report['app']['router']['seeds_per_call']}; started and ready in {report['ready_s']} s; "
        f"warm-up {report['warm_up_steps']} steps per case, {report['warm_up_s']} s; "
        f"assets generated: {report['assets_generated'] or 'none'}.",
        "",
        "Seconds; the overheads are on the critical path (the slowest seed group); `other` is the HTTP wall minus the "
        "engine and every named overhead.",
        "",
        "| case | seeds | steps | HTTP wall | engine wall | HTTP/engine | " + " | ".join(names) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for name, c in report["cases"].items():
        cells = [name, str(len(c["seeds"])), str(c["steps"]), f"{c['http_wall_s']:.3f}", f"{c['engine_wall_s']:.3f}",
                 f"{c['http_over_engine']:.3f}"] + [f"{c['overheads'][k]:.3f}" for k in names]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if report["failed"]:
        lines += ["", "FAILED: " + "; ".join(f"{k}: {v[:300]}" for k, v in report["failed"].items())]
    lines += ["", "Targets: " + (", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items())
                                 or "none measured")]  # fmt: skip
    mem = report["gpu_memory"]
    if mem["available"]:
        lines += ["", f"Peak GPU memory (nvidia-smi, GiB): per GPU {mem['per_gpu_gib'].get('all')}; per deployment "
                      f"{mem['per_deployment_gib'].get('all')}; scorer after loading "
                      f"{mem['per_deployment_gib'].get('ready', {}).get('Scorer')}."]  # fmt: skip
    probe = report.get("scorer_probe") or {}
    if "score_s" in probe:
        mem_text = f", weights {probe['weights_gib']} GiB, peak {probe['peak_gib']} GiB" if "peak_gib" in probe else ""
        lines += ["", f"Scorers alone on {probe['device']} (PickScore, CLIP, DINOv2 fidelity; {probe['images']} images "
                      f"{probe['size']}x{probe['size']}, PIL in): {probe['score_s']} s per set{mem_text}; loaded in "
                      f"{probe['load_s']} s."]  # fmt: skip
    elif probe:
        lines += ["", f"Scorer probe failed: {probe.get('error')}"]
    for name, job in (report.get("job") or {}).items():
        lines += ["", f"As a job (`POST /v1/jobs`, followed on its event stream): {name} {job['job_wall_s']} s from "
                      f"submit to `succeeded`, {job['over_sync_http_wall']}x the synchronous call; events {job['events']}; "
                      f"first preview after {job['first_preview_s']} s."]  # fmt: skip
    lines += ["", "Overheads:", ""] + [f"- `{k}`: {v}" for k, v in OVERHEADS.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return stem.with_suffix(".json")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["full", "tiny"], default="full",
                    help="full: random:full-size generator and scorers; tiny: the embedded tiny ones (CPU checks)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpus", type=int, default=1, help="generator replicas, one GPU each")
    ap.add_argument("--scorer-device", choices=["cuda", "cpu"], default=None, help="default: --device")
    ap.add_argument("--scorer-gpu-fraction", type=float, default=0.25, help="the scorer's num_gpus (the first "
                    "generator gets the rest of its GPU)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="steps per request (default: the full recipe's 50)")
    ap.add_argument("--warm-up-steps", type=int, default=WARM_STEPS, help="steps of each case's warm-up (0: none)")
    ap.add_argument("--repeats", type=int, default=1, help="measured requests per case; the fastest is kept")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--seeds-per-call", type=int, default=None, help="router seeds_per_call (default: "
                    "ceil(4 / gpus): a best-of-4 is one group per replica)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="(cuda) no torch.compile")
    ap.add_argument("--compile-tuning", action="store_true", help="(cuda) tune compiled kernels (+15-20 s start)")
    ap.add_argument("--attention", choices=["auto", "fa3", "cudnn", "flash"], default=None)
    ap.add_argument("--quantize", choices=["fp8"], default=None)
    ap.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--no-scorer-probe", dest="scorer_probe", action="store_false",
                    help="skip scoring 4 images with the scorers alone after Serve stops (GPU memory, seconds)")
    ap.add_argument("--max-batch", type=int, default=4, help="generator max_batch (candidates denoised at once; "
                    "2 for a 24 GB card; pruning needs 2)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="cap the generator's GPU memory "
                    "(engine.gpu_memory_gib): a smaller card's budget on a large one")
    ap.add_argument("--job", action="store_true", help=f"also run {JOB_CASE} as a job (POST /v1/jobs + its SSE "
                    "events, previews on): what progress and previews cost")
    ap.add_argument("--start-timeout", type=float, default=1200)
    ap.add_argument("--verbose", action="store_true", help="replica logs on this terminal")
    args = ap.parse_args(argv)
    args.scorer_device = args.scorer_device or args.device
    args.seeds_per_call = args.seeds_per_call or min(math.ceil(len(SEEDS4) / args.gpus), args.max_batch)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.max_batch < 2:
        ap.error("--max-batch: at least 2 (pruning ranks the candidates of one batch)")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {list(CASES)}")
    if args.device == "cpu" and args.model == "full":
        ap.error("--model full needs --device cuda (use --model tiny on a CPU)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bodies, generated = case_bodies(args.assets, args.size, args.steps)
    port = free_port()
    cache = tempfile.mkdtemp(prefix="hidream-bench-serve-")
    report: dict = {"command": shlex.join(["python", "bench/bench_serve.py", *(argv or sys.argv[1:])]),
                    "gpu": gpu_name(args.device), "gpus": args.gpus, "size": args.size, "steps_arg": args.steps,
                    "warm_up_steps": args.warm_up_steps, "repeats": args.repeats, "python": platform.python_version(),
                    "assets": str(args.assets), "assets_generated": generated}  # fmt: skip
    t_start = time.perf_counter()
    cases: dict[str, dict] = {}
    failed: dict[str, str] = {}
    warm_up_errors: dict[str, str] = {}
    with GpuMemory() as mem:
        try:
            app, options = start_service(args, port, cache)
            report.update(app=app, deployments=options)
            wait_ready(port, args.start_timeout)
            report["ready_s"] = round(time.perf_counter() - t_start, 1)  # Ray, Serve, loading, compile warm-up
        except BaseException:
            print_replica_logs()
            stop_service()
            raise
        mem.phase = "ready"
        time.sleep(2 * mem.period_s)  # one sample of the loaded replicas before any request
        try:
            t0 = time.perf_counter()
            if args.warm_up_steps > 0:
                mem.phase = "warm_up"
                for name in args.cases:
                    mode, body = bodies[name]
                    try:
                        sent = send(port, mode, {**body, "steps": args.warm_up_steps})
                        print(f"warm-up {name}: {sent['wall']:.2f}s", flush=True)
                    except Exception as e:  # noqa: BLE001 - recorded; the measured request says whether it recurs
                        warm_up_errors[name] = f"{type(e).__name__}: {e}"[:2000]
                        print(f"warm-up {name}: FAILED {warm_up_errors[name]}", flush=True)
            report["warm_up_s"] = round(time.perf_counter() - t0, 1)
            for name in args.cases:
                mode, body = bodies[name]
                mem.phase = name
                try:
                    runs = [breakdown(send(port, mode, body)) for _ in range(args.repeats)]
                except Exception as e:  # noqa: BLE001 - the other cases still count; the report says what failed
                    failed[name] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"{name}: FAILED {failed[name]}", flush=True)
                    continue
                best = min(runs, key=lambda r: r["http_wall_s"])
                if args.repeats > 1:
                    best["http_wall_s_all"] = [r["http_wall_s"] for r in runs]
                    best["http_wall_s_median"] = round(statistics.median(best["http_wall_s_all"]), 4)
                cases[name] = best
                print(f"{name}: HTTP {best['http_wall_s']:.3f}s, engine {best['engine_wall_s']:.3f}s, "
                      f"overheads {best['overheads']}", flush=True)  # fmt: skip
            if args.job and JOB_CASE in cases:
                mode, body = bodies[JOB_CASE]
                mem.phase = "job"
                try:
                    job = send_job(port, mode, body)
                    job["over_sync_http_wall"] = round(job["job_wall_s"] / cases[JOB_CASE]["http_wall_s"], 4)
                    report["job"] = {JOB_CASE: job}
                    print(f"job {JOB_CASE}: {job}", flush=True)
                except Exception as e:  # noqa: BLE001
                    failed[f"job_{JOB_CASE}"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            stop_service()
    if args.scorer_probe and "app" in report:
        try:
            report["scorer_probe"] = scorer_probe(args, report["app"], cache)
            print(f"scorer probe: {report['scorer_probe']}", flush=True)
        except Exception as e:  # noqa: BLE001 - the Serve measurements stand without it
            report["scorer_probe"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    import ray
    import torch

    report.update(cases=cases, failed=failed, warm_up_errors=warm_up_errors, targets=targets(cases), gpu_memory=mem.report(), torch=torch.__version__,
                  ray=ray.__version__, total_s=round(time.perf_counter() - t_start, 1))  # fmt: skip
    path = write_report(report, args.out)
    print(f"wrote {path} and .md ({report['total_s']} s in all)")
    shutil.rmtree(cache, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

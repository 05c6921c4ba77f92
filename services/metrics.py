"""Every Prometheus metric of the service, defined here once, through Ray Serve's metrics API (`ray.serve.metrics`).

Ray exports them where it exports its own (each node's metrics agent, `--metrics-export-port`; the local service:
http://127.0.0.1:8080/metrics, see docs/metrics.md), named `ray_<name>` (counters also get `_total`), with the
`deployment`, `replica` and `application` tags Serve adds. The deployments call the small recorders below, one
line each; a recorder never raises (a metrics problem must not fail a request) and does nothing outside Ray.
Metrics are created lazily, on first use inside a replica, so that Serve's tags apply. No torch import here:
the router imports this module.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("ray.serve.hidream.metrics")

_QUEUE_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]
_STEP_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 2, 5]
_IMAGE_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320]
_SCORE_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]

# name -> (kind, description, tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "hidream_requests": ("counter", "HTTP requests answered, by route (generate, openai), mode and status code",
                         ("route", "mode", "status"), None),
    "hidream_queue_wait_seconds": ("histogram", "time waiting before work started: a seed group before a generator "
                                   "replica started it (stage=group), a job in the jobs queue (stage=job)",
                                   ("stage",), _QUEUE_S),
    "hidream_generation_step_seconds": ("histogram", "engine seconds per denoising step of a seed group (the batch)",
                                        ("mode",), _STEP_S),
    "hidream_generation_image_seconds": ("histogram", "generator seconds (engine and PNG) per candidate of a group",
                                         ("mode",), _IMAGE_S),
    "hidream_candidates_generated": ("counter", "candidates a generator returned (pruned ones included)",
                                     ("mode",), None),
    "hidream_candidates_pruned": ("counter", "candidates stopped early by preview pruning", ("mode",), None),
    "hidream_scoring_seconds": ("histogram", "the scorer's seconds for one scoring call (decoding and forwards)",
                                ("mode",), _SCORE_S),
    "hidream_jobs": ("counter", "jobs entering a state (queued, started, succeeded, failed, cancelled)",
                     ("state",), None),
    "hidream_jobs_active": ("gauge", "jobs now queued or running on the Jobs replica", ("state",), None),
    "hidream_previews": ("counter", "preview images sent in job event streams", (), None),
    "hidream_webhooks": ("counter", "webhook deliveries, by outcome (delivered, failed: every attempt failed)",
                         ("outcome",), None),
    "hidream_gpu_peak_memory_bytes": ("gauge", "torch.cuda.max_memory_allocated of the generator replica "
                                      "(CUDA replicas only)", (), None),
}
JOB_STATES = ("queued", "started", "succeeded", "failed", "cancelled")


@functools.cache
def _metric(name: str):
    from ray.serve import metrics

    kind, description, tags, boundaries = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description=description, tag_keys=tags)
    return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tags)


def _safe(record):
    @functools.wraps(record)
    def wrapper(*args, **kwargs):
        try:
            import ray

            if ray.is_initialized():
                record(*args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics never fail the work they measure
            log.debug("metric %s not recorded", record.__name__, exc_info=True)

    return wrapper


@_safe
def request(route: str, mode: str, status: int) -> None:
    _metric("hidream_requests").inc(tags={"route": route, "mode": mode, "status": str(status)})


@_safe
def queue_wait(stage: str, seconds: float) -> None:
    _metric("hidream_queue_wait_seconds").observe(max(0.0, seconds), tags={"stage": stage})


@_safe
def groups_waited(groups) -> None:
    """The router's seed groups (fanout `GroupRun`s): each one's wait before a replica started it."""
    for g in groups:
        _metric("hidream_queue_wait_seconds").observe(g.queued_s, tags={"stage": "group"})


@_safe
def generated(mode: str, result, device=None, torch=None) -> None:
    """A generator's finished seed group (`GroupResult`), and the replica's peak GPU memory so far."""
    steps = max((c.steps_computed for c in result.candidates), default=0)
    tags = {"mode": mode}
    if steps:
        _metric("hidream_generation_step_seconds").observe(result.timings.engine_s / steps, tags=tags)
    if result.candidates:
        per_image = (result.timings.engine_s + result.timings.png_s) / len(result.candidates)
        _metric("hidream_generation_image_seconds").observe(per_image, tags=tags)
        _metric("hidream_candidates_generated").inc(len(result.candidates), tags=tags)
    pruned = sum(c.pruned_at_step is not None for c in result.candidates)
    if pruned:
        _metric("hidream_candidates_pruned").inc(pruned, tags=tags)
    if torch is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        _metric("hidream_gpu_peak_memory_bytes").set(torch.cuda.max_memory_allocated(device))


@_safe
def scored(mode: str, seconds: float) -> None:
    _metric("hidream_scoring_seconds").observe(seconds, tags={"mode": mode})


@_safe
def job_event(kind: str) -> None:
    """A job's event: its state changes and previews are counted."""
    if kind in JOB_STATES:
        _metric("hidream_jobs").inc(tags={"state": kind})
    elif kind == "preview":
        _metric("hidream_previews").inc()


@_safe
def jobs_active(queued: int, running: int) -> None:
    _metric("hidream_jobs_active").set(queued, tags={"state": "queued"})
    _metric("hidream_jobs_active").set(running, tags={"state": "running"})


@_safe
def webhook(outcome: str) -> None:
    _metric("hidream_webhooks").inc(tags={"outcome": outcome})

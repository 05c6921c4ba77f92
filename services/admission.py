"""Admission control of the router: accept a request only if every one of its seed groups can be served.

A group's compute is bounded by `router.generate_timeout_s` (counted from when a replica starts it), so a group
queued behind k others on a replica slot starts within k * generate_timeout_s. For every admitted group to start
within `router.queue_timeout_s`, at most `queue_timeout_s // generate_timeout_s` groups may wait per slot: the
queue bound is

    capacity = running Generator replicas * their max_ongoing_requests * (1 + queue_timeout_s // generate_timeout_s)

groups running or waiting. A request whose groups do not fit is refused at once with 503 and Retry-After, before
any generator is asked; an admitted one runs to the end (unless its client goes away). A request is always
admitted when nothing else is in flight, whatever its size. Groups of the Jobs deployment share the replicas but
are not counted here (jobs wait and retry on their own: docs/jobs.md).

On stop, `Router.drain` closes admission and waits until the admitted requests are done, before the deployments
are stopped (services/serve_run.py): a scorer stopped first would leave them unscored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from hidream_serve.api.errors import Unavailable

from .config import RouterConfig


def queue_bound(replicas: int, slots_per_replica: int, config: RouterConfig) -> int:
    waits_per_slot = int(config.queue_timeout_s // config.generate_timeout_s)
    return max(1, replicas) * max(1, slots_per_replica) * (1 + waits_per_slot)


def probe_generators(app_name: str) -> tuple[int, int]:
    """(running Generator replicas, max_ongoing_requests of each) from the Serve controller; blocking."""
    from ray import serve
    from ray.serve.context import _get_global_client

    dep = serve.status().applications[app_name].deployments.get("Generator")
    running = 0 if dep is None else sum(n for st, n in dep.replica_states.items() if str(st).endswith("RUNNING"))
    try:
        info, _ = _get_global_client().get_deployment_info("Generator", app_name)
        slots = int(info.deployment_config.max_ongoing_requests)
    except Exception:  # noqa: BLE001 - an older controller: one group per replica, Serve's usual setting here
        slots = 1
    return running, slots


class Admission:
    """The groups this router replica has admitted and not finished, against the queue bound."""

    def __init__(self, app_name: str | None):
        self.app_name = app_name
        self.groups = 0
        self.closed = False  # stopping: nothing new is admitted (Router.drain)
        self._probe: tuple[float, int, int] | None = None  # (when, replicas, slots)

    async def capacity(self, config: RouterConfig) -> int:
        now = time.monotonic()
        if self.app_name and (self._probe is None or now - self._probe[0] > config.ready_cache_s):
            try:
                replicas, slots = await asyncio.to_thread(probe_generators, self.app_name)
                self._probe = (now, replicas, slots)
            except Exception:  # noqa: BLE001 - no controller answer: keep the last one
                pass
        _, replicas, slots = self._probe or (now, 1, 1)
        return queue_bound(replicas, slots, config)

    @contextlib.asynccontextmanager
    async def admit(self, n_seeds: int, per_call: int, config: RouterConfig):
        n_groups = math.ceil(n_seeds / per_call)
        if self.closed:
            raise Unavailable("the server is stopping; retry on its successor", retry_after_s=config.retry_after_s)
        capacity = await self.capacity(config)
        if self.groups and self.groups + n_groups > capacity:
            raise Unavailable(f"the server is at capacity ({self.groups} of {capacity} seed groups running or "
                              f"queued, this request needs {n_groups}); retry later",
                              retry_after_s=config.retry_after_s)  # fmt: skip
        self.groups += n_groups
        try:
            yield
        finally:
            self.groups -= n_groups

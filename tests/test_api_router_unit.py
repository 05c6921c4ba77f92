"""Router pieces that need no running Ray: readiness from Serve's status, the live config lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

router_mod = pytest.importorskip("services.router")
CHECK_READY = router_mod.Router.func_or_class._check_ready


def patch_serve(monkeypatch, fake):
    # Serve re-creates the ingress class, so its methods carry their own globals: patch those.
    monkeypatch.setitem(CHECK_READY.__globals__, "serve", fake)


def _status(gen_running: int, scorer_running: int | None):
    deps = {"Generator": SimpleNamespace(replica_states={"ReplicaState.RUNNING": gen_running, "STARTING": 1},
                                         status=SimpleNamespace(value="UPDATING"))}  # fmt: skip
    if scorer_running is not None:
        deps["Scorer"] = SimpleNamespace(replica_states={"RUNNING": scorer_running}, status=SimpleNamespace(value="HEALTHY"))
    return SimpleNamespace(applications={"app": SimpleNamespace(deployments=deps)})


@pytest.mark.parametrize(
    "gen, scorer, has_scorer, ready",
    [(0, 1, True, False), (1, 0, True, False), (2, 1, True, True), (1, None, True, False), (1, None, False, True)],
)
def test_ready_only_when_generator_and_scorer_run(monkeypatch, gen, scorer, has_scorer, ready):
    fake = SimpleNamespace(get_replica_context=lambda: SimpleNamespace(app_name="app"),
                           status=lambda: _status(gen, scorer))  # fmt: skip
    patch_serve(monkeypatch, fake)
    ok, detail = CHECK_READY(SimpleNamespace(scorer=object() if has_scorer else None))
    assert ok is ready
    assert detail["Generator"]["running_replicas"] == gen


def test_not_ready_when_the_controller_does_not_answer(monkeypatch):
    def boom():
        raise ConnectionError("no controller")

    patch_serve(monkeypatch, SimpleNamespace(get_replica_context=boom, status=boom))
    ok, detail = CHECK_READY(SimpleNamespace(scorer=None))
    assert not ok and detail == {"error": "ConnectionError"}


def test_config_lookup_outside_a_replica_gives_defaults():
    from services.config import RouterConfig

    assert router_mod._config() == RouterConfig()

"""The SQLite job store for real: WAL, idempotency, pagination, event log, resume bookkeeping, retention."""

import pytest

from hidream_serve.jobs.store import IdempotencyConflict, JobStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def store(tmp_path):
    clock = Clock()
    s = JobStore(tmp_path / "jobs.sqlite", tmp_path / "results", clock=clock)
    s.clock = clock
    yield s
    s.close()


def test_wal_and_durable_across_reopen(store, tmp_path):
    assert store.journal_mode() == "wal"
    job, created = store.create({"mode": "t2i", "prompt": "a"})
    assert created and job.status == "queued"
    store.append_event(job.id, "queued", {"position": 0})
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite", tmp_path / "results")
    assert again.get(job.id).request == {"mode": "t2i", "prompt": "a"}
    assert [e.kind for e in again.events(job.id)] == ["queued"]
    assert [j.id for j in again.active()] == [job.id]
    again.close()


def test_idempotency_same_body_same_job_within_24h(store):
    a, _ = store.create({"prompt": "x", "n": 4}, idempotency_key="k")
    b, created = store.create({"n": 4, "prompt": "x"}, idempotency_key="k")
    assert b.id == a.id and not created
    with pytest.raises(IdempotencyConflict, match="Idempotency-Key"):
        store.create({"prompt": "y"}, idempotency_key="k")
    store.clock.t += 24 * 3600 + 1
    c, created = store.create({"prompt": "x", "n": 4}, idempotency_key="k")
    assert created and c.id != a.id


def test_list_newest_first_with_cursor_and_status(store):
    ids = [store.create({"i": i})[0].id for i in range(5)]
    store.set_status(ids[1], "running")
    store.set_status(ids[1], "succeeded", result={"ok": 1})
    page, cursor = store.list(limit=2)
    assert [j.id for j in page] == [ids[4], ids[3]]
    page2, cursor2 = store.list(limit=2, cursor=cursor)
    assert [j.id for j in page2] == [ids[2], ids[1]]
    page3, cursor3 = store.list(limit=2, cursor=cursor2)
    assert [j.id for j in page3] == [ids[0]] and cursor3 is None
    assert [j.id for j in store.list(status="succeeded")[0]] == [ids[1]]
    assert store.get(ids[1]).result == {"ok": 1}
    assert store.queue_position(ids[0]) == 0 and store.queue_position(ids[2]) == 1
    assert store.queue_position(ids[1]) is None
    with pytest.raises(ValueError, match="status"):
        store.list(status="done")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)


def test_events_resume_after_last_event_id(store):
    a, _ = store.create({"a": 1})
    b, _ = store.create({"b": 1})
    e1 = store.append_event(a.id, "queued", {"position": 0})
    store.append_event(b.id, "queued", {"position": 1})
    e2 = store.append_event(a.id, "started", {})
    e3 = store.append_event(a.id, "progress", {"seed": 1, "step": 1, "steps": 4})
    assert [e.id for e in store.events(a.id)] == [e1, e2, e3]
    assert [e.kind for e in store.events(a.id, after=e2)] == ["progress"]
    assert store.events(a.id, after=e3) == []


def test_candidates_kept_for_resume_only_with_their_file(store):
    job, _ = store.create({"n": 3})
    path = store.save_candidate(job.id, 7, b"\x89PNG fake", {"seed": 7, "score": 0.5})
    store.save_candidate(job.id, 8, b"\x89PNG fake", {"seed": 8})
    assert path == store.results_dir / job.id / "7.png" and path.read_bytes() == b"\x89PNG fake"
    (store.results_dir / job.id / "8.png").unlink()
    assert store.candidates(job.id) == {7: {"seed": 7, "score": 0.5}}


def test_retention_ttl_then_quota_oldest_first_keeps_active(store):
    jobs = [store.create({"i": i})[0] for i in range(4)]
    for j in jobs[:3]:
        store.save_candidate(j.id, 1, b"x" * 100, {})
        store.set_status(j.id, "succeeded", result={})
    store.clock.t += 10
    fresh = store.create({"i": 9})[0]
    store.save_candidate(fresh.id, 1, b"x" * 100, {})
    store.set_status(fresh.id, "succeeded", result={})
    assert set(store.enforce_retention(ttl_s=5, quota_bytes=None)) == {j.id for j in jobs[:3]}
    assert not (store.results_dir / jobs[0].id).exists() and store.get(jobs[0].id) is None
    assert store.get(jobs[3].id).status == "queued"  # active jobs are never deleted
    newer = store.create({"i": 10})[0]
    store.save_candidate(newer.id, 1, b"x" * 100, {})
    store.set_status(newer.id, "succeeded", result={})
    assert store.enforce_retention(ttl_s=1e9, quota_bytes=150) == [fresh.id]
    assert store.get(newer.id) is not None


def test_retention_counts_from_when_a_job_finished(store):
    long_job = store.create({"i": "long"})[0]  # created long ago, finished just now
    store.set_status(long_job.id, "running")
    store.clock.t += 100
    store.set_status(long_job.id, "succeeded", result={})
    assert store.enforce_retention(ttl_s=50, quota_bytes=None) == []
    store.clock.t += 51
    assert store.enforce_retention(ttl_s=50, quota_bytes=None) == [long_job.id]

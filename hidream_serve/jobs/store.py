"""The job store: SQLite (WAL) rows, an append-only event log per job, idempotency keys, results as PNG files.

Event ids are the log's INTEGER PRIMARY KEY, so they grow across all jobs and serve directly as SSE `Last-Event-ID`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
IDEMPOTENCY_WINDOW_S = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, request TEXT NOT NULL, result TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs(seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, body_hash TEXT NOT NULL, job_id TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    job_id TEXT NOT NULL, seed INTEGER NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (job_id, seed)
);
"""


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used within the window with a different body."""


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    request: dict
    result: dict | None
    error: dict | None


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    kind: str
    data: dict


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStore:
    def __init__(self, db_path: str | Path, results_dir: str | Path, clock=time.time):
        self.db_path = Path(db_path)
        self.results_dir = Path(results_dir)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def journal_mode(self) -> str:
        return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    # 1. jobs --------------------------------------------------------------------------------------------------
    def create(self, request: dict, idempotency_key: str | None = None, key_body: dict | None = None) -> tuple[Job, bool]:
        """Insert a queued job; returns (job, created). A repeated key with the same body returns the first job.
        `key_body` is the body the key is compared on (default `request`; the client's body when `request`
        holds values the server chose, such as random seeds)."""
        now = self._clock()
        digest = body_hash(request if key_body is None else key_body)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEMPOTENCY_WINDOW_S,))
                    row = self._db.execute(
                        "SELECT body_hash, job_id FROM idempotency WHERE key = ?", (idempotency_key,)
                    ).fetchone()
                    if row is not None:
                        if row[0] != digest:
                            raise IdempotencyConflict("Idempotency-Key: already used with a different body")
                        job = self._get(row[1])
                        if job is not None:
                            self._db.execute("COMMIT")
                            return job, False
                job_id = uuid.uuid4().hex
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
                self._db.execute(
                    "INSERT INTO jobs (id, seq, status, created_at, request) VALUES (?, ?, 'queued', ?, ?)",
                    (job_id, seq, now, json.dumps(request)),
                )
                if idempotency_key is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                        (idempotency_key, digest, job_id, now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(job_id), True

    def _get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(job_id)

    def set_status(self, job_id: str, status: str, *, result: dict | None = None, error: dict | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status: must be one of {STATUSES}, got {status!r}")
        now = self._clock()
        with self._lock:
            if status == "running":
                self._db.execute(
                    "UPDATE jobs SET status = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                    (status, now, job_id),
                )
            elif status == "queued":
                self._db.execute("UPDATE jobs SET status = ? WHERE id = ?", (status, job_id))
            else:
                self._db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ? WHERE id = ?",
                    (status, now, _dumps(result), _dumps(error), job_id),
                )

    def active(self) -> list[Job]:
        """Queued or running jobs, oldest first: what a restarted Jobs replica resumes."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq").fetchall()
        return [_job(r) for r in rows]

    def queue_position(self, job_id: str) -> int | None:
        """0-based among queued jobs (running jobs are ahead of all); None when not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1] != "queued":
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (row[0],)
            ).fetchone()[0]

    def list(self, *, status: str | None = None, limit: int = 20, cursor: int | None = None) -> tuple[list[Job], int | None]:
        """Newest first. `cursor` is the seq of the last job of the previous page; returns (jobs, next_cursor)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status: must be one of {STATUSES}, got {status!r}")
        if not 1 <= limit <= 100:
            raise ValueError(f"limit: must be in [1, 100], got {limit}")
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        if cursor is not None:
            sql += " AND seq < ?"
            args.append(cursor)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        jobs = [_job(r) for r in rows[:limit]]
        return jobs, (jobs[-1].seq if len(rows) > limit else None)

    # 2. events ------------------------------------------------------------------------------------------------
    def append_event(self, job_id: str, kind: str, data: dict) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (job_id, kind, data) VALUES (?, ?, ?)", (job_id, kind, json.dumps(data))
            )
            return cur.lastrowid

    def events(self, job_id: str, after: int = 0) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, kind, data FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
            ).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    # 3. candidates (resume bookkeeping) and result files ------------------------------------------------------
    def image_path(self, job_id: str, seed: int) -> Path:
        return self.results_dir / job_id / f"{int(seed)}.png"

    def save_candidate(self, job_id: str, seed: int, png: bytes, meta: dict) -> Path:
        """Write the PNG atomically, then record the candidate: a recorded candidate always has its file."""
        path = self.image_path(job_id, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO candidates VALUES (?, ?, ?)", (job_id, int(seed), json.dumps(meta)))
        return path

    def candidates(self, job_id: str) -> dict[int, dict]:
        """Stored candidates by seed; on resume these are kept and only the other seeds recomputed."""
        with self._lock:
            rows = self._db.execute("SELECT seed, meta FROM candidates WHERE job_id = ?", (job_id,)).fetchall()
        return {seed: json.loads(meta) for seed, meta in rows if self.image_path(job_id, seed).is_file()}

    # 4. retention ---------------------------------------------------------------------------------------------
    def _dir_bytes(self, job_id: str) -> int:
        d = self.results_dir / job_id
        return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.is_dir() else 0

    def delete(self, job_id: str) -> None:
        with self._lock:
            for table, col in (("events", "job_id"), ("candidates", "job_id"), ("idempotency", "job_id"), ("jobs", "id")):
                self._db.execute(f"DELETE FROM {table} WHERE {col} = ?", (job_id,))
        shutil.rmtree(self.results_dir / job_id, ignore_errors=True)

    def enforce_retention(self, ttl_s: float, quota_bytes: int | None) -> list[str]:
        """Delete the jobs that finished more than ttl_s ago, then the earliest finished first while results exceed
        quota_bytes. Queued and running jobs are never deleted."""
        now = self._clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, COALESCE(finished_at, created_at) AS ended FROM jobs"
                " WHERE status NOT IN ('queued', 'running') ORDER BY ended, seq"
            ).fetchall()
        deleted = [job_id for job_id, ended in rows if now - ended > ttl_s]
        kept = [job_id for job_id, _ in rows if job_id not in set(deleted)]
        if quota_bytes is not None:
            sizes = {j: self._dir_bytes(j) for j in kept}
            active_bytes = sum(self._dir_bytes(j.id) for j in self.active())
            total = sum(sizes.values()) + active_bytes
            for job_id in kept:
                if total <= quota_bytes:
                    break
                total -= sizes[job_id]
                deleted.append(job_id)
        for job_id in deleted:
            self.delete(job_id)
        return deleted


def _dumps(value) -> str | None:
    return None if value is None else json.dumps(value)


def _job(row) -> Job:
    id_, seq, status, created, started, finished, request, result, error = row
    return Job(
        id_, seq, status, created, started, finished, json.loads(request),
        None if result is None else json.loads(result), None if error is None else json.loads(error),
    )  # fmt: skip

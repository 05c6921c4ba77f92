"""The jobs API's command-line client: `hidream-serve submit`, `hidream-serve jobs`, `hidream-serve cancel`.

HTTP through httpx only (no Ray, no torch), so it runs anywhere the server is reachable. `submit` follows the
job's Server-Sent Events (reconnecting with `Last-Event-ID` when the stream drops), draws a progress bar per
candidate, then writes every candidate's PNG and the job as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

try:
    import httpx
except ImportError:  # the client extra; the engine commands do not need it
    httpx = None

from .vocabulary import MODES, ROLES

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")  # as hidream_serve.api.jobs_protocol (which imports pydantic)
EXIT_OK, EXIT_JOB_ENDED_BADLY, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class ClientError(Exception):
    """A refused request or an unreachable server; `field` names the bad input where the server said."""

    def __init__(self, message: str, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status

    def __str__(self) -> str:
        where = f"HTTP {self.status}: " if self.status else ""
        return f"{where}{self.field}: {self.message}" if self.field else f"{where}{self.message}"


@dataclass
class Event:
    id: int
    kind: str
    data: dict


# -- request building ---------------------------------------------------------------------------------
def parse_ref(spec: str) -> dict:
    """`PATH` or `PATH:ROLE` to a ref `{"image": base64, "role"?}` (a path that exists as given keeps its colons)."""
    path, role = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and not Path(spec).exists() and tail in ROLES:
        path, role = head, tail
    elif sep and not Path(spec).exists() and head and "/" not in tail:
        raise ClientError(f"unknown role {tail!r} in {spec!r} (one of {', '.join(ROLES)})", field="--ref")
    try:
        ref = {"image": base64.b64encode(Path(path).read_bytes()).decode()}
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror or e}", field="--ref") from None
    if role:
        ref["role"] = role
    return ref


def parse_set(item: str) -> tuple[str, object]:
    """`KEY=VALUE`; VALUE is JSON where it parses (`steps=4`, `prune={"at": 0.5}`), else a string (`recipe=dev`)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ClientError(f"expected KEY=VALUE, got {item!r}", field="--set")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_job(args: argparse.Namespace) -> dict:
    body: dict = {"mode": args.mode, "prompt": args.prompt}
    if args.ref:
        body["refs"] = [parse_ref(r) for r in args.ref]
    for name in ("n", "seed", "steps", "width", "height"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.exact_size:
        body["exact_size"] = True
    for item in args.set:
        key, value = parse_set(item)
        body[key] = value
    return body


# -- HTTP ---------------------------------------------------------------------------------------------
def _refusal(r) -> ClientError:
    try:
        err = r.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    return ClientError(err.get("message") or r.text[:500] or r.reason_phrase, err.get("field"), r.status_code)


class JobsClient:
    """The jobs endpoints of one server. `reconnects` bounds how often a dropped event stream is resumed."""

    def __init__(self, server: str, timeout: float = 60.0, reconnects: int = 20, transport=None):
        if httpx is None:
            raise ClientError("the client needs httpx: pip install 'hidream-serve[client]'")
        self.server = server.rstrip("/")
        self.reconnects = reconnects
        self.http = httpx.Client(base_url=self.server, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw):
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.server}: {e}") from None
        if r.status_code >= 400:
            raise _refusal(r)
        return r

    def submit(self, body: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def submit_sweep(self, body: dict) -> dict:
        """POST /v1/sweeps (hidream_serve/sweeps_client.py); the sweep is then a job like any other."""
        return self._call("POST", "/v1/sweeps", json=body).json()

    def get(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def download(self, url: str) -> bytes:
        return self._call("GET", url).content

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """One connection to the event stream, from after `last_event_id`."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                raise _refusal(r)
            yield from parse_sse(r.iter_lines())

    def follow(self, job_id: str) -> Iterator[Event]:
        """Every event of the job up to its final one, resuming after the last one seen when the stream drops."""
        last, drops = None, 0
        while True:
            try:
                for event in self.events(job_id, last):
                    last, drops = event.id, 0
                    yield event
                    if event.kind in TERMINAL:
                        return
                reason = "the stream ended before the job did"
            except httpx.TransportError as e:  # connection reset, read timeout, truncated chunk...
                reason = f"{type(e).__name__}: {e}"
            drops += 1
            if drops > self.reconnects:
                raise ClientError(f"lost the event stream {drops} times in a row ({reason})")
            time.sleep(min(0.2 * 2**drops, 5.0))


def parse_sse(lines) -> Iterator[Event]:
    """Server-Sent Events from text lines; comment lines (the keep-alives) are skipped."""
    fields: dict = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data and "id" in fields:
                yield Event(int(fields["id"]), fields.get("event", "message"), json.loads("\n".join(data)))
            fields, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


# -- progress -----------------------------------------------------------------------------------------
class Progress:
    """Per-candidate progress from job events: bars redrawn in place on a terminal, plain lines elsewhere
    (a line per candidate each tenth of its steps, and one per other event)."""

    BAR = 30

    def __init__(self, out: TextIO, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.rows: dict[int, dict] = {}  # seed -> {step, steps, note}
        self.drawn = 0

    def handle(self, event: Event) -> None:
        d, kind = event.data, event.kind
        if kind == "queued":
            self._say(f"queued (position {d.get('position')})")
        elif kind == "started":
            for s in d.get("seeds", []):
                self.rows.setdefault(s, {"step": 0, "steps": 0, "note": ""})
            self._say(f"started: seeds {d.get('seeds')}")
        elif kind == "progress":
            row = self.rows.setdefault(d["seed"], {"step": 0, "steps": 0, "note": ""})
            before = self._tenth(row)
            row["step"], row["steps"] = d["step"], d["steps"]
            if self.tty:
                self._draw()
            elif self._tenth(row) > before:
                self._line(f"seed {d['seed']}: step {d['step']}/{d['steps']}")
        elif kind == "preview":
            self._note(d["seed"], f"preview at step {d['step']}", show=not self.tty)
        elif kind == "candidate":
            what = f"pruned at step {d.get('pruned_at_step')}" if d.get("pruned") else "done"
            self._note(d["seed"], what, show=True)
        elif kind == "scored":
            for c in d.get("candidates", []):
                if c.get("score") is not None:
                    self._note(c["seed"], f"score {c['score']:.3f}", show=False)
            self._say(f"scored: winner seed {d.get('winner')}" if d.get("scored") else "not scored")
        elif kind in TERMINAL:
            self._say(kind)

    @staticmethod
    def _tenth(row: dict) -> int:
        return 10 * row["step"] // row["steps"] if row["steps"] else 0

    def _note(self, seed: int, note: str, show: bool) -> None:
        self.rows.setdefault(seed, {"step": 0, "steps": 0, "note": ""})["note"] = note
        if self.tty:
            self._draw()
        elif show:
            self._line(f"seed {seed}: {note}")

    def _say(self, text: str) -> None:
        if self.tty and self.drawn:  # the message goes above the bars, which stay at the bottom
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0
        self._line(text)
        if self.tty and self.rows:
            self._draw()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _draw(self) -> None:
        width = max((len(str(s)) for s in self.rows), default=1)
        lines = []
        for seed, row in self.rows.items():
            filled = self.BAR * row["step"] // row["steps"] if row["steps"] else 0
            bar = "#" * filled + "-" * (self.BAR - filled)
            lines.append(f"seed {seed:>{width}} [{bar}] {row['step']:>3}/{row['steps'] or '?':<3} {row['note']}")
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)


# -- commands -----------------------------------------------------------------------------------------
def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("HIDREAM_SERVER", DEFAULT_SERVER),
                   help=f"the service's base URL (default $HIDREAM_SERVER or {DEFAULT_SERVER})")  # fmt: skip


def add_parsers(sub) -> None:
    p = sub.add_parser("submit", help="submit a job to a server, follow its progress, download the results")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", action="append", default=[], metavar="PATH[:ROLE]",
                   help=f"reference image, in order (repeat); ROLE one of {', '.join(ROLES)}")  # fmt: skip
    p.add_argument("--n", type=int, help="best-of-N candidates")
    p.add_argument("--seed", type=int, help="first seed (candidates use seed, seed+1, ...)")
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--exact-size", action="store_true", help="use width/height as given (multiples of 32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other request field; VALUE is JSON, or a string (repeat)")  # fmt: skip
    p.add_argument("--idempotency-key", help="the same key and body within 24 h give the same job")
    p.add_argument("--out", type=Path, help="directory for <seed>.png and result.json (required unless --no-wait)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    _server_arg(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list a server's jobs, newest first")
    p.add_argument("--status", choices=("queued", "running", *TERMINAL))
    p.add_argument("--limit", type=int, default=20, help="jobs per page (1-100)")
    p.add_argument("--all", action="store_true", help="follow next_cursor through every page")
    _server_arg(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("id")
    _server_arg(p)
    p.set_defaults(func=cmd_cancel)


def _run(command) -> int:
    try:
        return command()
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


def cmd_submit(args: argparse.Namespace) -> int:
    if args.out is None and not args.no_wait:
        print("error: --out: a directory is needed (or --no-wait)", file=sys.stderr)
        return EXIT_REFUSED

    def submit() -> int:
        body = build_job(args)
        client = JobsClient(args.server)
        try:
            created = client.submit(body, args.idempotency_key)
            if args.no_wait:
                print(created["id"])
                return EXIT_OK
            print(f"job {created['id']} {created['status']}", flush=True)
            return wait_and_save(client, created["id"], args.out, Progress(sys.stdout))
        finally:
            client.close()

    return _run(submit)


def wait_and_save(client: JobsClient, job_id: str, out: Path, progress: Progress) -> int:
    """Follow the job to its end, write its images and result.json under `out`; the exit code."""
    last = None
    try:
        for event in client.follow(job_id):
            progress.handle(event)
            last = event
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (hidream-serve cancel {job_id})", file=sys.stderr)
        return EXIT_INTERRUPTED
    job = client.get(job_id)
    out.mkdir(parents=True, exist_ok=True)
    if job["status"] == "succeeded":
        urls = {c["seed"]: c["url"] for c in job["result"]["candidates"] if c.get("url")}
    else:  # a cancelled job keeps the candidates that finished (its final event lists them)
        urls = {c["seed"]: c["url"] for c in (last.data.get("candidates") or []) if c.get("url")} if last else {}
    saved = []
    for seed, url in urls.items():
        path = out / f"{seed}.png"
        path.write_bytes(client.download(url))
        saved.append(str(path))
    (out / "result.json").write_text(json.dumps(job, indent=2) + "\n")
    if job["status"] == "succeeded":
        winner = job["result"]["winner"]
        score = "unscored" if winner.get("score") is None else f"score {winner['score']:.3f}"
        print(f"winner seed {winner['seed']} ({score}); wrote {_images(saved)} and result.json to {out}")
        for w in job["result"].get("warnings") or []:
            print(f"warning: {w}", file=sys.stderr)
        return EXIT_OK
    if job["status"] == "failed":
        err = job.get("error") or {}
        where = f"{err['field']}: " if err.get("field") else ""
        print(f"error: job {job_id} failed: {where}{err.get('message', 'no message')}", file=sys.stderr)
    else:
        print(f"error: job {job_id} {job['status']}; wrote {_images(saved)} that had finished and result.json to {out}",
              file=sys.stderr)  # fmt: skip
    return EXIT_JOB_ENDED_BADLY


def _images(saved: list) -> str:
    return f"{len(saved)} image" + ("" if len(saved) == 1 else "s")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    def list_jobs() -> int:
        client = JobsClient(args.server)
        try:
            rows, cursor = [], None
            while True:
                page = client.list(args.status, args.limit, cursor)
                rows.extend(page["data"])
                cursor = page.get("next_cursor")
                if not args.all or not cursor:
                    break
        finally:
            client.close()
        print(f"{'id':<34} {'status':<10} {'mode':<8} {'created':<19} steps")
        for j in rows:
            print(f"{j['id']:<34} {j['status']:<10} {j['mode']:<8} {_when(j['created_at']):<19} "
                  f"{j['steps_done']}/{j['steps_total']}")  # fmt: skip
        if cursor:
            print(f"(more: --all, or the next page's cursor {cursor})")
        return EXIT_OK

    return _run(list_jobs)


def cmd_cancel(args: argparse.Namespace) -> int:
    def cancel() -> int:
        client = JobsClient(args.server)
        try:
            job = client.cancel(args.id)
        finally:
            client.close()
        if job["status"] == "cancelled":
            print(f"job {job['id']} cancelled")
            return EXIT_OK
        print(f"error: job {job['id']} had already ended: {job['status']}", file=sys.stderr)
        return EXIT_JOB_ENDED_BADLY

    return _run(cancel)

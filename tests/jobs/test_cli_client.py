"""The jobs CLI (`hidream-serve submit | jobs | cancel`, hidream_serve/client.py) against the real service on the
embedded default: progress from the event stream, results written, listing, cancel, refusals naming the field,
and a dropped event stream resumed with Last-Event-ID."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from PIL import Image
from tests._images import noise_image
from tests._serve import running_service

from hidream_serve.cli import main
from hidream_serve.client import Event, JobsClient, Progress, parse_ref

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SMALL = ["--width", "128", "--height", "128", "--exact-size", "--steps", "4"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.jobs.test_jobs_api import OPTIONS, service_args

    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS) as client:
        yield client


@pytest.fixture
def server(service):
    return str(service.base_url).rstrip("/")


def test_submit_shows_progress_and_writes_every_candidate(service, server, tmp_path, capsys):
    face = tmp_path / "face.png"
    noise_image(64, 64, 3).save(face)
    out = tmp_path / "run"
    code = main(["submit", "--mode", "ip", "--prompt", "the face on a beach", "--ref", f"{face}:face", "--n", "2",
                 "--seed", "5", *SMALL, "--out", str(out), "--server", server])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.splitlines()
    for seed in (5, 6):
        steps = [ln for ln in lines if ln.startswith(f"seed {seed}: step ")]
        assert steps == [f"seed {seed}: step {i}/4" for i in range(1, 5)]
        assert f"seed {seed}: preview at step 2" in lines and f"seed {seed}: done" in lines
    assert lines.index("started: seeds [5, 6]") < lines.index("succeeded")
    assert any(ln.startswith("scored: winner seed ") for ln in lines)

    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps_done"] == result["steps_total"] == 8
    assert result["result"]["winner"]["seed"] in (5, 6)
    assert lines[0] == f"job {result['id']} queued"
    for seed in (5, 6):
        png = Image.open(out / f"{seed}.png")
        assert png.format == "PNG" and png.size == (128, 128)
        assert png.text["seed"] == str(seed) and png.text["prompt"] == "the face on a beach"
        served = service.get(f"/v1/jobs/{result['id']}/images/{seed}.png").content
        assert (out / f"{seed}.png").read_bytes() == served


def test_no_wait_and_the_jobs_listing(service, server, capsys):
    ids = []
    for prompt in ("listed one", "listed two"):
        assert main(["submit", "--mode", "t2i", "--prompt", prompt, "--width", "128", "--height", "128",
                     "--exact-size", "--steps", "2", "--no-wait", "--server", server]) == 0  # fmt: skip
        ids.append(capsys.readouterr().out.strip())
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]
    deadline = time.time() + 60
    while any(service.get(f"/v1/jobs/{i}").json()["status"] != "succeeded" for i in ids):
        assert time.time() < deadline
        time.sleep(0.3)

    assert main(["jobs", "--limit", "1", "--status", "succeeded", "--server", server]) == 0
    one_page = capsys.readouterr().out.splitlines()
    assert len(one_page) == 3 and one_page[1].split()[0] == ids[1] and "--all" in one_page[2]

    assert main(["jobs", "--limit", "1", "--all", "--server", server]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    for i in ids:  # id, status, mode, date, time, steps
        assert rows[i][1:3] == ["succeeded", "t2i"] and rows[i][5] == "2/2"

    assert main(["cancel", ids[0], "--server", server]) == 1
    assert f"job {ids[0]} had already ended: succeeded" in capsys.readouterr().err


def test_cancel_of_a_long_job_ends_the_waiting_submit(service, server, tmp_path, capsys):
    out = tmp_path / "cancelled"
    codes = []
    argv = ["submit", "--mode", "t2i", "--prompt", "a slow one", "--n", "2", "--seed", "1", "--width", "512",
            "--height", "512", "--exact-size", "--steps", "200", "--out", str(out), "--server", server]  # fmt: skip
    waiting = threading.Thread(target=lambda: codes.append(main(argv)))
    waiting.start()
    deadline = time.time() + 60
    while True:
        running = service.get("/v1/jobs", params={"status": "running"}).json()["data"]
        job = next((j for j in running if j["steps_done"] > 0), None)
        if job is not None:
            break
        assert time.time() < deadline
        time.sleep(0.2)
    assert main(["cancel", job["id"], "--server", server]) == 0
    waiting.join(60)
    printed = capsys.readouterr()
    assert codes == [1]
    assert f"job {job['id']} cancelled\n" in printed.out
    assert f"error: job {job['id']} cancelled" in printed.err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "cancelled" and result["steps_done"] < result["steps_total"] == 400
    assert main(["cancel", job["id"], "--server", server]) == 0  # idempotent


def test_refusals_print_the_field(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIDREAM_SERVER", server)  # the default --server
    out = str(tmp_path / "never")
    assert main(["submit", "--mode", "t2i", "--prompt", "x", "--steps", "0", "--out", out]) == 2
    assert "error: HTTP 422: steps: " in capsys.readouterr().err
    assert main(["submit", "--mode", "t2i", "--prompt", "x", "--set", "bogus=1", "--out", out]) == 2
    assert "error: HTTP 422: bogus: " in capsys.readouterr().err
    assert main(["submit", "--mode", "t2i", "--prompt", "x", "--ref", str(tmp_path / "missing.png"), "--out", out]) == 2
    assert "error: --ref: cannot read " in capsys.readouterr().err
    assert main(["cancel", "nope"]) == 2
    assert "error: HTTP 404: id: " in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


class _CutAfterFirstEvent(httpx.SyncByteStream):
    """The first event, then half of the next, then a dropped connection."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        buf = b""
        for chunk in self.inner:
            buf += chunk
            end = buf.find(b"\n\n", buf.find(b"id: "))
            if end >= 0 and b"id: " in buf[end:]:
                cut = buf.find(b"id: ", end) + 8
                yield buf[:cut]
                raise httpx.RemoteProtocolError("peer closed connection")

    def close(self):
        self.inner.close()


class _DropsTheFirstStream(httpx.BaseTransport):
    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.last_event_ids: list[str | None] = []

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/events"):
            self.last_event_ids.append(request.headers.get("last-event-id"))
            if len(self.last_event_ids) == 1:
                response.stream = _CutAfterFirstEvent(response.stream)
        return response

    def close(self):
        self.inner.close()


def test_a_dropped_event_stream_resumes_with_last_event_id(service, server):
    job_id = service.post("/v1/jobs", json={"mode": "t2i", "prompt": "resume me", "n": 2, "seed": 3, "width": 128,
                                            "height": 128, "exact_size": True, "steps": 4}).json()["id"]  # fmt: skip
    transport = _DropsTheFirstStream()
    client = JobsClient(server, transport=transport)
    try:
        got = list(client.follow(job_id))
        whole = list(client.events(job_id))
    finally:
        client.close()
    assert transport.last_event_ids[:2] == [None, str(got[0].id)]
    assert [(e.id, e.kind) for e in got] == [(e.id, e.kind) for e in whole]
    assert got[0].kind == "queued" and got[-1].kind == "succeeded"


def test_terminal_bars_redraw_in_place():
    screen = io.StringIO()
    progress = Progress(screen, tty=True)
    progress.handle(Event(1, "started", {"seeds": [7, 8]}))
    progress.handle(Event(2, "progress", {"seed": 7, "step": 2, "steps": 4}))
    progress.handle(Event(3, "progress", {"seed": 8, "step": 4, "steps": 4}))
    progress.handle(Event(4, "candidate", {"seed": 8, "pruned": False}))
    frames = screen.getvalue().split("\x1b[2F")
    assert len(frames) == 4  # the first drawing, then three redraws two lines up
    last = frames[-1]
    assert "seed 7 [" + "#" * 15 + "-" * 15 + "]   2/4" in last
    assert "seed 8 [" + "#" * 30 + "]   4/4   done" in last


def test_refs_with_roles(tmp_path):
    img = tmp_path / "a:b.png"  # a colon in the file name itself
    img.write_bytes(b"png")
    assert parse_ref(str(img)) == {"image": "cG5n"}
    assert parse_ref(f"{img}:garment") == {"image": "cG5n", "role": "garment"}
    with pytest.raises(Exception, match="unknown role 'hat'"):
        parse_ref(f"{img}:hat")

"""The jobs API over HTTP on the embedded default (Ray Serve in-process, tiny models, CPU): events over SSE,
images by URL, cancel, idempotency, errors, and a killed Jobs replica resuming its job."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image
from tests._serve import cpu_options, running_service, tiny_app_args

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LIMITS = {"max_n": 8, "max_steps": 200, "max_pixels": 512 * 512, "max_refs": 4, "max_image_bytes": 200_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip
SMALL = {"width": 128, "height": 128, "exact_size": True, "steps": 4}
WEBHOOK_SECRET = "test-webhook-secret-0123456789"


def service_args(**over):
    return tiny_app_args(
        router={"seeds_per_call": 2, "generate_timeout_s": 120, "score_timeout_s": 60, "retry_after_s": 1},
        defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4}, limits=LIMITS,
        jobs={"preview_at": [0.5], "preview_size": 64, "webhook_secret": WEBHOOK_SECRET, "webhook_backoff_s": 0.2,
              **over.pop("jobs", {})}, **over,
    )  # fmt: skip


OPTIONS = cpu_options({"num_replicas": 2, "max_ongoing_requests": 1}, jobs={"health_check_period_s": 1})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS) as client:
        yield client


def submit(client, body, status=202, headers=None):
    r = client.post("/v1/jobs", json=body, headers=headers or {})
    assert r.status_code == status, r.text[:2000]
    return r.json()


def events(client, job_id, last_event_id=None, timeout=120):
    """Read the SSE stream to its end: [(id, kind, data)]."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    out, cur = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id: "):
                cur["id"] = int(line[4:])
            elif line.startswith("event: "):
                cur["kind"] = line[7:]
            elif line.startswith("data: "):
                cur["data"] = json.loads(line[6:])
            elif line == "" and cur:
                out.append((cur["id"], cur["kind"], cur["data"]))
                cur = {}
    return out


def wait_done(client, job_id, timeout=180):
    """Poll until the job has ended (answers other than 200, e.g. while a Jobs replica restarts, are retried)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
            return r.json()
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {r.text[:1000]}")


def wait_for_event(client, job_id, kind):
    """Block until the job's event stream reaches an event of this kind."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as r:
        for line in r.iter_lines():
            if line == f"event: {kind}":
                return
    raise AssertionError(f"job {job_id} ended without a {kind} event")


def test_best_of_4_job_streams_events_and_serves_images(service):
    body = {"mode": "t2i", "prompt": "a red fox in snow", "n": 4, "seed": 7, **SMALL, "return": "all"}
    created = submit(service, body)
    assert created["status"] == "queued" and set(created["urls"]) == {"self", "events", "cancel", "result"}
    evs = events(service, created["id"])
    kinds = [k for _, k, _ in evs]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "succeeded"
    assert kinds.index("scored") < kinds.index("succeeded")
    assert {d["seed"] for _, k, d in evs if k == "candidate"} == {7, 8, 9, 10}
    progress = [d for _, k, d in evs if k == "progress"]
    # every step of every candidate; a heartbeat may repeat a candidate's last step (step 0 before its first)
    stepped = {(d["seed"], d["step"]) for d in progress if d["step"]}
    assert stepped == {(s, i) for s in range(7, 11) for i in range(1, 5)}
    for s in range(7, 11):
        steps = [d["step"] for d in progress if d["seed"] == s]
        assert steps == sorted(steps)
    previews = [d for _, k, d in evs if k == "preview"]
    assert {d["seed"] for d in previews} == {7, 8, 9, 10} and all(d["step"] == 2 for d in previews)
    img = Image.open(io.BytesIO(base64.b64decode(previews[0]["image"])))
    assert img.format == "JPEG" and max(img.size) <= 64
    ids = [i for i, _, _ in evs]
    assert ids == sorted(ids)

    job = service.get(created["urls"]["self"]).json()
    assert job["status"] == "succeeded" and job["steps_done"] == job["steps_total"] == 16
    assert all(c["step"] == 4 and c["score"] is not None for c in job["candidates"])
    result = job["result"]
    assert result["winner"]["url"] == f"/v1/jobs/{job['id']}/images/{result['winner']['seed']}.png"
    assert result["steps_computed"] == result["steps_full"] == 16 and result["scored"]

    # the images download by URL, carry their text chunks, and equal the synchronous call's for these seeds
    sync = service.post("/v1/generate/t2i", json={k: v for k, v in body.items() if k != "mode"}).json()
    sync_png = {c["seed"]: base64.b64decode(c["image"]) for c in sync["candidates"]}
    for c in result["candidates"]:
        r = service.get(c["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        png = Image.open(io.BytesIO(r.content))
        assert png.text["seed"] == str(c["seed"]) and png.text["prompt"] == body["prompt"]
        assert png.tobytes() == Image.open(io.BytesIO(sync_png[c["seed"]])).tobytes()

    # a late client gets the events so far; Last-Event-ID resumes after an id
    assert [k for _, k, _ in events(service, job["id"])] == kinds
    assert [i for i, _, _ in events(service, job["id"], last_event_id=ids[3])] == ids[4:]

    # the synchronous call was a job too: listed, newest first, with its images by URL
    listed = service.get("/v1/jobs", params={"status": "succeeded", "limit": 2}).json()
    assert [j["id"] for j in listed["data"]] == [sync["job_id"], job["id"]] and listed["next_cursor"] is None
    sync_job = service.get(f"/v1/jobs/{sync['job_id']}").json()
    assert sync_job["result"]["winner"]["seed"] == sync["winner"]["seed"]
    assert service.get(sync_job["result"]["winner"]["url"]).content == base64.b64decode(sync["winner"]["image"])


def test_cancel_stops_the_gpu_work_within_a_step(service):
    body = {"mode": "t2i", "prompt": "a slow one", "n": 2, "seed": 1, "width": 512, "height": 512,
            "exact_size": True, "steps": 200}  # fmt: skip
    job_id = submit(service, body)["id"]
    deadline = time.time() + 120
    while service.get(f"/v1/jobs/{job_id}").json()["steps_done"] == 0:
        assert time.time() < deadline, "the job never took a step"
        time.sleep(0.1)
    cancelled = service.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert events(service, job_id)[-1][1] == "cancelled"
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert 0 < job["steps_done"] < job["steps_total"] == 400  # the steps done before the cancel are kept
    assert service.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # idempotent


def test_a_synchronous_call_is_a_job_that_the_jobs_api_can_cancel(service):
    """POST /v1/generate/{mode} runs as a job: it is listed while it runs, and cancelling that job ends the waiting
    call with a 409 naming `id`."""
    body = {"prompt": "a slow call", "n": 2, "seed": 3, "width": 512, "height": 512, "exact_size": True,
            "steps": 200}  # fmt: skip
    answer = {}
    call = threading.Thread(target=lambda: answer.update(r=service.post("/v1/generate/t2i", json=body)))
    call.start()
    deadline = time.time() + 120
    while True:
        running = [j for j in service.get("/v1/jobs", params={"status": "running"}).json()["data"]
                   if j["steps_done"] > 0]  # fmt: skip
        if running:
            break
        assert time.time() < deadline and call.is_alive(), "the call's job never ran"
        time.sleep(0.1)
    job_id = running[0]["id"]
    assert service.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    call.join(timeout=60)
    r = answer["r"]
    assert r.status_code == 409 and r.json()["error"]["field"] == "id" and job_id in r.json()["error"]["message"]
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and 0 < job["steps_done"] < job["steps_total"] == 400


def test_idempotent_resubmit_and_errors(service):
    body = {"mode": "t2i", "prompt": "same job twice", **SMALL}
    key = {"Idempotency-Key": "k-123"}
    first = submit(service, body, headers=key)
    again = submit(service, body, headers=key)
    assert again["id"] == first["id"]
    other = service.post("/v1/jobs", json={**body, "prompt": "another"}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert submit(service, body)["id"] != first["id"]  # no key: a new job

    bad = service.post("/v1/jobs", json={"mode": "t2i", "prompt": "x", "steps": 0})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"
    nomode = service.post("/v1/jobs", json={"prompt": "x"})
    assert nomode.status_code == 422 and nomode.json()["error"]["field"] == "mode"
    r = service.get("/v1/jobs/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert service.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    wait_done(service, first["id"])
    assert service.get(f"/v1/jobs/{first['id']}/images/999.png").status_code == 404


def _jobs_actor():
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "#Jobs#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError("no Jobs replica")


def test_killed_jobs_replica_resumes_the_job_with_the_same_images(service):
    body = {"mode": "t2i", "prompt": "survives a crash", "n": 4, "seed": 100, "width": 256, "height": 256,
            "exact_size": True, "steps": 30}  # fmt: skip
    job_id = submit(service, body)["id"]
    wait_for_event(service, job_id, "candidate")  # one group stored, the other still running
    ray.kill(_jobs_actor(), no_restart=True)
    job = wait_done(service, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    sync = service.post("/v1/generate/t2i", json={k: v for k, v in body.items() if k != "mode"} | {"return": "all"})
    sync_png = {c["seed"]: base64.b64decode(c["image"]) for c in sync.json()["candidates"]}
    for c in job["result"]["candidates"]:
        got = Image.open(io.BytesIO(service.get(c["url"]).content)).tobytes()
        assert got == Image.open(io.BytesIO(sync_png[c["seed"]])).tobytes()


def test_webhook_is_signed_and_retried(service):
    import hashlib
    import hmac
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) == 1 else 200)  # the first delivery fails: retried
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        job_id = submit(service, {"mode": "t2i", "prompt": "tell me when done", **SMALL,
                                  "webhook": {"url": url, "events": ["started", "succeeded"]}})["id"]  # fmt: skip
        deadline = time.time() + 60
        while len(received) < 3:  # started (answered 500), started again, succeeded: in any order
            assert time.time() < deadline, (received, service.get(f"/v1/jobs/{job_id}").json())
            time.sleep(0.2)
    finally:
        server.shutdown()
    kinds = [h["X-HiDream-Event"] for h, _ in received]
    assert sorted(kinds) == ["started", "started", "succeeded"]  # the first delivery got a 500 and was sent again
    for headers, body in received:
        ts = headers["X-HiDream-Timestamp"]
        want = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["X-HiDream-Signature"] == want
    final = json.loads([b for h, b in received if h["X-HiDream-Event"] == "succeeded"][-1])
    assert final["id"] == job_id and final["status"] == "succeeded" and final["result"]["winner"]["url"]

    bad = service.post("/v1/jobs", json={"mode": "t2i", "prompt": "x", "webhook": {"url": "ftp://x"}})
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("webhook")

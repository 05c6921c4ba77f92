"""The web studio in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) on
the whole service in-process (Ray Serve, the embedded tiny models, CPU). Every host but 127.0.0.1 is unresolvable
in the browser, so a page that needed the internet would log errors or fail to render.

Set HIDREAM_STUDIO_SCREENSHOTS=DIR to keep the screenshots: DIR/studio.png, the finished best-of-2 job
(docs/studio.png is one), and DIR/studio-sweep.png.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytest.importorskip("ray")
pytest.importorskip("httpx")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]  # fmt: skip
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LIMITS = {"max_n": 8, "max_steps": 200, "max_pixels": 512 * 512, "max_refs": 4, "max_image_bytes": 400_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip
OPTIONS = cpu_options({"num_replicas": 1, "max_ongoing_requests": 1})
PROMPT = "a red fox in the snow, soft morning light"


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "generate_timeout_s": 120, "score_timeout_s": 60, "retry_after_s": 1},
        defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4}, limits=LIMITS,
        jobs={"preview_at": [0.25, 0.5, 0.75], "preview_size": 128},
    )  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def browser(service):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-first-run",
                "--disable-background-networking", "--disable-component-update"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a path: no Selenium Manager
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def url(service, path="/") -> str:
    return f"{service.base_url}".rstrip("/") + path


def console_errors(driver, allow: str | None = None) -> list[str]:
    """The browser console's errors since the last call (reading the log drains it)."""
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return [m for m in severe if not (allow and re.search(allow, m))]


def wait(driver, condition, timeout=120, what="condition"):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def open_studio(driver, service):
    driver.get(url(service, "/"))
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 60, "page ready")


def set_value(driver, css: str, value: str):
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    if value:
        field.send_keys(value)


def fill_small_job(driver, prompt=PROMPT, n="2", steps="4"):
    driver.find_element(By.CSS_SELECTOR, "#mode option[value='t2i']").click()
    set_value(driver, "#prompt", prompt)
    set_value(driver, "#n", n)
    details = driver.find_element(By.ID, "advanced")
    if not details.get_attribute("open"):
        details.find_element(By.TAG_NAME, "summary").click()
    set_value(driver, "#steps", steps)
    set_value(driver, "#seed", "7")
    set_value(driver, "#width", "128")
    set_value(driver, "#height", "128")


def screenshot(driver, tmp_path, name):
    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("HIDREAM_STUDIO_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["HIDREAM_STUDIO_SCREENSHOTS"]) / name)


def test_page_loads_with_no_console_errors(service, browser):
    open_studio(browser, service)
    modes = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#mode option")]
    assert modes == ["t2i", "edit", "ip", "skeleton", "layout"]
    roles_known = browser.execute_script("return state.models.ref_roles")
    assert "face" in roles_known
    assert "tiny" in browser.find_element(By.ID, "server-info").text
    # every resource the page loaded came from this server
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url(service, "/")) for r in resources), resources
    assert console_errors(browser) == []


def test_presets_are_offered_when_the_server_has_them(service, browser):
    open_studio(browser, service)
    paths = service.get("/openapi.json").json()["paths"]
    preset_field = browser.find_element(By.ID, "preset-field")
    if "/v1/presets" not in paths:
        assert not preset_field.is_displayed()  # degrades: no selector, and no 404 in the console
        assert console_errors(browser) == []
        return
    names = [p["name"] for p in service.get("/v1/presets").json()["data"]]
    offered = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#preset option")][1:]
    assert preset_field.is_displayed() and offered == names
    preset = service.get("/v1/presets").json()["data"][0]
    browser.find_element(By.CSS_SELECTOR, f"#preset option[value='{preset['name']}']").click()
    assert browser.find_element(By.ID, "mode").get_attribute("value") == preset["mode"]
    assert browser.find_element(By.ID, "preset-note").is_displayed()
    assert json.loads(browser.execute_script("return JSON.stringify(buildRequest())"))["preset"] == preset["name"]
    browser.find_element(By.CSS_SELECTOR, "#preset option[value='']").click()
    assert console_errors(browser) == []


def test_reference_images_get_roles_and_reach_the_server(service, browser, tmp_path):
    from PIL import Image

    open_studio(browser, service)
    path = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(path)
    browser.find_element(By.ID, "ref-files").send_keys(str(path))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#refs li img"), 10, "the ref's thumbnail")
    browser.find_element(By.CSS_SELECTOR, "#refs li select option[value='style']").click()
    body = json.loads(browser.execute_script("return JSON.stringify(buildRequest())"))
    assert body["refs"][0]["role"] == "style" and body["refs"][0]["image"].startswith("data:image/png;base64,")
    # a second image dropped on the drop zone (a real DragEvent carrying a File)
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    """, base64.b64encode(path.read_bytes()).decode())  # fmt: skip
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#refs li img")) == 2, 10, "the dropped ref")
    assert "dropped.png" in browser.find_element(By.ID, "refs").text
    browser.find_element(By.CSS_SELECTOR, "#refs li:nth-child(2) select option[value='face']").click()
    body = json.loads(browser.execute_script("return JSON.stringify(buildRequest())"))
    assert [r.get("role") for r in body["refs"]] == ["style", "face"]
    # an edit job with both refs: the data URLs and roles are what the server runs
    fill_small_job(browser, prompt="make it blue", n="1", steps="2")
    browser.find_element(By.CSS_SELECTOR, "#mode option[value='ip']").click()
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 120, "the ip job to succeed")
    job = service.get(f"/v1/jobs/{browser.find_element(By.ID, 'job-id').text}").json()
    assert job["mode"] == "ip" and job["status"] == "succeeded"
    for _ in range(2):
        browser.find_element(By.CSS_SELECTOR, "#refs li button").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#refs li") == []
    assert console_errors(browser) == []


def test_best_of_two_job_shows_live_previews_and_the_winner(service, browser, tmp_path):
    open_studio(browser, service)
    fill_small_job(browser)
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "job").is_displayed(), 30, "the job panel")
    job_id = browser.find_element(By.ID, "job-id").text
    assert job_id
    # each candidate's card showed a live preview (a data: image from the SSE stream) before its final PNG
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".candidate.previewed")) == 2, 120, "2 previews")
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 180, "the job to succeed")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".candidate .breakdown tr")) > 2, 30, "breakdowns")

    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    winner = job["result"]["winner"]
    cards = browser.find_elements(By.CSS_SELECTOR, ".candidate")
    assert sorted(int(c.get_attribute("data-seed")) for c in cards) == [7, 8]
    winners = browser.find_elements(By.CSS_SELECTOR, ".candidate.winner")
    assert len(winners) == 1 and int(winners[0].get_attribute("data-seed")) == winner["seed"]
    assert winners[0].find_element(By.CLASS_NAME, "badge").is_displayed()
    assert f"seed {winner['seed']}" in browser.find_element(By.ID, "winner").text
    for c, cand in zip(sorted(cards, key=lambda c: int(c.get_attribute("data-seed"))),
                       sorted(job["result"]["candidates"], key=lambda c: c["seed"])):  # fmt: skip
        assert f"{cand['score']:.3f}" in c.find_element(By.CLASS_NAME, "score").text
        scorers = [td.text for td in c.find_elements(By.CSS_SELECTOR, ".breakdown tr td:first-child")]
        assert scorers == list(cand["scores"])
        link = c.find_element(By.CLASS_NAME, "download")
        assert link.get_attribute("href").endswith(cand["url"]) and link.get_attribute("download") == f"{cand['seed']}.png"
        # the final image replaced the preview, and it loaded
        assert c.find_element(By.TAG_NAME, "img").get_attribute("src").endswith(cand["url"])
        assert browser.execute_script("return arguments[0].naturalWidth", c.find_element(By.TAG_NAME, "img")) == 128
        png = service.get(cand["url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser.find_element(By.ID, "job-progress").get_attribute("value") == "1"
    # the job list shows it
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#job-list tr[data-id='{job_id}']"), 10, "the list row")
    row = browser.find_element(By.CSS_SELECTOR, f"#job-list tr[data-id='{job_id}']")
    assert "succeeded" in row.text and "t2i" in row.text

    screenshot(browser, tmp_path, "studio.png")
    assert console_errors(browser) == []


def test_opening_a_finished_job_from_the_list_replays_it(service, browser):
    open_studio(browser, service)
    rows = browser.find_elements(By.CSS_SELECTOR, "#job-list tr.job-row")
    finished = [r for r in rows if "succeeded" in r.text]
    assert finished, "the earlier job is listed"
    job_id = finished[0].get_attribute("data-id")
    finished[0].click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 30, "the replayed job")
    assert browser.find_element(By.ID, "job-id").text == job_id
    winner = service.get(f"/v1/jobs/{job_id}").json()["result"]["winner"]["seed"]
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f".candidate.winner[data-seed='{winner}']"), 30, "winner")
    assert console_errors(browser) == []


def test_bad_input_shows_the_servers_field_error_next_to_the_field(service, browser):
    open_studio(browser, service)
    fill_small_job(browser, steps="1000")
    browser.find_element(By.ID, "submit").click()
    steps = browser.find_element(By.CSS_SELECTOR, ".field[data-field='steps']")
    wait(browser, lambda d: "invalid" in steps.get_attribute("class"), 30, "the steps field marked invalid")
    message = steps.find_element(By.CLASS_NAME, "field-error").text
    assert "200" in message, message  # the server's limit, as its 422 body says it
    assert [f.get_attribute("data-field") for f in browser.find_elements(By.CSS_SELECTOR, ".field.invalid")] == ["steps"]
    assert not browser.find_element(By.ID, "form-error").is_displayed()
    # typing in the field clears its error
    set_value(browser, "#steps", "2")
    assert "invalid" not in steps.get_attribute("class")
    # text that is no number reaches the server as typed, and its 422 lands under that field
    set_value(browser, "#guidance", "lots")
    browser.find_element(By.ID, "submit").click()
    guidance = browser.find_element(By.CSS_SELECTOR, ".field[data-field='guidance']")
    wait(browser, lambda d: "invalid" in guidance.get_attribute("class"), 30, "the guidance field marked invalid")
    assert "number" in guidance.find_element(By.CLASS_NAME, "field-error").text
    set_value(browser, "#guidance", "")
    assert console_errors(browser, allow=r"status of 422") == []


def test_copy_as_curl_and_json_reproduce_the_request(service, browser):
    open_studio(browser, service)
    fill_small_job(browser, n="1", steps="2")
    browser.find_element(By.ID, "copy-json").click()
    out = browser.find_element(By.ID, "copy-out")
    body = json.loads(out.get_attribute("value"))
    assert body == {"mode": "t2i", "prompt": PROMPT, "n": 1, "steps": 2, "seed": 7, "width": 128, "height": 128}
    browser.find_element(By.ID, "copy-curl").click()
    curl = out.get_attribute("value")
    match = re.fullmatch(r"curl -sS -X POST '(\S+)' -H 'Content-Type: application/json' -d '(.*)'", curl, re.S)
    assert match and match.group(1) == url(service, "/v1/jobs")
    assert json.loads(match.group(2).replace("'\\''", "'")) == body
    created = service.post("/v1/jobs", json=body)  # the copied request is one the server accepts
    assert created.status_code == 202, created.text
    assert console_errors(browser) == []


def test_sweep_shows_its_contact_sheet(service, browser, tmp_path):
    if "/v1/sweeps" not in service.get("/openapi.json").json()["paths"]:
        open_studio(browser, service)
        assert browser.find_element(By.ID, "run-sweep").get_attribute("disabled") is not None
        assert "no sweeps endpoint" in browser.execute_script("return document.getElementById('sweep-note').textContent")
        pytest.skip("this server has no POST /v1/sweeps yet: the page disables the sweep (checked)")
    open_studio(browser, service)
    fill_small_job(browser, n="1", steps="2")
    browser.find_element(By.CSS_SELECTOR, "#sweep summary").click()
    set_value(browser, "#sweep-n", "1")
    # a bad axis value: the server's 422 names it (axes.shift[1]) and the page shows it under the axes
    set_value(browser, "#sweep-axes", '{"shift": [1.0, 500]}')
    browser.find_element(By.ID, "run-sweep").click()
    axes = browser.find_element(By.CSS_SELECTOR, ".field[data-sweep-field='axes']")
    wait(browser, lambda d: "invalid" in axes.get_attribute("class"), 30, "the axes field marked invalid")
    assert axes.find_element(By.CLASS_NAME, "field-error").text
    assert console_errors(browser, allow=r"status of 422") == []
    set_value(browser, "#sweep-axes", '{"shift": [1.0, 3.0]}')
    browser.find_element(By.ID, "run-sweep").click()
    wait(browser, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 240, "the sweep to succeed")
    sheet = browser.find_element(By.ID, "contact-sheet")
    wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", sheet) > 0, 30, "the sheet")
    job_id = browser.find_element(By.ID, "job-id").text
    result = service.get(f"/v1/jobs/{job_id}").json()["result"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#ranking tr[data-cell]")
    assert [int(r.get_attribute("data-cell")) for r in rows] == result["ranking"]
    assert "shift" in rows[0].text
    # each cell's candidate is shown, with its image, and each cell's winner is marked
    assert len(browser.find_elements(By.CSS_SELECTOR, ".candidate[data-cell]")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, ".candidate.winner[data-cell]")) == 2
    assert browser.find_element(By.ID, "table-csv").get_attribute("href").endswith(result["files"]["table_csv"])
    assert service.get(result["files"]["contact_sheet"]).content[:4] == b"\x89PNG"
    screenshot(browser, tmp_path, "studio-sweep.png")
    assert console_errors(browser) == []


def test_docs_render_offline(service, browser):
    """Swagger UI renders from the local assets; every external host is unresolvable here."""
    browser.get(url(service, "/docs"))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"), 60, "Swagger UI")
    assert "hidream-serve" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 5, 30, "the operations")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(url(service, "/")) for r in resources), resources
    assert console_errors(browser) == []

"""The studio's and the API docs' files, without a browser: everything they reference is local and loads, only the
listed files are served, and a built (non-editable) wheel ships the studio's files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
STUDIO = REPO / "hidream_serve" / "studio"
# src/href attributes and url: '...' strings (Swagger's spec URL) in an HTML page
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from services.router import app

    with TestClient(app) as c:
        yield c


def references(html: str) -> list[str]:
    return [a or b for a, b in REFERENCE.findall(html)]


def test_studio_files_name_no_external_url():
    for path in STUDIO.iterdir():
        if path.suffix in (".html", ".js", ".css", ".svg"):
            text = path.read_text()
            external = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://www.w3.org/2000/svg", ""))
            assert not external, f"{path.name} references {external}"


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_page_references_only_local_files_and_they_load(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = references(r.text)
    assert refs, f"{page} references nothing: the pattern is wrong"
    for ref in refs:
        assert not re.match(r"^(?:[a-z]+:)?//", ref), f"{page} references an external URL: {ref}"
        url = ref if ref.startswith("/") else "/" + ref
        asset = client.get(url)
        assert asset.status_code == 200, f"{page} -> {url}: {asset.status_code}"
        assert len(asset.content) > 100
    assert not re.search(r"cdn\.|jsdelivr|unpkg|googleapis", r.text, re.I)


def test_docs_bundle_is_swagger_ui_5(client):
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in js.content
    assert re.search(rb'"5\.\d+\.\d+"', js.content)


@pytest.mark.parametrize("url", ["/studio/__init__.py", "/studio/..%2F__init__.py", "/docs/assets/core.py",
                                 "/studio/%2E%2E%2Fpresets.py"])  # fmt: skip
def test_only_listed_files_are_served(client, url):
    r = client.get(url)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


def test_pages_are_not_in_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/studio/{name}", "/docs/assets/{name}"} & set(paths)


def test_built_wheel_ships_the_studio(tmp_path):
    """A non-editable install has the files: build the wheel from a copy of the sources."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for pkg in ("hidream_serve", "services"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "out"), str(src)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "out").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("index.html", "studio.js", "studio.css", "favicon.svg"):
        assert f"hidream_serve/studio/{f}" in names
    assert "services/studio_routes.py" in names


def test_no_cdn_redoc_page(client):
    """FastAPI's /redoc loads ReDoc from a CDN; the app has none (its bundle fetches a logo from its vendor)."""
    assert client.get("/redoc").status_code == 404

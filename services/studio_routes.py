"""The web studio at `/` and the API docs at `/docs`, both served from files in the package, so both work with
no internet: no CDN, external font or script.

The studio is plain HTML/JS (`hidream_serve/studio/`) speaking the public API only (`/v1/models`, `/v1/jobs`,
its SSE stream, `/v1/presets` and `/v1/sweeps` where the server has them). The Swagger UI bundle comes from
the `fastapi-offline` package (a dependency of the `serve` extra); the router's FastAPI app is made with
`docs_url=None, redoc_url=None`, so `/docs` here replaces FastAPI's CDN page. There is no `/redoc`: ReDoc's
bundle loads its logo from its vendor's CDN, which an offline page cannot do.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

from hidream_serve.api.errors import NotFound

api = APIRouter(include_in_schema=False)

# The only files served, by URL name: nothing else in the package (or on disk) is reachable.
STUDIO_FILES = {"studio.js": "text/javascript", "studio.css": "text/css", "favicon.svg": "image/svg+xml"}
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
DOCS_ASSETS_URL = "/docs/assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


def _studio_file(name: str) -> bytes:  # read each time: small, and an edited file shows on reload
    return resources.files("hidream_serve.studio").joinpath(name).read_bytes()


@cache
def _docs_asset(name: str) -> bytes:
    try:
        import fastapi_offline
    except ImportError as e:  # a node installed without the serve extra's docs assets
        raise NotFound(f"{name}: the API docs assets need the fastapi-offline package", field="name") from e
    return (Path(fastapi_offline.__file__).parent / "static" / name).read_bytes()


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@api.get("/", response_class=HTMLResponse)
async def studio_page() -> Response:
    return HTMLResponse(_studio_file("index.html"), headers={"Cache-Control": "no-cache"})


@api.get("/studio/{name}")
async def studio_file(name: str) -> Response:
    if name not in STUDIO_FILES:
        raise NotFound(f"no studio file {name!r}", field="name")
    return Response(_studio_file(name), media_type=STUDIO_FILES[name], headers={"Cache-Control": "no-cache"})


@api.get(DOCS_ASSETS_URL + "/{name}")
async def docs_asset(name: str) -> Response:
    if name not in DOCS_ASSETS:
        raise NotFound(f"no docs asset {name!r}", field="name")
    return Response(_docs_asset(name), media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=86400"})


@api.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title="hidream-serve - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # the default validator is an external site
    )  # fmt: skip


@api.get(OAUTH2_REDIRECT_URL, response_class=HTMLResponse)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


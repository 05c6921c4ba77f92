"""Routes of presets and sweeps, on the router's FastAPI app: `GET /v1/presets`, `POST /v1/sweeps` (a job of
kind `sweep`, docs/sweeps.md) and a sweep's files (`/v1/jobs/{id}/contact-sheet.png`, `table.csv`,
`table.json`, `cells/{cell}/images/{seed}.png`). Stateless like job_routes: the Jobs deployment owns the store."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from hidream_serve.api.protocol import ERROR_RESPONSES
from hidream_serve.presets import PRESETS

api = APIRouter(tags=["sweeps"])


@api.get("/v1/presets")
async def list_presets() -> dict:
    """The named presets: mode, shift, guidance, the ref roles kept and dropped, and why."""
    return {"object": "list", "data": [p.view() for p in PRESETS.values()]}

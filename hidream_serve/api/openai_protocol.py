"""Request models of the OpenAI-compatible Images API (`POST /v1/images/generations`, `/v1/images/edits`), their
mapping onto our job requests, and OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

OpenAI's fields are accepted as its clients send them (lax types: a multipart edit sends every value as text);
fields OpenAI defines that we cannot honour (`mask`, `background: "transparent"`) are refused naming the param;
unknown fields are refused (`extra="forbid"`). Our own fields come through the client's `extra_body`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hidream_serve.vocabulary import HARD_MAX_N, HARD_MAX_PROMPT, MAX_SEED, MAX_STEPS, Mode, RecipeName, Role

# quality -> recipe (an explicit `recipe` wins; no quality: the server's default recipe). docs/openai.md.
QUALITY_RECIPE: dict[str, str] = {"low": "dev", "medium": "full", "high": "full", "xhigh": "full", "max": "full",
                                  "auto": "full", "standard": "full", "hd": "full"}  # fmt: skip
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_IMAGES = 10  # OpenAI's bound on `n`
MAX_PARTIAL_IMAGES = 3
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape. 400 `invalid_request_error` for anything wrong with the request."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value", status: int = 400,
                 type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ImageRequest(BaseModel):
    # lax (not strict): multipart forms carry every value as a string ("2", "true")
    model_config = ConfigDict(extra="forbid")

    # 1. OpenAI's fields
    prompt: str = Field(..., max_length=HARD_MAX_PROMPT)
    model: str | None = Field(None, max_length=200)
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images returned")
    size: str | None = Field(None, description='"WxH" or "auto" (the server\'s default size)')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality 0-100; png: ignored")
    quality: Quality | None = Field(None, description="low -> the dev recipe; the others -> full (QUALITY_RECIPE)")
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description="previews streamed per image")
    background: Literal["auto", "opaque", "transparent"] | None = None
    user: str | None = Field(None, max_length=500, description="accepted, recorded nowhere")
    safety_identifier: str | None = Field(None, max_length=500, description="accepted, recorded nowhere")
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted; the server filters nothing")
    # 2. ours (extra_body)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="first seed; image i uses seed + i * best_of, ...")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = None
    shift: float | None = None
    recipe: RecipeName | None = None
    best_of: int = Field(1, ge=1, le=HARD_MAX_N, description="candidates scored for each returned image")
    preset: str | None = Field(None, max_length=100)
    mode: Mode | None = None
    roles: list[Role | None] | None = Field(None, max_length=64)

    @field_validator("background")
    @classmethod
    def _opaque(cls, v: str | None) -> str | None:
        if v == "transparent":
            raise ValueError("transparent backgrounds are not supported; use auto or opaque")
        return v

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) of `size`; (None, None) for auto or none (the server's default)."""
        if self.size is None or self.size == "auto":
            return None, None
        m = _SIZE.match(self.size)
        if not m:
            raise OpenAIError(f"size must be 'WxH' (e.g. 1024x1024) or 'auto', got {self.size!r}", param="size")
        return int(m.group(1)), int(m.group(2))

    def recipe_name(self) -> str | None:
        if self.recipe is not None:
            return self.recipe
        return None if self.quality is None else QUALITY_RECIPE[self.quality]

    def job_bodies(self, mode: str, refs: list[dict], preset_supported: bool) -> list[dict]:
        """One job request per returned image: `best_of` candidates each, seeds in consecutive runs."""
        if self.preset is not None and not preset_supported:
            raise OpenAIError("this server has no presets", param="preset")
        width, height = self.dimensions()
        common: dict[str, Any] = {"mode": mode, "prompt": self.prompt, "refs": refs, "n": self.best_of}
        optional = {"width": width, "height": height, "recipe": self.recipe_name(), "steps": self.steps,
                    "guidance": self.guidance, "shift": self.shift, "preset": self.preset}  # fmt: skip
        common.update({k: v for k, v in optional.items() if v is not None})
        if width is not None:
            common["exact_size"] = True  # OpenAI's size is the size returned, not snapped to a trained one
        bodies = []
        for i in range(self.n):
            body = dict(common)
            if self.seed is not None:
                body["seed"] = self.seed + i * self.best_of
            bodies.append(body)
        return bodies


class ImageGenerationRequest(_ImageRequest):
    """`POST /v1/images/generations` (JSON). `mode` defaults to t2i."""

    style: Literal["vivid", "natural"] | None = Field(None, description="DALL-E 3's; accepted, no effect")

    def job_mode(self) -> str:
        if self.roles is not None:
            raise OpenAIError("roles name the input images of an edit; a generation has none", param="roles")
        return self.mode or "t2i"


class ImageEditRequest(_ImageRequest):
    """`POST /v1/images/edits` (multipart): one image -> edit, several -> ip; `mode` (and `roles`) choose others."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="accepted; the references are always "
                                                          "given at full fidelity")  # fmt: skip

    def job_mode(self, images: int) -> str:
        if self.roles is not None and len(self.roles) != images:
            raise OpenAIError(f"{len(self.roles)} roles for {images} images: give one per image", param="roles")
        return self.mode or ("edit" if images == 1 else "ip")

    def ref_roles(self, images: int) -> list[str | None]:
        return list(self.roles) if self.roles is not None else [None] * images


# -- errors --------------------------------------------------------------------------------------------------

# A job request's field -> the OpenAI request's param that set it.
JOB_FIELD_PARAM = {"n": "best_of", "seeds": "seed", "width": "size", "height": "size", "exact_size": "size",
                   "refs": "image", "recipe": "recipe"}  # fmt: skip
_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}


def job_param(field: str | None) -> str | None:
    """`refs[1].image` -> `image[1]`; `n` -> `best_of`; others unchanged."""
    if not field:
        return None
    m = re.match(r"^refs\[(\d+)\]", field)
    if m:
        return f"image[{m.group(1)}]"
    head = re.split(r"[.\[]", field, maxsplit=1)[0]
    return JOB_FIELD_PARAM.get(head, field)


def from_validation(err: ValidationError, field_param=lambda f: f) -> OpenAIError:
    """The first pydantic error as an OpenAIError naming its param (the path, e.g. `roles[0]`)."""
    e = err.errors()[0]
    loc = [p for p in e.get("loc", ()) if isinstance(p, int) or "[" not in str(p)]
    path = ""
    for p in loc:
        path += f"[{p}]" if isinstance(p, int) else ("." if path else "") + str(p)
    param = field_param(path) or None
    code = _CODES.get(e.get("type", ""), "invalid_value")
    if e.get("type") == "extra_forbidden":
        return OpenAIError(f"Unknown parameter: '{path}'.", param=param, code=code)
    if param == "background":
        code = "unsupported_value"
    return OpenAIError(f"{path}: {e.get('msg', 'invalid')}", param=param, code=code)


def unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(message, param=param, code="unsupported_parameter")

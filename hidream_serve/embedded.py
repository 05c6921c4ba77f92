"""Model specs: a directory path, or `embedded:tiny` / `embedded:tiny-clip` / `embedded:tiny-pickscore` /
`embedded:tiny-dino` (built once, cached, shared).

The embedded models are the tiny random-weight checkpoints the project writes itself, so the service
starts on a laptop with nothing downloaded. They are built on first use under the cache directory
(`$HIDREAM_SERVE_CACHE`, else `$XDG_CACHE_HOME/hidream-serve`, else `~/.cache/hidream-serve`) in a
temporary directory that is renamed into place, under a file lock, so several replicas starting at
once build it once. The cache key includes a hash of the builder's source, so a changed builder
builds a fresh copy instead of serving a stale one.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
DISABLED = ("none", "off", "disabled")
ENV_CACHE = "HIDREAM_SERVE_CACHE"
ENV_MODEL = "HIDREAM_MODEL_PATH"
ENV_SCORER = "HIDREAM_SCORER_PATH"
ENV_PICKSCORE = "HIDREAM_PICKSCORE_PATH"
ENV_PICKSCORE_PROCESSOR = "HIDREAM_PICKSCORE_PROCESSOR_PATH"
ENV_DINO = "HIDREAM_DINO_PATH"
DEFAULT_MODEL = "embedded:tiny"
DEFAULT_SCORER = "embedded:tiny-clip"
DEFAULT_PICKSCORE = "embedded:tiny-pickscore"
DEFAULT_DINO = "embedded:tiny-dino"
_READY = ".complete"


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hidream-serve"


def _tiny_model(out: Path, seed: int) -> None:
    from .tiny import write_tiny_checkpoint

    write_tiny_checkpoint(out, seed=seed)


def _tiny_clip(out: Path, seed: int) -> None:
    from .scoring.clip import write_tiny_clip

    write_tiny_clip(out, seed=seed)


def _tiny_pickscore(out: Path, seed: int) -> None:
    from .scoring.pickscore import write_tiny_pickscore

    write_tiny_pickscore(out, seed=seed + 1)


def _tiny_dino(out: Path, seed: int) -> None:
    from .scoring.dino import write_tiny_dino

    write_tiny_dino(out, seed=seed + 2)


def _builders() -> dict[str, tuple[Callable[[Path, int], None], str]]:
    from . import tiny
    from .scoring import clip, dino, pickscore

    return {
        "tiny": (_tiny_model, inspect.getsource(tiny)),
        "tiny-clip": (_tiny_clip, inspect.getsource(clip)),
        "tiny-pickscore": (_tiny_pickscore, inspect.getsource(clip) + inspect.getsource(pickscore)),
        "tiny-dino": (_tiny_dino, inspect.getsource(dino)),
    }


def embedded_names() -> list[str]:
    return [EMBEDDED_PREFIX + k for k in _builders()]


def is_embedded(spec: str) -> bool:
    return spec.startswith(EMBEDDED_PREFIX)


def ensure_embedded(spec: str, root: Path | None = None, seed: int = 0) -> Path:
    """Directory of an embedded model, building it first if this cache does not hold it yet."""
    name = spec[len(EMBEDDED_PREFIX) :] if is_embedded(spec) else spec
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown embedded model {spec!r}; known: {embedded_names()}")
    build, source = builders[name]
    digest = hashlib.sha256(f"{name}\0{seed}\0{source}".encode()).hexdigest()[:12]
    root = Path(root) if root is not None else cache_dir()
    target = root / f"{name}-seed{seed}-{digest}"
    if (target / _READY).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f".{target.name}.lock"), timeout=600):
        if (target / _READY).is_file():
            return target
        log.info("building embedded model %s into %s", spec, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            build(tmp, seed)
            (tmp / _READY).write_text(spec + "\n")
            if target.exists():  # a half-written copy from a crashed build (no marker)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str | None, env: str = ENV_MODEL, default: str = DEFAULT_MODEL) -> str:
    """The spec to use: the given one, else the environment variable, else the default."""
    return spec or os.environ.get(env) or default


def is_disabled(spec: str | None) -> bool:
    return spec is not None and spec.strip().lower() in DISABLED


def optional_model_dir(spec: str | None) -> Path | None:
    """Like `model_dir`, but None or 'none'/'off'/'disabled' -> None (the scorer is not configured)."""
    if spec is None or is_disabled(spec):
        return None
    return model_dir(spec)


def model_dir(spec: str) -> Path:
    """A spec -> a local directory (building embedded models on first use)."""
    if is_embedded(spec):
        return ensure_embedded(spec)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    return path

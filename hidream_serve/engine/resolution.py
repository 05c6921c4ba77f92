"""Output resolution: snap to the sizes the model was trained at, or an opt-in exact size."""

from __future__ import annotations

from ..vocabulary import PATCH_SIZE
from .errors import InvalidInput

# (width, height) pairs the model was trained at.
TRAINED_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 2048),
    (2304, 1728),
    (1728, 2304),
    (2560, 1440),
    (1440, 2560),
    (2496, 1664),
    (1664, 2496),
    (3104, 1312),
    (1312, 3104),
    (2304, 1792),
    (1792, 2304),
)

MIN_EXACT_EDGE = 64
MAX_EXACT_PIXELS = 3104 * 3104


def snap_to_trained(width: int, height: int) -> tuple[int, int]:
    """The trained size whose aspect ratio is closest (first one wins a tie)."""
    aspect = width / height
    return min(TRAINED_SIZES, key=lambda s: abs(s[0] / s[1] - aspect))


def resolve_size(width: int, height: int, exact: bool) -> tuple[int, int, str | None]:
    """Returns (width, height, warning or None)."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0:
            raise InvalidInput(name, f"must be a positive integer, got {v!r}")
    if exact:
        for name, v in (("width", width), ("height", height)):
            if v % PATCH_SIZE:
                raise InvalidInput(name, f"must be a multiple of {PATCH_SIZE} with exact_size, got {v}")
            if v < MIN_EXACT_EDGE:
                raise InvalidInput(name, f"must be at least {MIN_EXACT_EDGE} with exact_size, got {v}")
        if width * height > MAX_EXACT_PIXELS:
            raise InvalidInput("width", f"width*height must be at most {MAX_EXACT_PIXELS}, got {width * height}")
        return width, height, None
    w, h = snap_to_trained(width, height)
    if (w, h) != (width, height):
        return w, h, f"resolution snapped from {width}x{height} to trained size {w}x{h}"
    return w, h, None

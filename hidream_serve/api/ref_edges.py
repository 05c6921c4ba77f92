"""The edge (sqrt of the area) the engine resizes each reference image to, known before the images are decoded.

`engine/conditioning.py` sizes references as `fit_to_area(ref, edge)`: with `keep_original_aspect` the single
reference at `KEEP_ASPECT_EDGE`, otherwise every reference at `ref_edge_for(n, width, height)` of the resolved
output size, where a layout request's layout picture counts as one more reference. The ingress uses this to
reduce each reference while decoding it (`images.reduce_for_edge`). None means "not known" (a size the checks
will refuse anyway): the reference is then decoded at full size and left to them.
"""

from __future__ import annotations

from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.resolution import resolve_size
from hidream_serve.engine.sizing import ref_edge_for
from hidream_serve.vocabulary import KEEP_ASPECT_EDGE


def engine_ref_edge(mode: str, n_refs: int, width, height, exact_size: bool, keep_original_aspect: bool,
                    has_boxes: bool) -> int | None:  # fmt: skip
    if n_refs < 1:
        return None
    if keep_original_aspect:
        return KEEP_ASPECT_EDGE if n_refs == 1 and mode != "layout" else None
    try:
        w, h, _ = resolve_size(width, height, exact_size)
    except (InvalidInput, TypeError, ValueError):
        return None
    n = n_refs + (1 if mode == "layout" and has_boxes else 0)
    edge = ref_edge_for(n, w, h)
    return edge if edge >= 1 else None

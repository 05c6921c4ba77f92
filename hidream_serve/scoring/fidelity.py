"""Reference fidelity: how much a candidate looks like the references that define identity or content.

Score = 100 * the weighted mean, over the references that count, of cosine(candidate embedding,
reference embedding) (DINOv2 CLS embeddings, or CLIP image embeddings as a fallback). A reference's
weight comes from its `role`:

| role | default weight | why |
|---|---|---|
| face, subject, garment | 1 | the result should show this person / object / clothing |
| style | 0.5 | the look should carry over, not the content |
| background, pose | 0 | a backdrop or a pose skeleton is a condition, not something to resemble |

A reference without a role gets the mode's default role: `edit` -> its one image is the subject;
`ip` and `layout` -> subject; `skeleton` -> by position as the official try-on example orders them: face,
background, pose, then garments. The layout picture the engine draws from the boxes is never a
reference here (the service passes only the user's refs). Weights are configurable per role.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..vocabulary import FIDELITY_MODES
from .settings import DEFAULT_ROLE_WEIGHTS

SKELETON_ORDER = ("face", "background", "pose")  # then garments


def default_role(mode: str, position: int) -> str | None:
    """The role of a reference given none, by mode and position; None: the mode has no references."""
    if mode == "skeleton":
        return SKELETON_ORDER[position] if position < len(SKELETON_ORDER) else "garment"
    if mode in ("edit", "ip", "layout"):
        return "subject"
    return None


def effective_roles(mode: str, roles: Sequence[str | None], n_refs: int) -> list[str | None]:
    roles = list(roles) + [None] * max(0, n_refs - len(roles))
    return [r if r is not None else default_role(mode, i) for i, r in enumerate(roles[:n_refs])]


def ref_weights(mode: str, roles: Sequence[str | None], n_refs: int,
                role_weights: Mapping[str, float] | None = None) -> list[float]:  # fmt: skip
    """Weight of each reference (0: does not count). t2i (or an unknown mode) counts none."""
    table = {**DEFAULT_ROLE_WEIGHTS, **(role_weights or {})}
    if mode not in FIDELITY_MODES:
        return [0.0] * n_refs
    return [float(table.get(r, 0.0)) for r in effective_roles(mode, roles, n_refs)]  # every role is set here


def fidelity_scores(candidates: torch.Tensor, refs: torch.Tensor, weights: Sequence[float]) -> list[float] | None:
    """100 * weighted mean cosine of each candidate (N, D) to the refs (R, D), unit vectors; None if no
    reference counts."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if refs.shape[0] != w.shape[0]:
        raise ValueError(f"{refs.shape[0]} reference embeddings for {w.shape[0]} weights")
    if w.sum() <= 0:
        return None
    cos = candidates.float().cpu() @ refs.float().cpu().T  # (N, R)
    return (100.0 * (cos * w).sum(dim=1) / w.sum()).tolist()

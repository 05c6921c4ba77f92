"""What besides the prompt a candidate is judged against (no torch: the router builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class ScoreContext:
    mode: str = "t2i"
    refs: list[Image.Image] = field(default_factory=list)  # the user's refs, never the layout picture
    roles: list[str | None] = field(default_factory=list)

    @classmethod
    def for_params(cls, params) -> ScoreContext:
        """A request's context: its mode, its references and their roles."""
        return cls(mode=params.mode, refs=list(params.refs), roles=list(params.ref_roles))

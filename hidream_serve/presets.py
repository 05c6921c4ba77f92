"""Named presets and the warnings that encode what the seed-pattern benchmark found (docs/sweeps.md).

The model has no notion of reference roles: a face, a background, an openpose skeleton and a garment are all
"reference images". Roles are the client's labels; presets use them to choose which refs to send, and
`annotate_refs` puts them into the prompt ("image 1 is the face ..."), the only place the model can read them.

No torch and no protocol import here: `hidream_serve/api/protocol.py` applies a preset to a request through
`apply_preset`, which works on plain values, and `api/checks.py:precheck` adds `findings_warnings`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .engine.errors import InvalidInput
from .engine.sizing import ref_edge_for
from .vocabulary import ROLES

PRESET_NAMES = ("tryon-faithful", "tryon-natural", "pose-from-prompt", "outfit-swap", "group-shot")
PresetName = Literal[PRESET_NAMES]  # type: ignore[valid-type]

# Why a preset drops a ref of this role (the warning's reason).
DROP_REASONS = {
    "background": "a background ref locks the composition",
    "pose": "an openpose ref locks the pose and overrides pose instructions in the prompt",
    "garment": "the outfit comes from the prompt",
    "subject": "only the face is kept as the identity anchor",
    "style": "only the face is kept as the identity anchor",
    "face": "this preset keeps no face ref",
}

# How `annotate_refs` names a ref of each role.
ROLE_PHRASES = {
    "face": "the face (identity) of the person",
    "subject": "the subject",
    "garment": "a garment to wear",
    "background": "the background scene",
    "pose": "the openpose skeleton giving the body position",
    "style": "the style reference",
    None: "a reference",
}


@dataclass(frozen=True)
class Preset:
    name: str
    mode: str
    shift: float
    guidance: float
    keep_roles: tuple[str, ...]
    goal: str
    rationale: str
    recipe: str = "full"

    def view(self) -> dict:
        return {"name": self.name, "mode": self.mode, "goal": self.goal, "recipe": self.recipe,
                "shift": self.shift, "guidance": self.guidance, "keep_roles": list(self.keep_roles),
                "drop_roles": [r for r in ROLES if r not in self.keep_roles], "rationale": self.rationale}  # fmt: skip


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tryon-faithful", "skeleton", 1.0, 5.0, ROLES, "faithful try-on",
           "shift 1.0 keeps the output closest to the refs; face + background + pose + garments lock identity, "
           "scene, pose and outfit (6 refs: each is resized to 3/8 of the output's longest side)"),
    Preset("tryon-natural", "skeleton", 2.0, 5.0, ("face", "subject", "garment", "style"),
           "outfit kept, natural pose",
           "shift 2.0 lets the pose and framing move; without the background and pose refs the model composes a "
           "natural scene, and fewer refs keep the garment refs sharper"),
    Preset("pose-from-prompt", "skeleton", 2.5, 5.0, ("face", "subject", "garment", "background", "style"),
           "dramatic pose change",
           "an openpose ref locks the pose and suppresses pose words in the prompt: drop it and describe the pose; "
           "shift 2.5 allows the change"),
    Preset("outfit-swap", "ip", 3.0, 5.0, ("face",), "complete outfit swap",
           "shift 3.0 is near-free generation with the face as the identity anchor; the outfit, scene and pose "
           "come from the prompt"),
    Preset("group-shot", "layout", 1.0, 5.0, ("face", "subject"), "group shot",
           "face refs in rough boxes at shift 1.0; boxes are loose composition hints (box order does not bind to "
           "ref order, box size does not set relative scale)"),
)}  # fmt: skip

GUIDANCE_SWEET_SPOT = 5.0  # the full model's; 7.0 gave artifacts

_POSE_WORDS = re.compile(
    r"\b(standing|stands|sitting|sits|seated|kneeling|kneels|crouching|squatting|lying|lies|jumping|jumps|"
    r"running|runs|walking|walks|dancing|leaning|leans|posing|poses|bending|stretching|reaching|raising|raised|"
    r"arms? (?:up|crossed|outstretched)|hands? on (?:hips?|waist)|crossed legs|legs crossed|over (?:her|his|the) "
    r"shoulder|turning|twisting|lunging|mid-stride)\b",
    re.IGNORECASE,
)


def ref_label(index: int, role: str | None) -> str:
    """A ref by its number as the prompt counts them (1-based) and its field (0-based): "ref 2 (background, refs[1])"."""
    return f"ref {index + 1} ({role or 'no role'}, refs[{index}])"


def annotation(roles: list[str | None]) -> str:
    """The sentence `annotate_refs` puts in front of the caption: each ref by number (1-based, as the model sees
    them in order) and role."""
    parts = [f"image {i + 1} is {ROLE_PHRASES.get(r, ROLE_PHRASES[None])}" for i, r in enumerate(roles)]
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


@dataclass
class PresetOutcome:
    """What a preset changes in a request: the refs kept (indices), the values of the fields it sets, warnings."""

    keep: list[int]
    values: dict
    warnings: list[str]


def apply_preset(name: str, mode: str, roles: list[str | None], fields_set: set[str],
                 recipe: str | None) -> PresetOutcome:  # fmt: skip
    """The preset `name` on a request of this mode with refs of these roles. Fields in `fields_set` (set
    explicitly by the client) win over the preset's values; refs whose role the preset drops are dropped, with
    a warning naming each and why; refs with no role are kept (a preset can only judge a role)."""
    preset = PRESETS.get(name)
    if preset is None:
        raise InvalidInput("preset", f"must be one of {list(PRESETS)}, got {name!r}")
    if preset.mode != mode:
        raise InvalidInput("preset", f"{name} is for {preset.mode} mode, not {mode}")
    warnings: list[str] = []
    keep = [i for i, r in enumerate(roles) if r is None or r in preset.keep_roles]
    for i, r in enumerate(roles):
        if i not in keep:
            warnings.append(f"{ref_label(i, r)} dropped: {DROP_REASONS.get(r, 'the preset does not use it')}")
    unroled = [i for i, r in enumerate(roles) if r is None]
    if unroled:
        warnings.append(f"preset {name} keeps refs with no role as given: "
                        f"{', '.join(ref_label(i, None) for i in unroled)}")  # fmt: skip
    values: dict = {}
    if "recipe" not in fields_set:
        values["recipe"] = preset.recipe
    if (recipe if "recipe" in fields_set else preset.recipe) != preset.recipe:
        warnings.append(f"preset {name}: its shift and guidance are for the {preset.recipe} recipe; recipe "
                        f"{recipe} keeps its own")  # fmt: skip
    else:
        for field in ("shift", "guidance"):
            if field not in fields_set:
                values[field] = getattr(preset, field)
    return PresetOutcome(keep=keep, values=values, warnings=warnings)


def findings_warnings(roles: list[str | None], prompt: str, width: int, height: int, recipe: str,
                      guidance: float) -> list[str]:  # fmt: skip
    """What the benchmark found, as warnings on any request: the per-ref resolution that the ref count gives
    (5 or more refs), a pose ref with pose words in the prompt, guidance above the full model's sweet spot."""
    warnings = []
    n = len(roles)
    if n >= 5:
        edge, roomier = ref_edge_for(n, width, height), ref_edge_for(4, width, height)
        warnings.append(f"{n} refs: each ref is resized to {edge} px; 4 or fewer keep {roomier} px (thin pose lines "
                        "and garment detail suffer)")  # fmt: skip
    if "pose" in roles:
        words = sorted({m.group(0).lower() for m in _POSE_WORDS.finditer(prompt)})
        if words:
            i = roles.index("pose")
            warnings.append(f"{ref_label(i, 'pose')} locks the pose, so the prompt's pose words "
                            f"({', '.join(words)}) will have little effect; drop the pose ref "
                            "(preset pose-from-prompt) to pose from the prompt")  # fmt: skip
    if recipe == "full" and guidance > GUIDANCE_SWEET_SPOT:
        warnings.append(f"guidance {guidance:g} is above {GUIDANCE_SWEET_SPOT:g}, the full model's sweet spot; "
                        "higher values tend to give artifacts")  # fmt: skip
    return warnings

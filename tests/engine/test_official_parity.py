"""Parity with the official HiDream-O1-Image pipeline on the tiny random-weight checkpoint.

`tests/data/official_golden/` holds, per case, what the official `generate_image` produced when run
privately in float32 on CPU (non-flash attention path, autocast off) on the checkpoint that
`write_tiny_checkpoint(dir, seed=0)` builds: a 1/8 subsample and a 96x96 centre crop of the
image, its per-channel mean and size, and the first denoising step's token ids and 3-D rope
positions of the conditional (and, with CFG, unconditional) sample. `manifest.json` records the
generate_image arguments and the environment. Only numbers live here, not the official code.

The reference images come from the shared assets folder beside the clone (`../shared/assets`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "official_golden"
ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
MANIFEST = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
CASES = MANIFEST["cases"]

MAX_ABS_LEVELS = 1  # on the subsample and on the crop
MEAN_ABS_LEVELS = 0.002  # correct cases sit at <= 1.5e-4; a one-character prompt change gives ~0.08
CHANNEL_MEAN_LEVELS = 0.05

# official scheduler_name -> ours
SCHEDULER_NAMES = {"default": "unipc", "flow_match": "flow_match", "flash": "flash"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (the official-parity test needs shared/ beside the clone)")
    return ASSETS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hidream_serve.tiny import write_tiny_checkpoint

    ckpt = MANIFEST["checkpoint"]
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("official_parity_ckpt"), seed=ckpt["seed"])
    got = _sha256(out / "model.safetensors")
    if got != ckpt["model_safetensors_sha256"]:
        pytest.fail(
            f"write_tiny_checkpoint(seed={ckpt['seed']}) now writes model.safetensors with sha256 {got}, but the "
            f"official goldens were produced from {ckpt['model_safetensors_sha256']}: the tiny-checkpoint builder "
            "changed, so tests/data/official_golden must be regenerated with the official pipeline.",
            pytrace=False,
        )
    return out


@pytest.fixture(scope="session")
def pipe(tiny_checkpoint):
    from hidream_serve.engine.pipeline import HiDreamPipeline

    return HiDreamPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _params(case: dict, assets: Path | None):
    from hidream_serve.engine.params import GenerationParams

    refs = []
    for rel in case["ref_images"]:
        path = assets / rel
        if not path.is_file():
            pytest.skip(f"shared asset {path} is missing")
        got, want = _sha256(path), MANIFEST["assets_sha256"][rel]
        if got != want:
            pytest.fail(f"shared asset {rel} changed (sha256 {got}, goldens made with {want})", pytrace=False)
        with Image.open(path) as im:
            refs.append(im.convert("RGB"))
    layout = json.loads(case["layout_bboxes"]) if case["layout_bboxes"] else None
    return GenerationParams(
        mode=case["mode"], prompt=case["prompt"], refs=refs, layout_boxes=layout,
        width=case["width"], height=case["height"], keep_original_aspect=case["keep_original_aspect"],
        recipe=case["recipe"], steps=case["num_inference_steps"] if case["recipe"] == "full" else None,
    )  # fmt: skip


def _image_stats(img: np.ndarray) -> dict:
    h, w = img.shape[:2]
    return {
        "sub": img[::8, ::8],
        "crop": img[h // 2 - 48 : h // 2 + 48, w // 2 - 48 : w // 2 + 48],
        "mean": img.reshape(-1, 3).astype(np.float64).mean(0),
    }


def _check_sequence(name: str, which: str, caption, tms_id: int, golden) -> None:
    # official input_ids = our prefix ids + the timestep token
    ids = np.concatenate([caption.prefix_ids.numpy(), [tms_id]])
    want_ids = golden[f"{which}_input_ids"]
    assert np.array_equal(ids, want_ids), (
        f"{name}: {which} token ids differ from the official ones (ours {len(ids)}, official {len(want_ids)}); "
        f"first mismatch: {_first_mismatch(ids, want_ids)}"
    )
    # official position_ids[:, 0, :] = our prefix positions, then the generated tokens' (timestep token first)
    pos = torch.cat([caption.prefix_positions, caption.gen_positions], dim=1).numpy()
    want_pos = golden[f"{which}_position_ids"]
    assert pos.shape == want_pos.shape and np.array_equal(pos, want_pos), (
        f"{name}: {which} rope positions differ (ours {pos.shape}, official {want_pos.shape}); "
        f"first mismatching column: {_first_mismatch(pos.T, want_pos.T)}"
    )


def _first_mismatch(a: np.ndarray, b: np.ndarray):
    n = min(len(a), len(b))
    for i in range(n):
        if not np.array_equal(a[i], b[i]):
            return {"index": i, "ours": np.asarray(a[i]).tolist(), "official": np.asarray(b[i]).tolist()}
    return {"index": n, "note": "common part equal; lengths differ"} if len(a) != len(b) else None


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_official(name, pipe, request):
    case = CASES[name]
    golden = np.load(DATA / case["file"])
    # text-to-image cases need no reference images; the others skip when shared/assets is absent
    assets = request.getfixturevalue("assets") if case["ref_images"] else None
    params = _params(case, assets)

    # 1. effective settings: our recipe mapping must give the official generate_image arguments
    prep = pipe.prepare(params)
    s = prep.sampler
    assert (s.steps, s.guidance, s.shift, s.scheduler) == (
        case["num_inference_steps"], case["guidance_scale"], case["shift"], SCHEDULER_NAMES[case["scheduler_name"]]
    ), f"{name}: sampler settings {s} differ from the official arguments {case}"
    assert (list(s.timesteps) if s.timesteps else None) == case["timesteps_list"], f"{name}: timesteps differ"
    assert (s.noise_scale_start, s.noise_scale_end, s.noise_clip_std) == (
        case["noise_scale_start"], case["noise_scale_end"], case["noise_clip_std"]
    ), f"{name}: noise settings differ"
    assert (prep.cond.width, prep.cond.height) == (int(golden["width"]), int(golden["height"])), (
        f"{name}: size {prep.cond.width}x{prep.cond.height}, official {int(golden['width'])}x{int(golden['height'])}"
    )

    # 2. token ids and rope positions, exactly
    captions = prep.cond.captions
    assert len(captions) == (2 if case["cfg"] else 1), f"{name}: {len(captions)} captions, cfg={case['cfg']}"
    tms = pipe.conditioning.tokens.tms
    _check_sequence(name, "cond", captions[0], tms, golden)
    if case["cfg"]:
        _check_sequence(name, "uncond", captions[1], tms, golden)

    # 3. the image
    result = pipe(params, seeds=[case["seed"]])
    img = np.asarray(result.candidates[0].image.convert("RGB"), dtype=np.uint8)
    assert img.shape == (int(golden["height"]), int(golden["width"]), 3)
    ours = _image_stats(img)
    report = {}
    for key in ("sub", "crop"):
        d = np.abs(ours[key].astype(np.int16) - golden[key].astype(np.int16))
        report[key] = {"max": int(d.max()), "mean": float(d.mean()), "n_off": int((d > 0).sum())}
    mean_diff = np.abs(ours["mean"] - golden["mean"])
    report["channel_mean_diff"] = [round(float(x), 4) for x in mean_diff]
    msg = f"{name}: image differs from the official one: {report}"
    print(f"{name}: {report}")  # shown with -rA / -s
    for key in ("sub", "crop"):
        assert report[key]["max"] <= MAX_ABS_LEVELS, msg
        assert report[key]["mean"] < MEAN_ABS_LEVELS, msg
    assert (mean_diff < CHANNEL_MEAN_LEVELS).all(), msg

"""`hidream-serve compare` on the tiny model (fp8 emulated on the CPU), and its PSNR/SSIM against known values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from tests._images import noise_image

from hidream_serve.cli import main
from hidream_serve.similarity import psnr, ssim


# -- PSNR / SSIM ---------------------------------------------------------------------------------------------


def test_an_image_against_itself():
    img = noise_image(48, 40, seed=3)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == 1.0


def test_psnr_of_a_constant_shift():
    base = np.random.RandomState(0).randint(10, 240, (32, 48, 3)).astype(np.uint8)
    for d in (1, 5, 10):
        assert psnr(base, base + d) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    assert psnr(Image.fromarray(base), Image.fromarray(base + 5)) == pytest.approx(20 * math.log10(51))


def test_ssim_of_two_flat_images_is_the_luminance_term():
    c1 = (0.01 * 255) ** 2  # the standard constants, written out
    for a, b in ((100, 110), (20, 200), (0, 255)):
        x, y = np.full((16, 16, 3), a, np.uint8), np.full((16, 16, 3), b, np.uint8)
        assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_of_one_window_matches_the_formula():
    """An 11x11 image is a single window: Gaussian-weighted means, variances and covariance by hand."""
    rng = np.random.RandomState(1)
    x = rng.randint(0, 256, (11, 11, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.randint(-40, 41, x.shape), 0, 255).astype(np.uint8)
    lx, ly = (v.astype(np.float64) @ [0.299, 0.587, 0.114] for v in (x, y))
    t = np.arange(11) - 5
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * lx).sum(), (w * ly).sum()
    vx, vy = (w * (lx - mx) ** 2).sum(), (w * (ly - my) ** 2).sum()
    cov = (w * (lx - mx) * (ly - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    want = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert 0.2 < want < 0.99
    assert ssim(x, y) == pytest.approx(want, rel=1e-9)
    assert ssim(y, x) == pytest.approx(want, rel=1e-9)


def test_ssim_falls_as_noise_grows_and_rejects_bad_pairs():
    rng = np.random.RandomState(2)
    base = np.asarray(noise_image(8, 8, seed=0).resize((64, 64), Image.BICUBIC)).astype(int)
    noise = rng.normal(size=base.shape)
    values = [ssim(base.astype(np.uint8), np.clip(base + s * noise, 0, 255).astype(np.uint8)) for s in (2, 8, 32)]
    assert 1.0 > values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="differ in size"):
        ssim(noise_image(16, 16), noise_image(16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(noise_image(8, 16), noise_image(8, 16))


# -- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer_args(tmp_path_factory):
    from hidream_serve.scoring.clip import write_tiny_clip
    from hidream_serve.scoring.pickscore import write_tiny_pickscore

    root = tmp_path_factory.mktemp("compare_scorers")
    return ["--pickscore", str(write_tiny_pickscore(root / "pick")), "--clip", str(write_tiny_clip(root / "clip")),
            "--dino", "none"]  # fmt: skip


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox in fresh snow\n\n# not a prompt\n  a lighthouse at dusk  \n")
    return path


def _compare(tiny_dir, prompts, out, *extra):
    return main(["compare", "--model", str(tiny_dir), "--prompts", str(prompts), "--steps", "2", "--width", "64",
                 "--height", "64", "--device", "cpu", "--seed", "7", "--out", str(out), *extra])  # fmt: skip


def test_bf16_vs_fp8_emulated(tiny_dir, prompts, scorer_args, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(tiny_dir, prompts, out, "--a", "bf16", "--b", "fp8", "--emulate-fp8", *scorer_args) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "compare.json").read_text())
    rows = data["rows"]
    assert [r["prompt"] for r in rows] == ["a red fox in fresh snow", "a lighthouse at dusk"]
    assert data["config"]["steps"] == 2 and data["config"]["a"] == "bf16" and data["config"]["b"] == "fp8"
    for r in rows:
        assert not r["identical"] and math.isfinite(r["psnr_db"]) and 0 < r["ssim"] < 1
        assert r["psnr_db"] > 20 and r["ssim"] > 0.9  # emulated fp8 stays close to bf16
        assert r["delta"] == pytest.approx(r["composite_a"] - r["composite_b"])
        assert {"pickscore", "clip", "sharpness", "exposure"} <= set(r["raw"])
        a, b = (Image.open(out / r["images"][s]) for s in ("a", "b"))
        assert a.size == (64, 64) and psnr(a, b) == pytest.approx(r["psnr_db"])  # the PNGs are what was compared
        assert r["prompt"][:20] in printed
    s = data["summary"]
    assert s["psnr_db_mean"] == pytest.approx(np.mean([r["psnr_db"] for r in rows]))
    assert s["ssim_mean"] == pytest.approx(np.mean([r["ssim"] for r in rows]))
    assert s["a_preferred"] + s["b_preferred"] + s["ties"] == 2
    assert "| **mean** |" in printed and f"{s['ssim_mean']:.4f}" in printed


def test_identical_configs_are_identical_and_tie(tiny_dir, prompts, scorer_args, tmp_path):
    out = tmp_path / "same"
    assert _compare(tiny_dir, prompts, out, "--a", "bf16", "--b", "bf16", *scorer_args) == 0
    data = json.loads((out / "compare.json").read_text())
    for r in data["rows"]:
        assert r["identical"] and r["psnr_db"] is None and r["ssim"] == 1.0
        assert r["composite_a"] == r["composite_b"] == r["delta"] == 0.0
    assert data["summary"]["identical"] == 2 and data["summary"]["ties"] == 2


def test_fp32_vs_bf16_without_scoring(tiny_dir, prompts, tmp_path, capsys):
    out = tmp_path / "f32"
    assert _compare(tiny_dir, prompts, out, "--a", "fp32", "--b", "bf16", "--no-score") == 0
    data = json.loads((out / "compare.json").read_text())
    assert all(math.isfinite(r["psnr_db"]) and r["ssim"] < 1.0 and r["delta"] is None for r in data["rows"])
    assert sorted(p.name for p in out.glob("*.png")) == ["000_a_fp32.png", "000_b_bf16.png", "001_a_fp32.png",
                                                         "001_b_bf16.png"]  # fmt: skip


def test_fp8_on_cpu_without_emulation_names_quantize_and_the_device(tiny_dir, prompts, tmp_path, capsys):
    out = tmp_path / "refused"
    assert _compare(tiny_dir, prompts, out, "--a", "bf16", "--b", "fp8", "--no-score") == 2
    err = capsys.readouterr().err
    assert "quantize=fp8" in err and "device cpu" in err
    assert not out.exists()  # refused before anything was generated


def test_empty_prompt_file_is_an_error(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert _compare(tiny_dir, empty, tmp_path / "x", "--a", "bf16", "--b", "fp32", "--no-score") == 2
    assert "no prompts" in capsys.readouterr().err

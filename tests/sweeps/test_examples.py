"""Every sweep file in examples/ loads (its image paths resolved relative to the file) and passes the sweep
validation, as written (the model's real sizes and steps) and with the tiny overrides the end-to-end test
uses (tests/sweeps/test_sweeps_api.py runs one through the CLI). Skipped cleanly without ../shared/assets."""

from __future__ import annotations

from pathlib import Path

import pytest

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.api.sweeps_protocol import SweepRequest
from hidream_serve.sweeps_client import load_spec
from services.config import RouterConfig
from services.sweeps import prepare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
ASSETS = EXAMPLES.parent.parent / "shared" / "assets"
TINY = ["steps=2", "width=128", "height=128", "exact_size=true"]

needs_assets = pytest.mark.skipif(not (ASSETS / "IP_skeleton").is_dir() or not (ASSETS / "IP_layout").is_dir(),
                                  reason="the example images (../shared/assets) are not here")  # fmt: skip


def test_the_articles_8_skeleton_and_3_layout_patterns_are_there():
    names = [f.name for f in FILES]
    assert len([n for n in names if n.startswith("skeleton-")]) == 8
    assert len([n for n in names if n.startswith("layout-")]) == 3


@needs_assets
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
@pytest.mark.parametrize("sets", [[], TINY], ids=["as-written", "tiny"])
def test_an_example_sweep_passes_validation(path, sets):
    spec = load_spec(path, sets)
    assert all("image" in r and "path" not in r for r in spec["base"]["refs"])
    body = SweepRequest.model_validate(spec)
    stored = prepare(body, Limits(), Defaults(), RouterConfig(), has_scorer=True)
    assert stored["kind"] == "sweep" and stored["mode"] == spec["base"]["mode"]
    assert stored["axes"] and stored["n"] >= 1


def test_ref_paths_resolve_relative_to_the_yaml_file_and_a_missing_one_names_it(tmp_path):
    from hidream_serve.client import ClientError

    (tmp_path / "sub").mkdir()
    (tmp_path / "img.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "s.yaml").write_text("base: {mode: ip, prompt: x, refs: [{path: ../img.bin, role: face}]}\n"
                                             "axes: {shift: [1.0]}\n")  # fmt: skip
    spec = load_spec(tmp_path / "sub" / "s.yaml", ["steps=3"], n=2)
    assert spec["base"]["refs"] == [{"role": "face", "image": "YWJj"}] and spec["base"]["steps"] == 3 and spec["n"] == 2
    (tmp_path / "sub" / "bad.yaml").write_text("base: {mode: ip, refs: [{path: nope.png}]}\n")
    with pytest.raises(ClientError) as e:
        load_spec(tmp_path / "sub" / "bad.yaml")
    assert e.value.field == "base.refs[0].path"

"""scripts/request.py, the README tour's helper: bodies built from image paths, the winner saved to a file."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

from tests._images import noise_image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "request.py"
spec = importlib.util.spec_from_file_location("request_script", SCRIPT)
request = importlib.util.module_from_spec(spec)
spec.loader.exec_module(request)


def test_refs_with_and_without_roles_and_extra_fields(tmp_path, capsys):
    face, garment = tmp_path / "face.png", tmp_path / "garment.png"
    noise_image(32, 32, 1).save(face)
    noise_image(32, 32, 2).save(garment)
    code = request.main(["skeleton", "full body photo", "--ref", f"{face}:face", "--ref", str(garment), "--n", "2",
                         "--seed", "7", "--set", "steps=4", "--set", 'prune={"at": 0.5, "keep": 0.5}',
                         "--body-only"])  # fmt: skip
    body = json.loads(capsys.readouterr().out)
    assert code == 0
    assert body["prompt"] == "full body photo" and body["n"] == 2 and body["seed"] == 7 and body["steps"] == 4
    assert body["prune"] == {"at": 0.5, "keep": 0.5}
    assert [r.get("role") for r in body["refs"]] == ["face", None]
    assert base64.b64decode(body["refs"][0]["image"]) == face.read_bytes()


def test_layout_boxes_and_the_saved_winner(tmp_path):
    args = request.argparse.Namespace(prompt="two friends", ref=[], boxes="[[0.1, 0.5, 0.1, 0.9]]", n=None, seed=None,
                                      set=[])  # fmt: skip
    assert request.build_body(args) == {"prompt": "two friends", "layout_boxes": [[0.1, 0.5, 0.1, 0.9]]}
    png = b"\x89PNG fake"
    out = tmp_path / "winner.png"
    line = request.save_winner({"winner": {"seed": 3, "image": base64.b64encode(png).decode()},
                                "candidates": [{"seed": 3, "score": 1.0}], "warnings": []}, out)  # fmt: skip
    assert out.read_bytes() == png and "winner seed 3" in line

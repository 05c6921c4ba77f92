"""`hidream-serve calibrate-pruning` end to end on the embedded tiny model, and its statistics."""

from __future__ import annotations

import json

import pytest
from tests._images import noise_image

from hidream_serve.calibrate import average_ranks, calibrate, load_cases, spearman, winner_index


def test_spearman_and_ranks():
    assert list(average_ranks([3.0, 1.0, 2.0, 1.0])) == [3.0, 0.5, 2.0, 0.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [1]) is None
    assert winner_index([1.0, 3.0, 3.0], [7, 9, 8]) == 2  # ties go to the lowest seed, as in the service


def test_keep_count_and_ranking_are_the_services():
    from hidream_serve.scoring.pruning import keep_count, rank_key
    from services.fanout import Scored, pick_winner

    assert [keep_count(k, 8) for k in (0.01, 0.25, 0.3, 0.5, 1.0)] == [1, 2, 3, 4, 8]
    assert keep_count(0.28, 25) == 7  # 0.28 * 25 = 7.000000000000001: float noise, not 8
    assert sorted([(1.0, 5), (None, 1), (3.0, 9), (3.0, 2)], key=lambda p: rank_key(*p)) == [
        (3.0, 2), (3.0, 9), (1.0, 5), (None, 1)]  # fmt: skip
    for scores, seeds in (([1.0, 3.0, 3.0], [7, 9, 8]), ([0.5, -1.0, 0.5, 0.2], [4, 1, 3, 2]), ([2.0], [5])):
        cands = [Scored(seed, b"png", "r", score=sc) for sc, seed in zip(scores, seeds)]
        assert seeds[winner_index(scores, seeds)] == pick_winner(cands).seed


def test_calibrate_pruning_cli_end_to_end_on_the_embedded_tiny_model(tmp_path, monkeypatch, capsys):
    from hidream_serve.cli import main

    monkeypatch.setenv("HIDREAM_SERVE_CACHE", str(tmp_path / "cache"))
    for env in ("HIDREAM_MODEL_PATH", "HIDREAM_PICKSCORE_PATH", "HIDREAM_SCORER_PATH", "HIDREAM_DINO_PATH"):
        monkeypatch.delenv(env, raising=False)
    out = tmp_path / "report" / "calibration.md"
    rc = main(["calibrate-pruning", "--width", "128", "--height", "128", "--steps", "8", "--seeds", "4",
               "--max-prompts", "3", "--keep", "0.25,0.5,1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    table = out.read_text()
    assert "| step | at | spearman | top-1 | keep 0.25 | keep 0.5 | keep 1.0 |" in table
    assert table.count("\n| ") == 8 + 1  # header + one row per step
    assert table in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["steps"] == 8 and data["seeds"] == 4 and len(data["cases"]) == 3
    assert data["config"]["scorers"] == "pickscore, clip, dino"
    rows = data["rows"]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[3]["at"] == 0.5
    for r in rows:
        assert r["cases"] == 3 and r["survive"]["1.0"] == 1.0 and 0 <= r["survive"]["0.25"] <= r["survive"]["0.5"]
        assert r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0
        assert set(r["spearman_by_scorer"]) == {"pickscore", "clip", "sharpness", "exposure"}
    # best-of-4, prune at 0.5 keeping 2: 4 x 4 steps + 2 x 4 steps of 32
    assert rows[3]["cost"]["0.5"] == pytest.approx(24 / 32)
    for case in data["cases"]:
        assert case["winner"] in case["seeds"] and len(case["steps"]) == 8
        assert all(len(s["composite"]) == 4 for s in case["steps"])

    # model, scorers and weights from a serve YAML; the options override it
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    rc = main(["calibrate-pruning", "--serve-config", str(root / "deploy" / "local.yaml"), "--width", "64",
               "--height", "64", "--steps", "2", "--seeds", "2", "--max-prompts", "1", "--dino", "none",
               "--weights", '{"t2i": {"pickscore": 0}}', "--out", str(tmp_path / "b.md")])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["model"] == "embedded:tiny" and data["config"]["specs"]["dino"] == "none"
    assert data["config"]["weights"]["t2i"]["pickscore"] == 0.0 and data["config"]["scorers"] == "pickscore, clip"
    assert set(data["rows"][0]["spearman_by_scorer"]) == {"clip", "sharpness", "exposure"}
    assert main(["calibrate-pruning", "--keep", "0", "--out", str(tmp_path / "c.md")]) == 2


def test_calibrate_with_refs_scores_fidelity_and_matches_service_ranking(pipe, tmp_path):
    from hidream_serve.scoring.composite import CompositeScorer
    from hidream_serve.scoring.dino import write_tiny_dino
    from hidream_serve.scoring.pruning import survivors

    noise_image(48, 48, seed=1).save(tmp_path / "face.png")
    noise_image(48, 48, seed=2).save(tmp_path / "pose.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "a person", "mode": "ip", "refs": [
        {"path": "face.png", "role": "face"}, {"path": "pose.png", "role": "pose"}]}) + "\n")  # fmt: skip
    cases = load_cases(tmp_path / "set.jsonl")
    assert cases[0].mode == "ip" and cases[0].roles == ["face", "pose"] and cases[0].refs[0].size == (48, 48)
    scorer = CompositeScorer.load(dino=write_tiny_dino(tmp_path / "dino"))
    seeds = [5, 6, 7]
    res = calibrate(pipe, scorer, cases, seeds, width=64, height=64, steps=4, keeps=[0.34], every=2, log=lambda m: None)
    case = res["cases"][0]
    assert [s["step"] for s in case["steps"]] == [0, 2, 3]  # every 2nd step and the last
    assert all(set(s["raw"]) == {"fidelity", "sharpness", "exposure"} for s in case["steps"])
    assert any("(pickscore) is not configured" in w for w in res["warnings"])
    for s in case["steps"]:  # survival is the service's own ranking rule
        keep = survivors(s["composite"], seeds, 0.34)
        assert s["survives"]["0.34"] == (seeds.index(case["winner"]) in keep)
    assert load_cases(None)[0].mode == "t2i"
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    assert [c.prompt for c in load_cases(tmp_path / "p.txt")] == ["a cat", "a dog"]

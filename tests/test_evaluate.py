"""validate/evaluate.py: sets x architectures x protocols x seeds in one table, and the scores against random."""
from __future__ import annotations

import json

import pytest

from conftest import make_image_folder, run_script
from d4m.figures import label_robust_score
from fkd_helpers import tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = "validate/evaluate.py"


def test_one_command_gives_every_row_and_score(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    random_sets = [make_image_folder(tmp_path / f"random{k}", classes=3, per_class=4, size=32, seed=7 + k) / "train"
                   for k in range(2)]  # one draw per seed
    out = tmp_path / "eval"
    argv = ["--set", f"d4m={data / 'train'}", "--set", f"random={random_sets[0]},{random_sets[1]}", "--data-dir", data,
            "--teacher-path", teacher, "--models", "convnet,resnet18_modified", "--protocols", "fkd,hard,online",
            "--seeds", 2,
            "--epochs", 2, "--batch-size", 5, "--input-size", 32, "-j", 0, "--device", "cpu", "--no-label-check",
            "--real-hard-top1", 50, "--output", out]
    assert run_script(SCRIPT, argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"convnet", "resnet18_modified"}
    rows = {(r["method"], r["protocol"]): r for r in result["rows"] if r["model"] == "convnet"}
    assert set(rows) == {(m, p) for m in ("d4m", "random") for p in ("fkd", "hard", "online")}
    for row in result["rows"]:
        assert row["ipc"] == 4 and len(row["runs"]) == 2
        assert row["top1_mean"] == pytest.approx(sum(row["runs"]) / 2)
        assert row["top1_std"] == pytest.approx(abs(row["runs"][0] - row["runs"][1]) / 2 ** 0.5)
    score = next(s for s in result["scores"] if (s["method"], s["model"]) == ("d4m", "convnet"))
    assert [(s["method"], s["model"]) for s in result["scores"]] == [
        (m, a) for m in ("d4m", "random") for a in ("convnet", "resnet18_modified")]
    random_score = next(s for s in result["scores"] if (s["method"], s["model"]) == ("random", "convnet"))
    assert "ior_fkd" not in random_score
    assert random_score["kept"] == pytest.approx(100 * rows[("random", "hard")]["top1_mean"]
                                                 / rows[("random", "fkd")]["top1_mean"])
    for protocol in ("fkd", "hard", "online"):
        assert score[f"ior_{protocol}"] == pytest.approx(rows[("d4m", protocol)]["top1_mean"]
                                                         - rows[("random", protocol)]["top1_mean"])
    assert score["hlr"] == pytest.approx(50 - rows[("d4m", "hard")]["top1_mean"])
    low, high = score["ior_fkd_ci"]  # two seeds a side: Welch's interval around the gap
    assert low < score["ior_fkd"] < high or low == score["ior_fkd"] == high
    assert score["lrs"] == pytest.approx(label_robust_score(score["ior_fkd"], score["hlr"]))
    assert (out / "fkd" / "d4m" / "meta.json").is_file() and (out / "d4m" / "convnet" / "hard" / "seed1").is_dir()
    assert (out / "fkd" / "random1" / "meta.json").is_file()  # each draw of the random baseline has its store
    table = (out / "results.md").read_text()
    assert "| d4m | convnet | fkd | 4 |" in table and "| random | resnet18_modified | hard | 4 |" in table
    assert "ior_hard" in table
    # the "d4m" set here is the real training set itself: it covers all of it, and it has fewer images than the
    # teacher's features have dimensions, so no Fréchet distance
    in_features = result["set_scores"]
    assert in_features["d4m"]["coverage"] == in_features["d4m"]["precision"] == 1
    assert in_features["d4m"]["frechet"] is None and in_features["random"]["kid"] > in_features["d4m"]["kid"]
    assert "| d4m | 1.000 | 1.000 |" in table
    capsys.readouterr()
    assert run_script(SCRIPT, argv) == 0  # a rerun reads the finished runs back
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    common = ["--val-dir", data / "val", "--output", tmp_path / "out", "--device", "cpu"]
    cases = {
        "write NAME=FOLDER": ["--set", "d4m", "--teacher-path", teacher],
        "is not a folder": ["--set", f"d4m={tmp_path / 'none'}", "--teacher-path", teacher],
        "need a teacher": ["--set", f"d4m={data / 'train'}"],
        "one per seed (3)": ["--set", f"d4m={data / 'train'},{data / 'val'}", "--teacher-path", teacher, "--seeds", 3],
        "unknown protocol 'soft'": ["--set", f"d4m={data / 'train'}", "--teacher-path", teacher, "--protocols", "soft"],
        "label check": ["--set", f"d4m={data / 'train'}", "--teacher-path", teacher, "--epochs", 1, "-b", 5,
                        "--input-size", 32, "-j", 0],
    }
    for message, extra in cases.items():
        capsys.readouterr()
        assert run_script(SCRIPT, common + extra) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err

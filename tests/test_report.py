"""validate/report.py: the table, the accuracy-vs-IPC curve and the architecture table of an evaluation."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import run_script, top1_on
from d4m.models import load_teacher_file, save_teacher
from fkd_helpers import tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def write_eval(folder, ipc: int) -> None:
    rows = [{"method": method, "model": model, "protocol": protocol, "ipc": ipc, "runs": [ipc + shift, ipc + shift + 1],
             "top1_mean": ipc + shift + 0.5, "top1_std": 0.7071}
            for shift, method in ((10, "d4m"), (0, "random")) for model in ("convnet", "resnet18")
            for protocol in ("fkd", "hard")]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows, "scores": [{"method": "d4m", "ior_fkd": 10.0}]}))


def test_report_writes_table_curve_and_architectures(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    for ipc in (1, 10):
        write_eval(tmp_path / f"eval{ipc}", ipc)
    out = tmp_path / "report"
    argv = ["--dataset", "imagefolder", "--data-dir", data, "--teacher-path", teacher,
            "--evals", tmp_path / "eval1", tmp_path / "eval10", "--output-json", out / "results.json",
            "--curve", out / "curve.png", "--models-figure", out / "models.png"]
    assert run_script("validate/report.py", argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["rows"]) == 16 and [s["ipc"] for s in result["scores"]] == [1, 10]
    model, record = load_teacher_file(teacher)
    assert result["teacher"]["arch"] == "convnet"
    assert result["teacher"]["top1"] == pytest.approx(top1_on(model, data / "val", 32, record["mean"], record["std"]))
    for picture in ("curve.png", "models.png"):
        assert Image.open(out / picture).size[0] > 300
    table = capsys.readouterr().out
    assert "| 10 | D4M images | convnet | stored soft labels | 20.50 ± 0.71 | 20.00 / 21.00 |" in table


def test_a_teacher_trained_on_the_dataset_reports_its_recorded_top1(tmp_path):
    """train_teacher.py writes the teacher's validation top-1 into its file: the report takes it for that dataset
    (no pass over the validation split) and measures it for another."""
    data, teacher = tiny_setup(tmp_path)
    model, record = load_teacher_file(teacher)
    save_teacher(teacher, model, "convnet", 3, 32, dataset="imagefolder", top1=12.5)
    write_eval(tmp_path / "eval", 1)
    argv = ["--data-dir", data, "--teacher-path", teacher, "--evals", tmp_path / "eval"]
    for dataset, expected in (("imagefolder", 12.5), ("tiny_imagenet", None)):
        out = tmp_path / f"{dataset}.json"
        assert run_script("validate/report.py", ["--dataset", dataset, *argv, "--output-json", out]) == 0
        top1 = json.loads(out.read_text())["teacher"]["top1"]
        if expected is None:
            assert top1 == pytest.approx(top1_on(model, data / "val", 32, record["mean"], record["std"]))
        else:
            assert top1 == expected


def test_one_ipc_and_one_seed_read_as_such(tmp_path, capsys):
    """A single IPC gets bars (a curve of one point says nothing); a single seed is '(1 seed)', not '± 0.00'."""
    data, teacher = tiny_setup(tmp_path)
    folder = tmp_path / "eval2"
    folder.mkdir()
    rows = [{"method": method, "model": "convnet", "protocol": "fkd", "ipc": 2, "runs": [top1], "top1_mean": top1,
             "top1_std": 0.0} for method, top1 in (("d4m", 74.0), ("random", 65.5))]
    (folder / "results.json").write_text(json.dumps({"rows": rows, "scores": []}))
    argv = ["--dataset", "imagefolder", "--data-dir", data, "--teacher-path", teacher, "--evals", folder,
            "--output-json", tmp_path / "r.json", "--curve", tmp_path / "bars.png"]
    assert run_script("validate/report.py", argv) == 0
    assert Image.open(tmp_path / "bars.png").size[0] > 300
    table = capsys.readouterr().out
    assert "| 74.00 (1 seed) | 74.00 |" in table and "±" not in table.split("top-1 % (mean ± std)")[1]


def test_missing_evaluation_is_one_line(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    argv = ["--dataset", "imagefolder", "--data-dir", data, "--teacher-path", teacher, "--evals", tmp_path / "none",
            "--output-json", tmp_path / "r.json"]
    assert run_script("validate/report.py", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run validate/evaluate.py first" in err[0]


def test_an_output_that_cannot_be_written_is_one_line_before_the_work(tmp_path, capsys):
    write_eval(tmp_path / "eval1", 1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["--dataset", "imagefolder", "--data-dir", tmp_path / "no_data", "--teacher-path", tmp_path / "no.pt",
            "--evals", tmp_path / "eval1", "--output-json", tmp_path / "r.json", "--curve", blocker / "curve.png"]
    assert run_script("validate/report.py", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, so" in err[0] and "--curve" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_gaps_with_their_intervals_and_one_picture_per_set(tmp_path, capsys):
    from conftest import make_image_folder

    data, teacher = tiny_setup(tmp_path)
    sets = {name: [str(make_image_folder(tmp_path / name, classes=3, per_class=2, size=16, seed=k) / "train")]
            for k, name in enumerate(("d4m", "mgd3", "random"))}
    folder = tmp_path / "eval2"
    folder.mkdir()
    rows = [{"method": m, "model": "convnet", "protocol": "fkd", "ipc": 2, "runs": [70.0, 72.0], "top1_mean": 71.0,
             "top1_std": 1.41} for m in sets]
    scores = [{"method": "mgd3", "model": "convnet", "ior_fkd": 1.5, "ior_fkd_ci": [-0.25, 3.25], "hlr": 20.0,
               "lrs": 0.25}]
    set_scores = {m: {"precision": 0.5, "recall": 0.25, "density": 0.75, "coverage": 0.125, "kid": 0.01} for m in sets}
    (folder / "results.json").write_text(json.dumps({"rows": rows, "scores": scores, "set_scores": set_scores,
                                                     "sets": sets}))
    argv = ["--dataset", "imagefolder", "--data-dir", data, "--teacher-path", teacher, "--evals", folder,
            "--output-json", tmp_path / "r.json", "--set-figures", tmp_path / "pictures"]
    assert run_script("validate/report.py", argv) == 0
    out = capsys.readouterr().out
    assert "| 2 | MGD3 | convnet | +1.50 [-0.25, +3.25] | 20.00 | 0.250 |" in out
    assert "| 2 | MGD3 | 0.500 | 0.250 | 0.750 | 0.125 | 0.0100 |" in out
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["d4m.png", "mgd3.png"]
    # two panels (the set, random real) of 2 images each: 110 px of labels, 4 tiles of 64 px and a 12 px gap
    assert Image.open(tmp_path / "pictures" / "mgd3.png").size == (110 + 4 * 64 + 12, 22 + 3 * 64)

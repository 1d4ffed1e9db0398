"""What every script owes a user at the command line: a quick --help, and logs without progress-bar redraws."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from fkd_helpers import MATCH, match_args, tiny_setup

SCRIPTS = ["distillation/gen_prototype.py", "distillation/gen_syn_image.py", "distillation/sample_real.py",
           "distillation/train_tiny_ldm.py", "matching/generate_soft_label.py", "matching/train_teacher.py",
           "validate/train_FKD.py", "validate/evaluate.py", "validate/report.py", "distillation/gen_mgd3.py",
           "distillation/gen_d3hr.py", "distillation/gen_cao2.py", "distillation/export_set.py"]
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    print("status:", stop.code)
names = {m.split(".")[0] for m in sys.modules if not m.startswith("_")}
print("imported:", ",".join(sorted(names - set(sys.stdlib_module_names) - {"d4m"})) or "nothing else")
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def probe(script: str, *argv: str) -> subprocess.CompletedProcess:
    """Run `script argv` in a Python that then prints its exit status and the non-standard modules it imported."""
    return subprocess.run([sys.executable, "-c", PROBE, str(REPO / script), *argv], capture_output=True, text=True,
                          env=env(), cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_nothing_outside_the_standard_library(script):
    """--help answers before torch (or numpy, PIL, torchvision, diffusers...) is imported: importing torch alone
    takes seconds (README, Tests, has the times)."""
    done = probe(script, "--help")
    assert "usage:" in done.stdout, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["status: 0", "imported: nothing else"], done.stdout[-500:]
    for flag in ("--data-dir", "--val-dir", "--train-dir", "--label-file-path"):  # both spellings, or neither
        spellings = {flag, "--" + flag[2:].replace("-", "_")}
        assert {s for s in spellings if s in done.stdout} in (set(), spellings), (script, flag)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_refused_before_torch_loads(script):
    """Refused by argparse (a missing required flag, or the unknown one): one line, exit status 2, no torch."""
    done = probe(script, "--no-such-flag")
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("(see --help)"), done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["status: 2", "imported: nothing else"], done.stdout[-500:]


@pytest.mark.parametrize("script, required", [
    ("matching/generate_soft_label.py", ["--data", "syn", "--fkd-path", "store"]),
    ("validate/train_FKD.py", ["--train-dir", "syn", "--fkd-path", "store", "--output-dir", "out"])])
def test_matching_and_training_refuse_the_same_crop_scales(script, required):
    done = probe(script, *required, "--min-scale-crops", "0.5", "--max-scale-crops", "0.2")
    assert done.stderr.strip() == "error: crop scales need 0 < --min-scale-crops <= --max-scale-crops <= 1"
    assert done.stdout.strip().splitlines()[-2:] == ["status: 2", "imported: nothing else"], done.stdout[-500:]


def test_a_log_file_gets_lines_not_progress_bars(tmp_path):
    data, teacher = tiny_setup(tmp_path)
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, str(REPO / MATCH), *map(str, match_args(data, teacher, tmp_path / "s",
                                                                                       "--epochs", 3,
                                                                                       "--device", "cpu"))],
                              stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and "%|" not in text and "\x1b[" not in text
    assert text.splitlines()[0].startswith("matching: cpu")


def test_a_long_loop_writes_a_line_per_tenth_to_a_log(monkeypatch, capsys):
    """Where stderr is no terminal, a long loop says how far it is at every tenth; inner loops and other ranks
    stay silent (the quiet start, which keeps short runs' logs clean, is set to 0 here)."""
    from d4m import runtime

    monkeypatch.setattr(runtime, "QUIET_SECONDS", 0)
    assert list(runtime.Progress(range(20), "training", unit="epochs")) == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"training: {2 * k}/20 epochs ({10 * k} %)" for k in range(1, 11)]
    list(runtime.Progress(range(20), "epoch 3", leave=False))
    list(runtime.Progress(range(20), "training", rank=1))
    with runtime.Progress(total=4, desc="synthesis", unit="images") as bar:
        bar.update(4)
    assert capsys.readouterr().err.splitlines() == ["synthesis: 4/4 images (100 %), 0.0 min"]

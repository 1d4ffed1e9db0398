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
           "validate/train_FKD.py", "validate/evaluate.py", "validate/report.py"]
HEAVY = ("torchvision", "diffusers", "transformers", "sklearn", "matplotlib")
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("heavy:", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_does_not_load_the_heavy_libraries(script):
    """--help answers before torchvision, diffusers, transformers, scikit-learn or matplotlib are imported
    (their import is most of a script's start-up; README, Tests, has the times)."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), str(REPO / script)], capture_output=True,
                          text=True, env=env(), cwd=REPO)
    assert "usage:" in done.stdout, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy:", done.stdout[-500:]
    for flag in ("--data-dir", "--val-dir", "--train-dir", "--label-file-path"):  # both spellings, or neither
        spellings = {flag, "--" + flag[2:].replace("-", "_")}
        assert {s for s in spellings if s in done.stdout} in (set(), spellings), (script, flag)


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

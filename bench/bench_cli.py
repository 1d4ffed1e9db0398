"""Benchmark: how long each script takes to answer --help and to refuse a bad flag, against `import torch` alone.

Each figure is the fastest and slowest of --runs fresh interpreters (start-up included), run one after another.

    python bench/bench_cli.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [str(path.relative_to(REPO)) for stage in ("distillation", "matching", "validate")
           for path in sorted((REPO / stage).glob("*.py"))]


def seconds(command: list[str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - start)
    return min(times), max(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    runs = p.parse_args().runs
    rows = [(f"{script} --help", seconds([sys.executable, script, "--help"], runs)) for script in SCRIPTS]
    rows.append(("validate/train_FKD.py --epochs 0 (refused)",
                 seconds([sys.executable, "validate/train_FKD.py", "--epochs", "0"], runs)))
    rows.append(("import torch", seconds([sys.executable, "-c", "import torch"], runs)))
    for name, (fastest, slowest) in rows:
        print(f"{name:48s} {fastest:6.3f} to {slowest:6.3f} s")


if __name__ == "__main__":
    main()

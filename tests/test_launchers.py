"""The shell launchers: each dataset's four stages chained as a user runs them, on a tiny copy of the dataset in its
real on-disk format under a DATA_DIR of the test's own and with every output under an OUT_DIR in tmp; and the
command lines the launchers and run_all.sh build from the environment (read with a recording interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO
from d4m.models import build_model, save_teacher
from dataset_files import write_cifar10, write_cifar100, write_fashion_mnist, write_imagenet, write_tiny_imagenet

SIZE = 16  # the side of the tiny data's images, of the synthetic images and of the views the teacher and student see
ENCODE_SIZE = 8  # stage 1 encodes images at this side (4 x 4 latents with the tiny model): stage 2 is then 3x faster
EPOCHS = 2
HUB_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LAUNCHER_VARIABLES = ("DATA_DIR", "OUT_DIR", "SD_MODEL", "TEACHER", "IPC", "NPROC", "PYTHON")


@dataclass(frozen=True)
class Chain:
    dataset: str
    launchers: tuple[str, str, str, str]
    classes: int
    batch: int  # matching and training batch size
    write_data: Callable[[Path], Path]
    data_default: str
    sd_default: str
    teacher_default: str | None  # None: torchvision's ImageNet ResNet-18

    @property
    def name(self) -> str:
        """The folder name that stages 2 to 4 share at IPC 1."""
        return f"{self.dataset}_ipc1_1_s0.7_g8.0_kmexpand1"


def small_launchers(dataset: str) -> tuple[str, str, str, str]:
    return (f"distillation/gen_prototype_{dataset}.sh", f"distillation/gen_syn_image_{dataset}.sh",
            f"matching/matching_{dataset}.sh", f"validate/train_FKD_{dataset}.sh")


CHAINS = [
    Chain("imagenet", ("distillation/gen_prototype_imgnt.sh", "distillation/gen_syn_image_imgnt.sh",
                       "matching/matching.sh", "validate/train_FKD.sh"),
          1000, 500, write_imagenet, "data/imagenet", HUB_SD, None),
    Chain("tiny_imagenet", small_launchers("tiny_imagenet"), 200, 100, write_tiny_imagenet, "data/tiny-imagenet-200",
          HUB_SD, "models/tiny_imagenet/teacher_resnet18_modified.pt"),
    Chain("cifar10", small_launchers("cifar10"), 10, 5, write_cifar10, "data/cifar10", HUB_SD,
          "models/cifar10/teacher_convnet.pt"),
    Chain("cifar100", small_launchers("cifar100"), 100, 50, write_cifar100, "data/cifar100", HUB_SD,
          "models/cifar100/teacher_convnet.pt"),
    Chain("fashion_mnist", small_launchers("fashion_mnist"), 10, 5, write_fashion_mnist, "data/fashion_mnist",
          "models/fashion_mnist/ldm", "models/fashion_mnist/teacher_convnet.pt"),
]
BY_NAME = {chain.dataset: chain for chain in CHAINS}


def stage_flags(chain: Chain) -> list[list[str | int]]:
    """Extra flags that keep each stage small: tiny images, two denoising steps, two epochs, CPU; the tiny
    teacher is untrained, so matching's label check (tested on its own) is off."""
    return [
        ["--size", ENCODE_SIZE, "--batch_size", 64, "--num_workers", 0, "--device", "cpu"],
        ["--image_size", SIZE, "--num_inference_steps", 2, "--batch_size", 250, "--device", "cpu"],
        ["--epochs", EPOCHS, "-b", chain.batch, "--input-size", SIZE, "-j", 0, "--device", "cpu", "--no-label-check"],
        ["--epochs", EPOCHS, "--batch-size", chain.batch, "--input-size", SIZE, "--model", "convnet", "-j", 0,
         "--device", "cpu"],
    ]


def launcher_env(**variables: str | Path) -> dict[str, str]:
    """This process's environment without any launcher variable, plus `variables`, on one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update({k: str(v) for k, v in variables.items()})
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def run_bash(script: str, env: dict[str, str], cwd: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *map(str, flags)], env=env, cwd=cwd, capture_output=True,
                          text=True)


def prepare_chain(chain: Chain, root: Path, sd_model: Path) -> dict[str, str]:
    """Write the chain's data and a tiny teacher under `root`; returns the launchers' environment."""
    data = chain.write_data(root / "data")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    save_teacher(teacher, build_model("convnet", chain.classes, SIZE), "convnet", chain.classes, SIZE)
    return launcher_env(DATA_DIR=data, OUT_DIR=root / "out", SD_MODEL=sd_model, TEACHER=teacher, IPC=1,
                        PYTHON=sys.executable)


def run_chain(chain: Chain, env: dict[str, str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """The chain's four launchers in order, run from `cwd` (not the repository); stops at the first that fails."""
    runs = []
    for script, flags in zip(chain.launchers, stage_flags(chain)):
        runs.append(run_bash(script, env, cwd, *flags))
        if runs[-1].returncode != 0:
            break
    return runs


def outputs_snapshot() -> dict[str, int] | None:
    """Every file under the repository's own outputs/ with its modification time (None: no such folder)."""
    root = REPO / "outputs"
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def chain_runs(tiny_sd, tmp_path_factory) -> dict:
    """All five chains, run side by side on the machine's cores (each process on one thread); their start-up
    (importing torch and diffusers four times per chain) is most of their time."""
    before = outputs_snapshot()
    roots = {chain.dataset: tmp_path_factory.mktemp(chain.dataset) for chain in CHAINS}
    envs = {chain.dataset: prepare_chain(chain, roots[chain.dataset], tiny_sd) for chain in CHAINS}
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        futures = {c.dataset: pool.submit(run_chain, c, envs[c.dataset], roots[c.dataset]) for c in CHAINS}
        runs = {dataset: future.result() for dataset, future in futures.items()}
    return {"roots": roots, "envs": envs, "runs": runs, "outputs_before": before, "outputs_after": outputs_snapshot()}


@pytest.mark.parametrize("dataset", list(BY_NAME))
def test_chain_writes_every_stage_under_out_dir(chain_runs, dataset):
    chain = BY_NAME[dataset]
    runs = chain_runs["runs"][dataset]
    for script, run in zip(chain.launchers, runs):
        assert run.returncode == 0, f"{script} failed with status {run.returncode}:\n{run.stderr[-3000:]}"
    assert len(runs) == 4
    out = chain_runs["roots"][dataset] / "out"

    with safe_open(str(out / "prototypes" / f"{dataset}-ipc1-kmexpand1.safetensors"), "pt") as f:
        assert f.get_tensor("prototypes").shape[:2] == (chain.classes, 1)

    syn = out / "syn" / chain.name
    assert len([p for p in syn.iterdir() if p.is_dir()]) == chain.classes
    images = sorted(syn.glob("*/*.png"))
    assert len(images) == chain.classes
    with Image.open(images[0]) as image:
        assert image.size == (SIZE, SIZE)

    store = out / "fkd" / chain.name
    assert sorted(p.name for p in store.glob("epoch_*.safetensors")) == [f"epoch_{e:04d}.safetensors" for e in range(EPOCHS)]
    assert json.loads((store / "meta.json").read_text())["num_images"] == chain.classes

    student = out / "student" / chain.name
    result = json.loads((student / "results.json").read_text())
    assert result["epochs"] == EPOCHS and result["model"] == "convnet"
    assert (student / "model_best.pth.tar").is_file()
    assert "final: top-1" in runs[3].stdout


def test_rerunning_a_finished_chain_continues_every_stage(chain_runs):
    """A second run of the launchers on finished outputs (as after an interruption at the end) redoes no
    training: the student's checkpoint is read back, not trained again."""
    chain = BY_NAME["fashion_mnist"]
    root = chain_runs["roots"][chain.dataset]
    checkpoint = root / "out" / "student" / chain.name / "checkpoint.pth.tar"
    before = checkpoint.read_bytes()
    runs = run_chain(chain, chain_runs["envs"][chain.dataset], root)
    assert [run.returncode for run in runs] == [0, 0, 0, 0], runs[-1].stderr[-3000:]
    assert "final: top-1" in runs[3].stdout and checkpoint.read_bytes() == before


def test_chains_leave_the_repository_outputs_alone(chain_runs):
    assert chain_runs["outputs_after"] == chain_runs["outputs_before"]


# ---- the command lines, read with an interpreter that records its arguments instead of running them ----

RECORDER = """#!/usr/bin/env bash
printf '%s\\x1f' "$@" >> "$ARGV_LOG"
printf '\\n' >> "$ARGV_LOG"
"""


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, Path]:
    """(an executable that appends its argv to a log, the log)."""
    path = tmp_path / "record-argv"
    path.write_text(RECORDER)
    path.chmod(0o755)
    return path, tmp_path / "argv.log"


def recorded(log: Path) -> list[list[str]]:
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()] if log.exists() else []


def flag(argv: list[str], name: str) -> str:
    """The value argparse keeps for `name`: that of its last occurrence."""
    positions = [i for i, arg in enumerate(argv) if arg == name]
    assert positions, f"{name} missing from {argv}"
    return argv[positions[-1] + 1]


def commands(chain: Chain, recorder: tuple[Path, Path], tmp_path: Path, *extra: str, **variables) -> list[list[str]]:
    """The argv each of the chain's launchers hands to the interpreter under `variables`."""
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, **variables)
    for script in chain.launchers:
        run = run_bash(script, env, tmp_path, *extra)
        assert run.returncode == 0, run.stderr
    return recorded(log)


def test_stages_run_with_freed_memory_kept_for_reuse(tmp_path):
    """Every stage runs with glibc's mmap threshold at 32 MB and a high trim threshold, unless the user set them."""
    python, log = tmp_path / "record-env", tmp_path / "env.log"
    python.write_text('#!/usr/bin/env bash\necho "$MALLOC_MMAP_THRESHOLD_ $MALLOC_TRIM_THRESHOLD_" >> "$ENV_LOG"\n')
    python.chmod(0o755)
    cases = [({}, "33554432 4294967296"), ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "131072 4294967296")]
    for variables, expected in cases:
        env = {k: v for k, v in launcher_env(PYTHON=python, ENV_LOG=log, **variables).items()
               if k in variables or not k.startswith("MALLOC_")}
        for script in BY_NAME["cifar10"].launchers:
            assert run_bash(script, env, tmp_path).returncode == 0
        assert log.read_text().splitlines() == [expected] * 4
        log.unlink()


@pytest.mark.parametrize("dataset", list(BY_NAME))
def test_launcher_defaults(dataset, recorder, tmp_path):
    chain = BY_NAME[dataset]
    prototypes, synthesis, matching, training = commands(chain, recorder, tmp_path)
    name = f"{dataset}_ipc10_10_s0.7_g8.0_kmexpand1"
    assert prototypes[0] == "distillation/gen_prototype.py"
    assert flag(prototypes, "--data_dir") == chain.data_default
    assert flag(prototypes, "--diffusion_checkpoints_path") == chain.sd_default
    assert flag(prototypes, "--ipc") == "10"
    assert flag(prototypes, "--save_prototype_path") == "outputs/prototypes"
    assert flag(synthesis, "--prototype_path") == f"outputs/prototypes/{dataset}-ipc10-kmexpand1.safetensors"
    assert flag(synthesis, "--save_init_image_path") == "outputs/syn"
    assert flag(synthesis, "--diffusion_checkpoints_path") == chain.sd_default
    assert (flag(matching, "--data"), flag(matching, "--fkd-path")) == (f"outputs/syn/{name}", f"outputs/fkd/{name}")
    if chain.teacher_default is None:
        assert flag(matching, "-a") == "resnet18" and "--teacher-path" not in matching
    else:
        assert flag(matching, "--teacher-path") == chain.teacher_default
    assert flag(training, "--train-dir") == f"outputs/syn/{name}"
    assert flag(training, "--fkd-path") == f"outputs/fkd/{name}"
    assert flag(training, "--output-dir") == f"outputs/student/{name}"
    assert (flag(training, "--dataset"), flag(training, "--data-dir")) == (dataset, chain.data_default)
    assert "--val-dir" not in training


@pytest.mark.parametrize("dataset", list(BY_NAME))
def test_launchers_read_the_environment_and_pass_extra_flags_last(dataset, recorder, tmp_path):
    chain = BY_NAME[dataset]
    argvs = commands(chain, recorder, tmp_path, "--seed", "7", DATA_DIR="/d", OUT_DIR="/o", SD_MODEL="/sd",
                     TEACHER="/t.pt", IPC=3, NPROC=2)
    for argv in argvs:
        assert argv[:4] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
        assert argv[-2:] == ["--seed", "7"]
    prototypes, synthesis, matching, training = argvs
    name = f"{dataset}_ipc3_3_s0.7_g8.0_kmexpand1"
    assert (flag(prototypes, "--data_dir"), flag(prototypes, "--ipc")) == ("/d", "3")
    assert flag(prototypes, "--save_prototype_path") == "/o/prototypes"
    assert flag(prototypes, "--diffusion_checkpoints_path") == flag(synthesis, "--diffusion_checkpoints_path") == "/sd"
    assert flag(synthesis, "--prototype_path") == f"/o/prototypes/{dataset}-ipc3-kmexpand1.safetensors"
    assert (flag(matching, "--data"), flag(matching, "--teacher-path")) == (f"/o/syn/{name}", "/t.pt")
    assert (flag(training, "--data-dir"), flag(training, "--output-dir")) == ("/d", f"/o/student/{name}")


@pytest.mark.parametrize("variable, value", [("IPC", "ten"), ("IPC", "0"), ("NPROC", "two")])
def test_bad_variable_is_one_line_and_status_2(variable, value, recorder, tmp_path):
    python, log = recorder
    for script in BY_NAME["cifar10"].launchers:
        run = run_bash(script, launcher_env(PYTHON=python, ARGV_LOG=log, **{variable: value}), tmp_path)
        assert run.returncode == 2
        assert run.stderr == f"error: {variable} must be a positive integer, got '{value}'\n"
    assert recorded(log) == []


def test_run_all_passes_the_environment_to_a_dataset_chain(recorder, tmp_path):
    python, log = recorder
    run = run_bash("run_all.sh", launcher_env(PYTHON=python, ARGV_LOG=log, DATA_DIR="/d", OUT_DIR="/o", IPC=2),
                   tmp_path, "cifar100")
    assert run.returncode == 0, run.stderr
    argvs = recorded(log)
    assert [argv[0] for argv in argvs] == ["distillation/gen_prototype.py", "distillation/gen_syn_image.py",
                                           "matching/generate_soft_label.py", "validate/train_FKD.py"]
    assert flag(argvs[0], "--data_dir") == flag(argvs[3], "--data-dir") == "/d"
    assert flag(argvs[3], "--output-dir") == "/o/student/cifar100_ipc2_2_s0.7_g8.0_kmexpand1"


def test_run_all_fashion_mnist_writes_only_under_out_dir(recorder, tmp_path):
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, DATA_DIR="/d", OUT_DIR="/o", SD_MODEL="/sd", TEACHER="/t.pt")
    run = run_bash("run_all.sh", env, tmp_path)
    # the recording interpreter writes no results, so the chain runs through to the report
    assert run.returncode == 0, run.stderr
    argvs = recorded(log)
    assert [argv[0] for argv in argvs] == [
        "distillation/gen_prototype.py", "distillation/gen_syn_image.py", "distillation/sample_real.py",
        "distillation/sample_real.py", "validate/evaluate.py", "validate/report.py"]
    evaluate, report = argvs[-2:]
    assert flag(evaluate, "--data-dir") == "/d" and flag(evaluate, "--teacher-path") == "/t.pt"
    assert [v for k, v in zip(evaluate, evaluate[1:]) if k == "--set"] == [
        "d4m=/o/syn/fashion_mnist_ipc10_10_s0.7_g8.0_kmexpand1", "random=/o/syn/real_fashion_mnist_ipc10_seed0",
        "nearest=/o/syn/nearest_fashion_mnist_ipc10"]
    assert flag(report, "--data-dir") == "/d" and flag(report, "--teacher-path") == "/t.pt"
    assert flag(report, "--diffusion_checkpoints_path") == "/sd" and flag(report, "--evals") == "/o/eval/fashion_mnist_ipc10"
    assert (flag(report, "--output-json"), flag(report, "--figure")) == ("/o/results_fashion_mnist.json",
                                                                          "/o/fashion_mnist_d4m.png")
    values = [value.partition("=")[2] if "=" in value else value for argv in argvs for value in argv]  # NAME=FOLDERS
    paths = [p for value in values for p in value.split(",") if "/" in p and not p.endswith(".py")]
    assert all(p.startswith(("/d", "/o", "/sd", "/t.pt", "distillation/label-prompt/")) for p in paths), paths


def test_run_all_fashion_mnist_loops_over_ipcs_and_seeds(recorder, tmp_path):
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, OUT_DIR="/o", IPCS="1 2", SEEDS=2, MODELS="convnet,resnet18",
                       PROTOCOLS="fkd,online")
    assert run_bash("run_all.sh", env, tmp_path).returncode == 0
    argvs = recorded(log)
    evaluations = [argv for argv in argvs if argv[0] == "validate/evaluate.py"]
    assert [flag(argv, "--output") for argv in evaluations] == ["/o/eval/fashion_mnist_ipc1", "/o/eval/fashion_mnist_ipc2"]
    assert flag(evaluations[0], "--models") == "convnet,resnet18" and flag(evaluations[0], "--protocols") == "fkd,online"
    assert flag(evaluations[1], "--seeds") == "2" and "random=/o/syn/real_fashion_mnist_ipc2_seed0," \
        "/o/syn/real_fashion_mnist_ipc2_seed1" in evaluations[1]
    draws = [argv for argv in argvs if argv[0] == "distillation/sample_real.py" and flag(argv, "--select") == "random"]
    assert [(flag(a, "--ipc"), flag(a, "--seed")) for a in draws] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    report = argvs[-1]
    assert report[report.index("--evals") + 1:report.index("--evals") + 3] == [
        "/o/eval/fashion_mnist_ipc1", "/o/eval/fashion_mnist_ipc2"]
    bad = run_bash("run_all.sh", launcher_env(PYTHON=python, ARGV_LOG=log, SEEDS="x"), tmp_path)
    assert bad.returncode == 2 and bad.stderr == "error: SEEDS must be a positive integer, got 'x'\n"


@pytest.mark.parametrize("dataset,expected", [("cifar10", {1: 10, 10: 50, 50: 100}),
                                              ("cifar100", {1: 20, 10: 100, 50: 200}),
                                              ("tiny_imagenet", {1: 100, 10: 100, 50: 100})])
def test_small_dataset_recipes_scale_the_batch_with_ipc(recorder, tmp_path, dataset, expected):
    """RDED's batch sizes by IPC, shared by matching and training (a store's batch must equal training's)."""
    python, log = recorder
    for ipc, batch in expected.items():
        for script in (f"matching/matching_{dataset}.sh", f"validate/train_FKD_{dataset}.sh"):
            assert run_bash(script, launcher_env(PYTHON=python, ARGV_LOG=log, IPC=ipc), tmp_path).returncode == 0
        matching, training = recorded(log)[-2:]
        assert flag(matching, "-b") == flag(training, "--batch-size") == str(batch), (ipc, matching, training)
        assert flag(training, "--lr-schedule") == "half-cosine" and flag(training, "--epochs") == "300"


def test_run_all_unknown_dataset(tmp_path):
    run = run_bash("run_all.sh", launcher_env(), tmp_path, "mnist")
    assert run.returncode == 2
    assert run.stderr.startswith("error: unknown dataset 'mnist'") and run.stderr.count("\n") == 1


def test_run_all_imagefolder_trains_what_is_missing_and_evaluates_an_own_dataset(tmp_path):
    """`run_all.sh imagefolder` on a small ImageFolder with neither SD_MODEL nor TEACHER: a tiny LDM and a teacher
    are trained first, then the Fashion-MNIST demo's chain and report, with outputs named after the data folder."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "digits", classes=3, per_class=6, size=SIZE)
    out = tmp_path / "out"
    env = launcher_env(DATA_DIR=data, OUT_DIR=out, IPC=2, EPOCHS=1, NO_FLIP=1, IMAGE_SIZE=SIZE, PYTHON=sys.executable,
                       LDM_FLAGS="--vae_steps 2 --unet_steps 2 --batch_size 6 --vae_channels 8 16 --unet_channels 8 16 "
                                 "--text_dim 16 --text_layers 1",
                       TEACHER_FLAGS="--epochs 1 --workers 0", EVAL_FLAGS="--no-label-check", PROTOCOLS="fkd")
    run = run_bash("run_all.sh", env, tmp_path, "imagefolder")
    assert run.returncode == 0, run.stderr[-3000:]
    model = torch.load(out / "models/digits/teacher_convnet.pt", weights_only=True)
    assert model["input_size"] == SIZE and model["classes"] == ["class0", "class1", "class2"]
    assert (out / "models/digits/ldm/model_index.json").is_file()
    results = json.loads((out / "results_digits.json").read_text())
    assert {row["method"] for row in results["rows"]} == {"d4m", "random", "nearest"}
    for folder in ("syn/digits_ipc2_2_s0.7_g8.0_kmexpand1", "syn/real_digits_ipc2_seed0", "syn/nearest_digits_ipc2"):
        sizes = {Image.open(p).size for p in (out / folder).rglob("*.png")}
        assert sizes == {(SIZE, SIZE)}, folder
    assert (out / "digits_d4m.png").is_file() and (out / "digits_ipc_curve.png").is_file()
    assert json.loads((out / "eval/digits_ipc2/fkd/d4m/meta.json").read_text())["flip"] is False  # NO_FLIP reached
    again = run_bash("run_all.sh", env, tmp_path, "imagefolder")  # resumes: nothing is trained twice
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== no SD_MODEL" not in again.stdout and "== no TEACHER" not in again.stdout


def test_run_all_imagefolder_without_data_is_one_line(tmp_path):
    run = run_bash("run_all.sh", launcher_env(OUT_DIR=tmp_path / "out"), tmp_path, "imagefolder")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: imagefolder needs DATA_DIR, a folder holding train/<class>/ and val/<class>/ image folders"]
    assert not (tmp_path / "out").exists()


def test_the_training_launcher_resumes_the_run_its_folder_holds(recorder, tmp_path):
    """The launcher passes --resume when the output folder holds a run (its own checkpoint or a seed's), unless
    the flags say --overwrite or --resume themselves."""
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, OUT_DIR=tmp_path / "o")
    student = tmp_path / "o" / "student" / "cifar10_ipc10_10_s0.7_g8.0_kmexpand1"

    def resumes(*flags) -> bool:
        assert run_bash(BY_NAME["cifar10"].launchers[3], env, tmp_path, *flags).returncode == 0
        return recorded(log)[-1].count("--resume") == 1

    assert not resumes()
    for held in (student / "checkpoint.pth.tar", student / "seed1" / "checkpoint.pth.tar"):
        held.parent.mkdir(parents=True, exist_ok=True)
        held.write_bytes(b"")
        assert resumes() and not resumes("--overwrite")
        assert resumes("--resume", "other.pth.tar") and recorded(log)[-1][-2:] == ["--resume", "other.pth.tar"]
        held.unlink()


def test_the_comparison_makes_every_set_per_seed_and_evaluates_them_together(recorder, tmp_path):
    """validate/compare.sh: per IPC, the prototypes, one generator call per set and seed (its --seed), one random
    real draw per seed, the nearest real images once, one evaluation of all six sets and the report."""
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, OUT_DIR="/o", DATA_DIR="/d", IPCS="2", SEEDS=2)
    run = run_bash("validate/compare.sh", env, tmp_path)
    assert run.returncode == 0, run.stderr
    argvs = recorded(log)
    generators = ["distillation/gen_syn_image.py", "distillation/gen_mgd3.py", "distillation/gen_d3hr.py",
                  "distillation/gen_cao2.py"]
    assert [a[0] for a in argvs] == ["distillation/gen_prototype.py", *[g for g in generators for _ in range(2)],
                                     *["distillation/sample_real.py"] * 3, "validate/evaluate.py", "validate/report.py"]
    for k, argv in enumerate(argvs[1:9]):
        assert flag(argv, "--seed") == str(k % 2) and flag(argv, "--ipc") == "2"
    randoms = argvs[9:11]
    assert [flag(a, "--select") for a in argvs[9:12]] == ["random", "random", "nearest"]
    assert [flag(a, "--seed") for a in randoms] == ["0", "1"]
    evaluate = argvs[-2]
    sets = [v for k, v in zip(evaluate, evaluate[1:]) if k == "--set"]
    folders = lambda pattern: ",".join(pattern.format(seed) for seed in (0, 1))  # noqa: E731
    assert sets == ["d4m=" + folders("/o/syn/fashion_mnist_seed{}_ipc2_2_s0.7_g8.0_kmexpand1"),
                    "mgd3=" + folders("/o/syn/fashion_mnist_mgd3_ipc2_seed{}"),
                    "d3hr=" + folders("/o/syn/fashion_mnist_d3hr_ipc2_seed{}"),
                    "cao2=" + folders("/o/syn/fashion_mnist_cao2_ipc2_seed{}"),
                    "random=" + folders("/o/syn/real_fashion_mnist_ipc2_seed{}"),
                    "nearest=/o/syn/nearest_fashion_mnist_ipc2"]
    assert flag(evaluate, "--seeds") == "2" and flag(evaluate, "--protocols") == "fkd,hard"
    assert argvs[-1][0] == "validate/report.py" and flag(argvs[-1], "--evals") == "/o/eval/compare_ipc2"
    run = run_bash("validate/compare.sh", {**env, "SETS": "d4m random", "STRENGTH": "0.5"}, tmp_path)
    assert run.returncode == 0, run.stderr
    evaluate = [a for a in recorded(log) if a[0] == "validate/evaluate.py"][-1]
    sets = [v for k, v in zip(evaluate, evaluate[1:]) if k == "--set"]
    assert [v.split("=")[0] for v in sets] == ["d4m", "random"] and "_s0.5_g8.0_" in sets[0]
    bad = run_bash("validate/compare.sh", {**env, "SETS": "d4m best"}, tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown set 'best' in SETS; choose from d4m mgd3 d3hr cao2 random nearest"]


def test_strength_and_guidance_name_the_folder_every_stage_reads(recorder, tmp_path):
    """STRENGTH and GUIDANCE reach stage 2's flags and the folder matching and training read; given to the synthesis
    launcher as a flag, which would leave the later stages on another folder, they are refused in one line."""
    python, log = recorder
    env = launcher_env(PYTHON=python, ARGV_LOG=log, STRENGTH="0.50", GUIDANCE="4")
    _, synthesis, matching, training = commands(BY_NAME["cifar10"], recorder, tmp_path, STRENGTH="0.50", GUIDANCE="4")
    assert (flag(synthesis, "--strength"), flag(synthesis, "--guidance_scale")) == ("0.5", "4.0")
    name = "cifar10_ipc10_10_s0.5_g4.0_kmexpand1"
    assert flag(matching, "--data") == f"outputs/syn/{name}" and flag(training, "--train-dir") == f"outputs/syn/{name}"
    for flags in (["--strength", "0.5"], ["-g", "4"], ["--guidance_scale=4"]):
        run = run_bash("distillation/gen_syn_image_cifar10.sh", env, tmp_path, *flags)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
        assert run.stderr.startswith(f"error: {flags[0]} names the folder that matching and training read")
    run = run_bash("distillation/gen_syn_image_cifar10.sh", {**env, "STRENGTH": "half"}, tmp_path)
    assert run.returncode == 2 and run.stderr == "error: STRENGTH must be a plain decimal number (e.g. 0.7), got 'half'\n"

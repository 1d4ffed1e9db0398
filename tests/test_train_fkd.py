"""train_FKD.py: resume equality, torchrun equality, outputs, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import DEVICES, device_flags, load_script, run_script, run_torchrun
from d4m import fkd
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, teacher = tiny_setup(root)
    store = root / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 4, "--mix-type", "cutmix", "--use-fp16",
                                        "--device", "cpu")) == 0
    return data, store


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_ends_with_the_same_weights(tiny, tmp_path, capsys, device):
    """On the CPU, and on a GPU with --deterministic, an interrupted and resumed run ends bit for bit where an
    uninterrupted one does."""
    data, store = tiny
    common = ["--epochs", 4, "--cos", "-T", 20, "--gradient-accumulation-steps", 2, "--eval-interval", 2,
              *device_flags(device)]
    assert run_script(TRAIN, train_args(data, store, tmp_path / "straight", *common)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: top-1 ")

    module = load_script(TRAIN)
    real, calls = module.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    module.train_epoch = interrupted
    with pytest.raises(KeyboardInterrupt):
        module.main([str(a) for a in train_args(data, store, tmp_path / "resumed", *common)])
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
    assert run_script(TRAIN, train_args(data, store, tmp_path / "resumed", *common, "--resume")) == 0

    straight, resumed = weights(tmp_path / "straight" / "checkpoint.pth.tar"), weights(tmp_path / "resumed" / "checkpoint.pth.tar")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3] and "top1" in rows[1] and "top1" in rows[3]
    assert (tmp_path / "resumed" / "model_best.pth.tar").is_file()
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert set(results) >= {"top1", "top3"}


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    data, store = tiny
    for nproc in (1, 2):
        args = train_args(data, store, tmp_path / f"p{nproc}", "--epochs", 2, "--cos", "-T", 20,
                          "--gradient-accumulation-steps", 2, "--device", "cpu", "--keep-topk", 2)
        result = run_torchrun(TRAIN, args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = (weights(tmp_path / f"p{n}" / "checkpoint.pth.tar") for n in (1, 2))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)


def edited_train_dir(data, tmp_path, extra_class: bool):
    train = tmp_path / "train"
    shutil.copytree(data / "train", train)
    folder = train / ("class9" if extra_class else "class0")
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(folder / "extra.png")
    return train


def nan_store(store, tmp_path):
    copy = tmp_path / "nan_store"
    shutil.copytree(store, copy)
    tensors = load_file(str(fkd.epoch_file(copy, 0)))
    tensors["logits"] = torch.full_like(tensors["logits"], float("nan"))
    save_file(tensors, str(fkd.epoch_file(copy, 0)))
    return copy


def test_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys):
    data, store = tiny
    out = tmp_path / "out"
    cases = [
        train_args(data, store, out, "--batch-size", 4),
        train_args(data, store, out, "--epochs", 5),
        train_args(data, store, out, "--input-size", 64),
        train_args(data, store, out, "--epochs", 1, "--train-dir", edited_train_dir(data, tmp_path / "a", False)),
        train_args(data, store, out, "--epochs", 1, "--train-dir", edited_train_dir(data, tmp_path / "b", True)),
        train_args(data, tmp_path / "no_store", out),
        train_args(data, store, out, "--epochs", 1, "--model", "not_a_model"),
        train_args(data, store, out, "--epochs", 1, "--resume"),
        train_args(data, store, out, "--epochs", 1, "--mix-type", "mixup"),
        train_args(data, nan_store(store, tmp_path), out, "--epochs", 1),
    ]
    for args in cases:
        capsys.readouterr()
        assert run_script(TRAIN, args + ["--device", "cpu"]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() 
               if "%|" not in line and line.replace("\x1b[A", "").strip()]  # tqdm bars are not messages
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists(), args

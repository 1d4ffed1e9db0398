"""Device choice and the start line: no silent CPU fallback, a clear error for an unusable --device."""
from __future__ import annotations

import datetime

import pytest
import torch

from conftest import run_script
from d4m import runtime
from d4m.cli import UsageError
from d4m.device import amp_dtype, pick_device
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_asked_for_without_cuda_is_a_usage_error(no_cuda):
    with pytest.raises(UsageError, match=r"torch.cuda.is_available\(\) is false .*nvidia-smi.*--device cpu"):
        pick_device("cuda")


def test_unknown_device_name_is_a_usage_error():
    with pytest.raises(UsageError, match="not a device name"):
        pick_device("gpu")


def test_fallback_to_the_cpu_warns(no_cuda, capsys):
    assert pick_device(None) == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.startswith("warning: no usable CUDA device") and "--device cpu" in err
    assert pick_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_a_chain_that_said_so_once_gets_no_warning_per_stage(no_cuda, capsys, monkeypatch):
    monkeypatch.setenv("D4M_CPU_NOTED", "1")  # set by run_all.sh, which says once which device the stages take
    assert pick_device(None) == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_amp_is_float32_on_the_cpu_and_bf16_or_fp16_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", cpu) is None and amp_dtype("auto", cpu, prefer_fp16=True) is None
    assert amp_dtype("auto", cuda) == torch.bfloat16 and amp_dtype("auto", cuda, prefer_fp16=True) == torch.float16
    assert amp_dtype("off", cuda) is None and amp_dtype("fp16", cuda) == torch.float16
    with pytest.raises(UsageError, match="CUDA only"):
        amp_dtype("bf16", cpu)


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(runtime.dist, "get_world_size", lambda: 2)
    assert runtime.init_distributed(torch.device("cpu"), 240) == (1, 2)
    assert seen == {"b": "gloo", "t": datetime.timedelta(minutes=240)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("device"))


def test_each_stage_prints_its_device_line(tiny, tmp_path, capsys, no_cuda):
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1)) == 0
    out, err = capsys.readouterr()
    assert "warning: no usable CUDA device" in err
    assert out.splitlines()[0] == ("matching: cpu (1 threads), float32, 1 process, teacher convnet, "
                                   "image cache 12 images, 0.00 GB of host memory")
    assert run_script(TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 1, "--device", "cpu")) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == ("training: cpu (1 threads), float32, 1 process, student convnet, protocol fkd, "
                                   "image cache 12 images, 0.00 GB of host memory")
    assert "warning" not in err


def test_cuda_flag_without_cuda_exits_2_with_one_line(tiny, tmp_path, capsys, no_cuda):
    data, teacher = tiny
    for script, args in ((MATCH, match_args(data, teacher, tmp_path / "store")),
                         (TRAIN, train_args(data, tmp_path / "store", tmp_path / "out"))):
        capsys.readouterr()
        assert run_script(script, args + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --device cuda asked for"), err
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()

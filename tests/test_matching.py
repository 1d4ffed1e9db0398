"""generate_soft_label.py: exact replay of stored views, resume, torchrun equality, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES, device_flags, run_script, run_torchrun
from d4m import fkd, views
from d4m.data import ImageFolderDataset
from d4m.device import amp_dtype, autocast, memory_format, set_deterministic
from d4m.models import build_model, load_teacher_file, save_teacher
from d4m.labelcodec import keep_topk
from d4m.store import epoch_file, read_epoch, read_meta
from fkd_helpers import MATCH, match_args, tiny_setup


pytestmark = pytest.mark.usefixtures("one_thread")
GPU_LOGIT_TOLERANCE = 0.02  # README, stage 3: a GPU's logits vs a float32 CPU replay, relative to the largest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("match"))


def replayed_logits(store, epoch, data, teacher_path, loader, device="cpu"):
    """(fresh teacher logits, stored logits) of each batch of an epoch, replayed as matching computed them:
    on `device`, under the autocast the run used, rounded to the stored dtype."""
    meta = read_meta(store)
    plan, soft = read_epoch(store, epoch, meta)
    device = torch.device(device)
    teacher, record = load_teacher_file(teacher_path)
    teacher = teacher.to(device, memory_format=memory_format(device))
    amp = amp_dtype("auto", device, prefer_fp16=meta["dtype"] == "float16")
    paths = [p for p, _ in ImageFolderDataset(data / "train").samples]
    source = views.build_source(loader, paths, views.image_sizes(paths), 32, 0)
    for b in range(plan.num_batches):
        job = fkd.make_job(plan, b)
        (_, x), = fkd.replay_batches(plan, [job], source, 0, device, meta)
        start, end = plan.bounds(b)
        with torch.no_grad(), autocast(device, amp):
            fresh = teacher(x.contiguous(memory_format=memory_format(device)))
        yield fresh.to(getattr(torch, meta["dtype"])).float().cpu(), soft.rows(start, end)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loader,mix,fp16", [("tensor", "cutmix", False), ("tensor", "mixup", True),
                                             ("pil", "cutmix", True), ("pil", "mixup", False)])
def test_replay_reproduces_stored_logits(tiny, tmp_path, device, loader, mix, fp16):
    """On the CPU, and on a GPU with --deterministic, replaying a stored epoch gives back its logits exactly."""
    data, teacher = tiny
    store = tmp_path / "store"
    extra = ["--use-fp16"] if fp16 else []
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 3, "--mix-type", mix, "--loader", loader,
                                        *extra, *device_flags(device))) == 0
    if device == "cuda":
        set_deterministic(True)
    for epoch in range(3):
        for fresh, stored in replayed_logits(store, epoch, data, teacher, loader, device):
            assert torch.equal(fresh, stored)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp16", [False, True])
def test_gpu_logits_agree_with_float32_cpu_replay(tiny, tmp_path, fp16, capsys):
    """A default GPU run (bf16 autocast, or fp16 with --use-fp16; TF32, benchmarked kernels) stores logits within
    the tolerance the README states of a float32 replay on the CPU."""
    data, teacher = tiny
    store = tmp_path / "store"
    extra = ["--use-fp16"] if fp16 else []
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 2, "--mix-type", "cutmix", *extra)) == 0
    worst = 0.0
    for epoch in range(2):
        for fresh, stored in replayed_logits(store, epoch, data, teacher, "tensor", "cpu"):
            worst = max(worst, float(((fresh - stored).abs().max() / fresh.abs().max())))
    with capsys.disabled():
        print(f"\nGPU ({'fp16' if fp16 else 'bf16'}) vs CPU float32 logits: max |diff| {worst:.4f} of the largest |logit|")
    assert worst <= GPU_LOGIT_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
def test_topk_store_rebuilds_teacher_top(tiny, tmp_path, device):
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--mix-type", "cutmix",
                                        "--soft-label-topk", 2, *device_flags(device))) == 0
    raw = load_file(str(epoch_file(store, 0)))
    assert set(raw) >= {"topk_values", "topk_indices", "rest_mean"} and "logits" not in raw
    assert raw["topk_indices"].dtype == torch.uint8 and json.loads((store / "meta.json").read_text())["topk"] == 2
    if device == "cuda":
        set_deterministic(True)
    for fresh, rebuilt in replayed_logits(store, 0, data, teacher, "tensor", device):
        assert torch.allclose(rebuilt, keep_topk(fresh, 2), atol=1e-6)


def test_int8_store_replays_within_half_a_step_and_trains(tiny, tmp_path):
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 2, "--mix-type", "cutmix",
                                        "--soft-label-int8", "--device", "cpu")) == 0
    raw = load_file(str(epoch_file(store, 0)))
    assert raw["logits_q"].dtype == torch.uint8 and "logits" not in raw and read_meta(store)["int8"] is True
    meta = read_meta(store)
    plan, soft = read_epoch(store, 0, meta)
    for b, (fresh, stored) in enumerate(replayed_logits(store, 0, data, teacher, "tensor")):
        start, end = plan.bounds(b)
        step = raw["logits_step"][start:end]
        assert bool(((fresh - stored).abs().max(1).values <= step / 2 + 1e-5).all())
    train = ["--train-dir", data / "train", "--val-dir", data / "val", "--fkd-path", store, "--output-dir",
             tmp_path / "out", "--batch-size", 5, "--input-size", 32, "--model", "convnet", "-j", 0, "--epochs", 2,
             "--device", "cpu"]
    assert run_script("validate/train_FKD.py", train) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_lost_epoch_gives_identical_file(tiny, tmp_path, device):
    data, teacher = tiny
    store = tmp_path / "store"
    args = match_args(data, teacher, store, "--epochs", 3, "--mix-type", "cutmix", "--use-fp16", *device_flags(device))
    assert run_script(MATCH, args) == 0
    last = epoch_file(store, 2)
    before = last.read_bytes()
    last.unlink()
    assert run_script(MATCH, args) == 0
    assert last.read_bytes() == before


def test_torchrun_store_equals_one_process(tiny, tmp_path):
    data, teacher = tiny
    for nproc in (1, 2):
        args = match_args(data, teacher, tmp_path / f"s{nproc}", "--epochs", 2, "--mix-type", "cutmix", "--device", "cpu")
        result = run_torchrun(MATCH, args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-2000:]
        if nproc == 2 and views._shm_room(10**6):  # the two processes of this machine share one host cache
            assert "0.00 GB of host memory, shared by 2 processes" in result.stdout.splitlines()[0]
            assert not list(views.SHARED_MEMORY.glob("d4m-images-*"))  # unlinked once mapped
    for epoch in range(2):
        one, two = (load_file(str(epoch_file(tmp_path / f"s{n}", epoch))) for n in (1, 2))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def bad_teachers(root):
    torch.manual_seed(0)
    (root / "garbage.pt").write_bytes(b"not a teacher")
    save_teacher(root / "two.pt", build_model("convnet", 2, 32), "convnet", 2, 32)
    return root / "garbage.pt", root / "two.pt"


def test_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys):
    data, teacher = tiny
    garbage, two_class = bad_teachers(tmp_path)
    store = tmp_path / "store"
    cases = [
        match_args(tmp_path / "missing", teacher, store),
        match_args(data, garbage, store),
        match_args(data, two_class, store),
        match_args(data, teacher, store, "--input-size", 48),
        ["--data", data / "train", "-a", "not_a_model", "--fkd-path", store],
        match_args(data, teacher, store, "--min-scale-crops", 0),
        match_args(data, teacher, store, "--amp", "bf16"),
        match_args(data, teacher, store, "--soft-label-int8", "--soft-label-topk", 2),
    ]
    for args in cases:
        capsys.readouterr()
        assert run_script(MATCH, args + ["--device", "cpu"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not store.exists()


def test_store_from_another_run_is_refused(tiny, tmp_path, capsys):
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    before = sorted((p.name, p.read_bytes()) for p in store.iterdir())
    capsys.readouterr()
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "-b", 4, "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size" in err[0]
    assert sorted((p.name, p.read_bytes()) for p in store.iterdir()) == before

"""train_FKD.py: resume equality, torchrun equality, outputs, bad input."""
from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from conftest import DEVICES, device_flags, load_script, make_image_folder, run_main, run_script, run_torchrun, top1_on
from d4m.data import IMAGENET_MEAN, IMAGENET_STD
from d4m.models import build_model
from d4m import fkd
from d4m.store import epoch_file
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
    real, checkpoints = module.save_torch, []

    def interrupted(obj, path):  # stopped as epoch 2's checkpoint is written, after epoch 1's
        checkpoints.append(path.name == "checkpoint.pth.tar")
        if sum(checkpoints) > 2:
            raise KeyboardInterrupt
        return real(obj, path)

    module.save_torch = interrupted
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C: one line, exit status 130
        run_main(module, train_args(data, store, tmp_path / "resumed", *common))
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
        assert "Warning" not in result.stderr, result.stderr[-2000:]  # e.g. DDP's deprecated broadcast_buffers
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
    path = str(epoch_file(copy, 0))
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()  # the run's identity: the file stays this store's
    tensors = load_file(path)
    tensors["logits"] = torch.full_like(tensors["logits"], float("nan"))
    save_file(tensors, path, metadata=metadata)
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
        train_args(data, store, out, "--epochs", 1, "--protocol", "online"),
        train_args(data, store, out, "--epochs", 1, "--seeds", 0),
    ]
    for args in cases:
        capsys.readouterr()
        assert run_script(TRAIN, args + ["--device", "cpu"]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() 
               if "%|" not in line and line.replace("\x1b[A", "").strip()]  # tqdm bars are not messages
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists(), args


def test_seeds_train_several_students_and_summarise_them(tiny, tmp_path, capsys):
    data, store = tiny
    out = tmp_path / "out"
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--seeds", 3, "--seed", 5)) == 0
    summary = json.loads((out / "results.json").read_text())
    top1 = [run["top1"] for run in summary["runs"]]
    assert [run["seed"] for run in summary["runs"]] == [5, 6, 7]
    assert top1 == [json.loads((out / f"seed{s}" / "results.json").read_text())["top1"] for s in (5, 6, 7)]
    assert summary["top1_mean"] == pytest.approx(sum(top1) / 3)
    assert summary["top1_std"] == pytest.approx(torch.tensor(top1, dtype=torch.float64).std().item())
    assert summary["ipc"] == 4 and summary["protocol"] == "fkd" and summary["model"] == "convnet"
    assert (out / "seed6" / "checkpoint.pth.tar").is_file()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"final over 3 seeds: top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}"


def test_online_protocol_equals_training_on_a_float32_store(tmp_path):
    """The teacher labelling each batch on the fly gives the logits matching stores, so on the CPU the student
    ends with exactly the weights of the fkd protocol on a float32 store of the same plan."""
    data, teacher = tiny_setup(tmp_path)
    store = tmp_path / "store32"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 2, "--mix-type", "cutmix")) == 0
    common = ["--epochs", 2, "--cos", "-T", 20, "--gradient-accumulation-steps", 2, "--mix-type", "cutmix"]
    assert run_script(TRAIN, train_args(data, store, tmp_path / "fkd", *common)) == 0
    online = train_args(data, store, tmp_path / "online", *common, "--protocol", "online", "--teacher-path", teacher)
    online.remove("--fkd-path")
    online.remove(store)
    assert run_script(TRAIN, online) == 0
    a, b = weights(tmp_path / "fkd" / "checkpoint.pth.tar"), weights(tmp_path / "online" / "checkpoint.pth.tar")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "online" / "results.json").read_text())["protocol"] == "online"


def test_online_protocol_under_torchrun_matches_one_process(tmp_path):
    data, teacher = tiny_setup(tmp_path)
    for nproc in (1, 2):
        args = ["--train-dir", data / "train", "--val-dir", data / "val", "--output-dir", tmp_path / f"p{nproc}",
                "--batch-size", 5, "--input-size", 32, "--model", "convnet", "-j", 0, "--epochs", 2, "--cos",
                "-T", 20, "--gradient-accumulation-steps", 2, "--device", "cpu", "--protocol", "online",
                "--teacher-path", teacher]
        result = run_torchrun(TRAIN, args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Warning" not in result.stderr, result.stderr[-2000:]  # e.g. DDP's deprecated broadcast_buffers
    one, two = (weights(tmp_path / f"p{n}" / "checkpoint.pth.tar") for n in (1, 2))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)


def test_hard_labels_are_the_mixed_one_hot_rows(tiny):
    """Protocol hard's targets, against the mixing formula written out: a view's label weighted by the share of
    the input it keeps, its partner's by the rest (CutMix: the pasted box's area; MixUp: lam)."""
    from d4m import views
    from d4m.data import ImageFolderDataset

    data, _ = tiny
    folder = ImageFolderDataset(data / "train")
    hw = views.image_sizes([p for p, _ in folder.samples])
    for mix in ("cutmix", "mixup"):
        plan = fkd.draw_epoch(42, 0, hw, 5, 32, mix)
        for b in range(plan.num_batches):
            start, end = plan.bounds(b)
            target = fkd.mixed_labels(plan, fkd.make_job(plan, b), torch.tensor(folder.targets), 3, mix, 32)
            for row in range(end - start):
                own = folder.targets[int(plan.order[start + row])]
                partner = folder.targets[int(plan.order[start + int(plan.perm[start + row])])]
                if mix == "cutmix":
                    y1, x1, y2, x2 = plan.box[b].tolist()
                    keep = 1 - (y2 - y1) * (x2 - x1) / 32 ** 2
                else:
                    keep = float(plan.lam[b])
                expected = torch.zeros(3)
                expected[own] += keep
                expected[partner] += 1 - keep
                torch.testing.assert_close(target[row], expected)


@pytest.mark.parametrize("length, accumulation, world", [(10, 1, 1), (10, 2, 1), (10, 1, 2), (7, 2, 2), (9, 4, 2),
                                                         (3, 1, 4), (1, 2, 4), (5, 3, 1)])
def test_each_batch_row_is_trained_once(length, accumulation, world):
    """The processes' rows are contiguous and cover the batch once; each process's micro-batches cover its rows, one
    per piece, max(A, processes) pieces in all."""
    module = load_script(TRAIN)
    rows = [module.my_rows(length, accumulation, rank, world) for rank in range(world)]
    assert rows[0][0] == 0 and rows[-1][1] == length and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    for rank, (first, last) in enumerate(rows):
        parts = module.micro_batches(length, accumulation, rank, world)
        assert len(parts) * world == max(accumulation, world)
        assert [r for part in parts for r in range(last - first)[part]] == list(range(last - first))


def test_hard_protocol_needs_no_store(tiny, tmp_path):
    data, _ = tiny
    args = train_args(data, tmp_path / "unused", tmp_path / "out", "--epochs", 2, "--protocol", "hard")
    i = args.index("--fkd-path")
    del args[i:i + 2]
    assert run_script(TRAIN, args) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    student = build_model("convnet", 3, 32)
    student.load_state_dict(torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=True)["model"])
    assert result["protocol"] == "hard"
    assert result["top1"] == pytest.approx(top1_on(student, data / "val", 32, IMAGENET_MEAN, IMAGENET_STD))


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if "%|" not in line and line.replace("\x1b[A", "").strip()]  # tqdm bars are not messages
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def edited(checkpoint, path, **changes):
    """A copy of a checkpoint with some entries replaced, as a hand-edited or hand-made file would have them."""
    torch.save({**torch.load(checkpoint, weights_only=True), **changes}, path)
    return path


def test_a_checkpoint_that_cannot_be_resumed_is_one_line_naming_it(tiny, tmp_path, capsys):
    """Damaged, not a checkpoint, or of a run with other settings (architecture, class count, epochs): refused in
    one line that names the file, before any work, writing nothing; what may change on resume (-j,
    --eval-interval) does not stop it."""
    data, store = tiny
    run = tmp_path / "run"
    assert run_script(TRAIN, train_args(data, store, run, "--epochs", 2, "--device", "cpu")) == 0
    ckpt = run / "checkpoint.pth.tar"
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    text = tmp_path / "notes.pth.tar"
    text.write_text("not a checkpoint")
    four = make_image_folder(tmp_path / "four", classes=4, per_class=2)
    other = tmp_path / "other"
    assert run_script(TRAIN, train_args(four, tmp_path / "unused", other, "--epochs", 2, "--protocol", "hard",
                                        "--device", "cpu")) == 0
    out = tmp_path / "out"
    cases = [
        (truncated, [], "does not load"),
        (text, [], "does not load"),
        (run / "model_best.pth.tar", [], "is not a checkpoint of validate/train_FKD.py"),
        (ckpt, ["--model", "resnet18"], "--model convnet there, resnet18 here"),
        (ckpt, ["--epochs", 3], "--epochs 2 there, 3 here"),
        (other / "checkpoint.pth.tar", [], "the class count 4 there, 3 here"),
        (edited(ckpt, tmp_path / "list.pth.tar", settings=[1, 2]), [], "is damaged (its settings is not"),
        (edited(ckpt, tmp_path / "x.pth.tar", epoch="x"), [], "is damaged (its epoch is not"),
        (edited(ckpt, tmp_path / "late.pth.tar", epoch=500), [], "is at epoch 500, past --epochs 2"),
    ]
    for path, extra, says in cases:
        capsys.readouterr()
        assert run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--device", "cpu", *extra,
                                            "--resume", path)) == 2, path
        line = error_line(capsys)
        assert str(path) in line and says in line and "--overwrite" in line, line
        assert not out.exists()
    before = ckpt.read_bytes()
    assert run_script(TRAIN, train_args(data, store, run, "--epochs", 2, "--device", "cpu", "-j", 1,
                                        "--eval-interval", 1, "--resume")) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2 and ckpt.read_bytes() == before


def test_a_stop_between_the_checkpoint_and_the_metrics_loses_no_row(tiny, tmp_path):
    """The metrics rows travel in the checkpoint: a run stopped after writing epoch 1's checkpoint but before its
    metrics file still ends, resumed, with one row per epoch."""
    data, store = tiny
    out = tmp_path / "out"
    args = train_args(data, store, out, "--epochs", 3, "--eval-interval", 1, "--device", "cpu")
    module = load_script(TRAIN)
    real, calls = module.write_metrics, []

    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    module.write_metrics = stopped
    with pytest.raises(SystemExit, match="130"):
        run_main(module, args)
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_script(TRAIN, args + ["--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2] and all("top1" in row for row in rows)
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["metrics"] == rows


def test_an_output_folder_holding_a_run_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    data, store = tiny
    out = tmp_path / "out"
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 1, "--device", "cpu")) == 0
    before = (out / "checkpoint.pth.tar").read_bytes()
    for extra in ([], ["--seeds", 2], ["--resume", "--overwrite"]):
        capsys.readouterr()
        assert run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--device", "cpu", *extra)) == 2
        line = error_line(capsys)
        assert "--resume" in line and "--overwrite" in line, line
    assert (out / "checkpoint.pth.tar").read_bytes() == before
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--seed", 1, "--device", "cpu",
                                        "--overwrite")) == 0
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 2 and state["settings"]["seed"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("flag, value", [("--seed", -1), ("--fkd_seed", -1), ("--adamw-lr", -1), ("-lr", 0),
                                         ("--weight-decay", -1), ("--epochs", 0), ("--batch-size", -5),
                                         ("-T", "nan"), ("--input-size", 4)])
def test_bad_numbers_are_one_line(tiny, tmp_path, capsys, flag, value):
    data, store = tiny
    args = train_args(data, store, tmp_path / "out", "--protocol", "hard", "--sgd", "--device", "cpu", flag, value)
    assert run_script(TRAIN, args) == 2
    assert flag in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_weights_and_biases_gets_settings_only_and_the_key_is_kept_nowhere(tiny, tmp_path, monkeypatch):
    """--wandb with a key on the command line: the key is used to log in, but neither sent in the run's config nor
    written to any output; no local path is sent; the run is finished."""
    data, store = tiny
    calls = []

    class Run:
        def log(self, row):
            calls.append(("log", row))

        def finish(self):
            calls.append(("finish",))

    wandb = types.ModuleType("wandb")
    wandb.login = lambda key: calls.append(("login", key))
    wandb.init = lambda project, config: calls.append(("init", project, config)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "out"
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--device", "cpu", "--wandb",
                                        "--wandb-api-key", "SECRET-KEY-123")) == 0
    assert calls[0] == ("login", "SECRET-KEY-123") and calls[-1] == ("finish",)
    (_, project, config), = [c for c in calls if c[0] == "init"]
    assert project == "d4m" and config["epochs"] == 2 and config["model"] == "convnet"
    sent = json.dumps(config)
    assert "SECRET" not in sent and str(tmp_path) not in sent
    assert [c[1]["epoch"] for c in calls if c[0] == "log"] == [0, 1]
    for path in out.rglob("*"):
        assert b"SECRET-KEY-123" not in path.read_bytes(), path


@pytest.mark.parametrize("protocol", ["fkd", "hard"])
def test_validating_more_often_changes_no_weight(tiny, tmp_path, protocol):
    """Validation draws nothing from the random streams training uses: a student validated every epoch ends with
    the weights of one validated only at the last (evaluate.py validates once, at the end)."""
    data, store = tiny
    for every in (1, 3):
        argv = train_args(data, store, tmp_path / f"every{every}", "--epochs", 3, "--protocol", protocol,
                          "--eval-interval", every)
        if protocol == "hard":  # no store
            at = argv.index("--fkd-path")
            argv = argv[:at] + argv[at + 2:]
        assert run_script(TRAIN, argv) == 0
    often, once = (weights(tmp_path / f"every{every}" / "checkpoint.pth.tar") for every in (1, 3))
    assert often.keys() == once.keys() and all(torch.equal(often[k], once[k]) for k in often)

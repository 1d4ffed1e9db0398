"""Crafted soft-label stores (issue 24): epoch files rewritten with other dtypes, shapes or values, their run's
identity recomputed so that the digest matches, a meta.json of absurd counts, a header claiming a terabyte, JSON
nested 100000 deep. Each is refused by train_FKD.py in one line naming the file (exit status 2), before a tensor of
it is used and before the student is trained."""
from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save

from conftest import one_error_line, run_script
from d4m.store import ID_KEY, META_NAME, epoch_file, store_id
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny store of 2 epochs (13 images: 3 batches of 5, CutMix), the data and teacher it was made from."""
    root = tmp_path_factory.mktemp("made")
    data, teacher = tiny_setup(root)
    (data / "train" / "class0" / "extra.png").write_bytes((data / "train" / "class0" / "0.png").read_bytes())
    assert run_script(MATCH, match_args(data, teacher, root / "store", "--epochs", 2, "--mix-type", "cutmix",
                                        "--device", "cpu")) == 0
    return data, root / "store", teacher


@pytest.fixture
def store(made, tmp_path):
    shutil.copytree(made[1], tmp_path / "store")
    return tmp_path / "store"


def train(data, store, out) -> int:
    return run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--device", "cpu"))


def rewrite(store, change) -> None:
    """Epoch 0 with `change` applied to its tensors, marked with the store's identity as matching would."""
    meta = json.loads((store / META_NAME).read_text())
    tensors = load_file(epoch_file(store, 0))
    change(tensors)
    epoch_file(store, 0).write_bytes(save(tensors, metadata={ID_KEY: store_id(meta)}))


def put(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def edit(key, how):
    return lambda tensors: tensors.__setitem__(key, how(tensors[key].clone()))


def set_first(value):
    def change(tensor):
        tensor.view(-1)[0] = value
        return tensor
    return change


CRAFTS = {
    # other dtypes or shapes than meta.json implies: refused from the header, before training
    "box stored as float": (edit("box", lambda t: t.float()), "its box is F32 [3, 4] where meta.json implies I32 [3, 4]"),
    "logits of shape [6,7]": (put("logits", torch.zeros(6, 7)), "its logits is F32 [6, 7] where meta.json implies F32 [13, 3]"),
    "logits of shape [2,3]": (put("logits", torch.zeros(2, 3)), "its logits is F32 [2, 3]"),
    "int8 logits": (edit("logits", lambda t: t.to(torch.int8)), "its logits is I8 [13, 3]"),
    "bool logits": (edit("logits", lambda t: t > 0), "its logits is BOOL [13, 3]"),
    "float64 logits": (edit("logits", lambda t: t.double()), "its logits is F64 [13, 3]"),
    "float order": (edit("order", lambda t: t.float()), "its order is F32 [13]"),
    "float flips": (edit("flips", lambda t: t.float()), "its flips is F32 [13]"),
    "order too short": (edit("order", lambda t: t[:5]), "its order is I32 [5]"),
    "a tensor too many": (put("topk_values", torch.zeros(13, 2)), "its topk_values is F32 [13, 2] where meta.json implies none"),
    # values no matching run writes: refused before the epoch's tensors are used
    "order holding 999999": (edit("order", set_first(999999)), "its order is not a permutation of the images"),
    "order repeating an image": (edit("order", lambda t: torch.zeros_like(t)), "its order is not a permutation"),
    "NaN crops": (edit("crops", set_first(float("nan"))), "a crop is not a box inside its image"),
    "a crop past its image": (edit("crops", lambda t: t.index_fill_(1, torch.tensor([2]), 1.5)), "a crop is not a box"),
    "a crop of no pixel": (edit("crops", lambda t: t.index_fill_(1, torch.tensor([3]), 1e-9)),
                           "a crop is not a box of at least one pixel"),
    "a flip of 7": (edit("flips", set_first(7)), "a flip is neither 0 nor 1"),
    "a mix partner outside its batch": (edit("perm", set_first(9)), "its mix partners are not a permutation"),
    "a mix weight of 2": (edit("lam", set_first(2.0)), "a mix weight is outside [0, 1]"),
    "a box of 1e9": (edit("box", lambda t: t.index_fill_(1, torch.tensor([2]), 10**9)), "a CutMix box is not inside"),
    "a NaN logit": (edit("logits", set_first(float("nan"))), "a soft label is not a finite number"),
}


@pytest.mark.parametrize("craft", CRAFTS)
def test_a_crafted_epoch_file_is_refused_before_training(made, store, tmp_path, capsys, craft):
    change, why = CRAFTS[craft]
    rewrite(store, change)
    capsys.readouterr()
    assert train(made[0], store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"soft-label file {epoch_file(store, 0)} " in line and why in line, line
    assert not (tmp_path / "out" / "checkpoint.pth.tar").exists()


def test_a_crafted_epoch_file_is_rewritten_by_the_resumed_matching(made, store, tmp_path, capsys):
    """Matching's resume treats a file of the wrong layout like a truncated one: it writes it again."""
    data, _, teacher = made
    good = epoch_file(store, 0).read_bytes()
    rewrite(store, CRAFTS["logits of shape [6,7]"][0])
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 2, "--mix-type", "cutmix",
                                        "--device", "cpu")) == 0
    assert epoch_file(store, 0).read_bytes() == good


def recompute_identity(store, meta: dict) -> None:
    """meta.json replaced by `meta`, every epoch file marked with its identity: what a careful forger does."""
    (store / META_NAME).write_text(json.dumps(meta))
    for epoch in range(meta["epochs"]):
        tensors = load_file(epoch_file(store, epoch))
        epoch_file(store, epoch).write_bytes(save(tensors, metadata={ID_KEY: store_id(meta)}))


@pytest.mark.parametrize("key, value, why", [
    ("num_classes", 10**10, "num_classes is 10000000000, not at most 1048576"),
    ("input_size", 10**6, "input_size is 1000000, not at most 4096"),
    ("data_classes", 7, "data_classes is 7, not at most num_classes"),
    ("std", [0.2, 0.0, 0.2], "std is [0.2, 0.0, 0.2], not three positive numbers"),
    ("mixup", float("nan"), "mixup is nan, not a positive number"),
])
def test_a_meta_json_of_absurd_values_is_refused(made, store, tmp_path, capsys, key, value, why):
    meta = json.loads((store / META_NAME).read_text())
    recompute_identity(store, {**meta, key: value})
    capsys.readouterr()
    assert train(made[0], store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{store / META_NAME} is damaged ({why})" in line, line


def test_a_header_claiming_a_terabyte_is_refused_without_reading_it(made, store, tmp_path, capsys):
    """A sparse file whose header covers it: its logits claim 1 TB, which meta.json does not imply. The size is
    refused from the header; nothing is allocated."""
    meta = json.loads((store / META_NAME).read_text())
    tensors = load_file(epoch_file(store, 0))
    header, offset = {"__metadata__": {ID_KEY: store_id(meta)}}, 0
    for key, tensor in sorted(tensors.items()):
        if key == "logits":
            shape, nbytes = [13, 10**12 // 52], 13 * (10**12 // 52) * 4
        else:
            shape, nbytes = list(tensor.shape), tensor.numel() * tensor.element_size()
        dtype = {torch.float32: "F32", torch.int32: "I32", torch.uint8: "U8", torch.int16: "I16"}[tensor.dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(epoch_file(store, 0), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    capsys.readouterr()
    assert train(made[0], store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"its logits is F32 [13, {10**12 // 52}] where meta.json implies F32 [13, 3]" in line, line
    assert math.isclose(epoch_file(store, 0).stat().st_size, 10**12, rel_tol=1e-3)


def test_a_meta_json_nested_100000_deep_is_refused(made, store, tmp_path, capsys):
    (store / META_NAME).write_text("[" * 100000)
    capsys.readouterr()
    assert train(made[0], store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{store / META_NAME} is damaged (nested more than 64 levels deep)" in line, line

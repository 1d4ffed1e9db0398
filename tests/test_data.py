"""The CIFAR reader of d4m.data: torchvision's python pickles, read without their md5 check."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from d4m.cli import UsageError
from d4m.data import train_dataset, val_dataset
from dataset_files import class_images, real_names, write_cifar10, write_cifar100, write_tiny_imagenet


def test_cifar10_reads_every_training_batch(tmp_path):
    write_cifar10(tmp_path, per_class=3, test_per_class=2)
    data = train_dataset("cifar10", str(tmp_path))
    images, labels = class_images(10, 3, 32, seed=0)
    # the writer deals the images round-robin over data_batch_1..5; the reader concatenates the batches in order
    assert data.data.dtype == np.uint8 and data.data.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(data.data, np.concatenate([images[b::5] for b in range(5)]))
    assert data.targets == np.concatenate([labels[b::5] for b in range(5)]).tolist()
    assert data.classes == real_names("cifar10") and data.classes[0] == "airplane"
    image, label = data[7]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(image), data.data[7])
    assert label == data.targets[7]


def test_cifar10_test_split_and_transform(tmp_path):
    write_cifar10(tmp_path, per_class=1, test_per_class=2)
    data = val_dataset("cifar10", str(tmp_path), transform=lambda img: np.asarray(img).mean())
    images, labels = class_images(10, 2, 32, seed=1)
    assert len(data) == 20 and data.targets == labels.tolist()
    assert data[3] == (pytest.approx(images[3].mean()), labels[3])


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    write_cifar100(tmp_path, per_class=2, test_per_class=1)
    train = train_dataset("cifar100", str(tmp_path))
    images, labels = class_images(100, 2, 32, seed=0)
    np.testing.assert_array_equal(train.data, images)
    assert train.targets == labels.tolist()
    assert train.classes == real_names("cifar100") and train.classes[1] == "aquarium_fish"  # the meta's order
    test = val_dataset("cifar100", str(tmp_path))
    assert len(test) == 100 and test.data.shape == (100, 32, 32, 3)


def test_missing_cifar_file_names_the_file_and_the_layout(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UsageError, match=r"data_batch_3 not found; expected .*cifar-10-batches-py/ with data_batch_1"):
        train_dataset("cifar10", str(tmp_path))
    with pytest.raises(UsageError, match=r"cifar-100-python/train not found; expected .*cifar-100-python/ with train, test and meta"):
        train_dataset("cifar100", str(tmp_path))


class RunsCode:
    """What a crafted pickle can carry: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_a_crafted_cifar_pickle_runs_no_code(tmp_path, monkeypatch):
    """A batch file that asks the unpickler for any function beyond numpy's array rebuild is refused in one line
    naming it, and what it carried never runs."""
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({"data": RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(UsageError, match=r"data_batch_2: it asks for posix.system, which CIFAR's files never hold"):
        train_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "ran").exists()


def test_tiny_imagenet_annotations_that_do_not_fit_are_one_line(tmp_path):
    root = write_tiny_imagenet(tmp_path / "tiny", classes=3)
    assert sorted(label for _, label in val_dataset("tiny_imagenet", str(root)).samples) == [0, 1, 2]
    annotations = root / "val" / "val_annotations.txt"
    rows = annotations.read_text().splitlines()
    annotations.write_text("\n".join(rows[:2] + ["val_x.JPEG\tn99999999\t0\t0\t1\t1"]) + "\n")
    with pytest.raises(UsageError, match=r"line 3: class 'n99999999' has no folder in train/"):
        val_dataset("tiny_imagenet", str(root))
    annotations.write_bytes(b"val_0.JPEG\tn\xe9\t0\t0\t1\t1\n")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        val_dataset("tiny_imagenet", str(root))

"""The shipped label prompts: one line per class, in the dataset's class-index order."""
import pytest

from d4m.cli import UsageError
from d4m.data import NUM_CLASSES, PROMPT_DIR, load_prompts


@pytest.mark.parametrize("dataset", ["imagenet", "tiny_imagenet", "cifar10", "cifar100", "fashion_mnist"])
def test_one_prompt_per_class(dataset):
    assert len(load_prompts(PROMPT_DIR / f"{dataset}.txt", NUM_CLASSES[dataset])) == NUM_CLASSES[dataset]


def test_known_positions():
    imagenet = load_prompts(PROMPT_DIR / "imagenet.txt")
    assert imagenet[0] == "tench, Tinca tinca"
    assert imagenet[1] == "goldfish, Carassius auratus"
    assert (imagenet[134], imagenet[517]) == ("crane, bird", "crane, lifting machine")  # n02012849, n03126707
    assert len(set(imagenet)) == 1000  # no two classes share a prompt
    cifar100 = load_prompts(PROMPT_DIR / "cifar100.txt")
    assert (cifar100[0], cifar100[1], cifar100[99]) == ("apple", "aquarium fish", "worm")
    assert load_prompts(PROMPT_DIR / "cifar10.txt")[0] == "airplane"
    tiny = load_prompts(PROMPT_DIR / "tiny_imagenet.txt")
    assert tiny[0] == "goldfish, Carassius auratus"
    assert all(" " in p for p in tiny if "," in p)  # the original's list had its spaces removed


def test_wrong_count_is_a_usage_error(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("a\nb\n")
    with pytest.raises(UsageError, match="has 2 prompts but the dataset has 10 classes"):
        load_prompts(path, 10)

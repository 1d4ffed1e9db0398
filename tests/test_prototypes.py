"""distillation/gen_prototype.py: faithful per-class clustering, both file formats, torchrun, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import MiniBatchKMeans
from torchvision.transforms.functional import to_tensor

from conftest import run_script, run_torchrun
from d4m.cli import UsageError
from d4m.diffusion import batch_invariant, load_pipeline
from d4m.latents import latent_encoder
from d4m.prototypes import PrototypeFile
from d4m.runtime import seeded_generator
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = "distillation/gen_prototype.py"


def args(data, sd, out, *extra):
    return ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", sd,
            "--save_prototype_path", out, "--size", 32, "--ipc", 2, "--km_expand", 2, "--batch_size", 4,
            "--num_workers", 0, "--device", "cpu", "--seed", 3, *extra]


def reference_centres(data, sd, label, seed=3, ipc=2, km_expand=2, batch_size=4):
    """sklearn on the same latents in the same order: class shuffled by (seed, class), chunks of km_expand*ipc."""
    files = sorted((data / "train" / f"class{label}").glob("*.png"))
    offset = sum(len(list((data / "train" / f"class{c}").glob("*.png"))) for c in range(label))
    order = torch.randperm(len(files), generator=seeded_generator(seed, label)).tolist()
    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, str(sd), torch.device("cpu"))
    latents = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = torch.stack([to_tensor(Image.open(files[i]).convert("RGB")) for i in chunk])
        gens = [seeded_generator(seed, label, offset + i) for i in chunk]
        latents.append(pipe(images, generator=gens).latents.reshape(len(chunk), -1).numpy())
    latents = np.concatenate(latents)
    kmeans = MiniBatchKMeans(n_clusters=ipc, random_state=0, batch_size=km_expand * ipc, n_init="auto")
    for start in range(0, len(latents), km_expand * ipc):  # 6 images: a chunk of 4, then the leftover 2
        kmeans.partial_fit(latents[start : start + km_expand * ipc])
    centres = kmeans.cluster_centers_
    nearest = []  # for each centre in turn, the dataset index of the closest latent not yet taken
    for centre in centres:
        distances = ((latents - centre) ** 2).sum(1)
        distances[[order.index(i - offset) for i in nearest]] = np.inf
        nearest.append(offset + order[int(distances.argmin())])
    return centres.reshape(ipc, 4, 16, 16), nearest


def test_centres_match_sklearn_and_json_matches_binary(image_folder, tiny_sd, tmp_path):
    out = tmp_path / "protos"
    assert run_script(SCRIPT, args(image_folder, tiny_sd, out)) == 0
    protos = PrototypeFile(out / "data-ipc2-kmexpand2.safetensors")
    assert protos.shape == (3, 2, 4, 16, 16) and protos.all().shape == protos.shape
    assert protos.prompts == ["class0", "class1", "class2"]
    assert json.loads(protos.metadata["class_names"]) == ["class0", "class1", "class2"]
    for label in range(3):
        assert torch.equal(protos.of_class(label), protos.all()[label])
        centres, nearest = reference_centres(image_folder, tiny_sd, label)
        np.testing.assert_allclose(protos.of_class(label).numpy(), centres, atol=1e-6, rtol=0)
        assert protos.nearest()[label].tolist() == nearest and len(set(nearest)) == 2
    assert run_script(SCRIPT, args(image_folder, tiny_sd, out, "--prototype_format", "json")) == 0
    as_json = PrototypeFile(out / "data-ipc2-kmexpand2.json")
    assert as_json.prompts == protos.prompts
    assert torch.equal(as_json.all(), protos.all())
    data = json.loads((out / "data-ipc2-kmexpand2.json").read_text())
    assert list(data) == protos.prompts and np.array(data["class0"]).shape == (2, 4, 16, 16)


def test_two_processes_and_another_batch_size_write_the_same_file(image_folder, tiny_sd, tmp_path):
    assert run_script(SCRIPT, args(image_folder, tiny_sd, tmp_path / "one", "--batch_size", 4)) == 0
    done = run_torchrun(SCRIPT, args(image_folder, tiny_sd, tmp_path / "two", "--batch_size", 3, "--num_workers", 1))
    assert done.returncode == 0, done.stderr[-2000:]
    name = "data-ipc2-kmexpand2.safetensors"
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _corrupt(data):
    (data / "train" / "class1" / "3.png").write_bytes(b"not a png")
    return data


def _label_file(tmp_path, lines):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def shown(stderr: str) -> list[str]:
    """The non-empty lines a terminal shows: carriage returns overwrite (closed progress bars erase themselves)."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line]


BAD = {
    "missing data folder": lambda data, sd, tmp: (["--data_dir", tmp / "nowhere"], "does not exist"),
    "empty data folder": lambda data, sd, tmp: ((tmp / "empty" / "train").mkdir(parents=True) or
                                                ["--data_dir", tmp / "empty"], "no class folders"),
    "label count": lambda data, sd, tmp: (["--label_file_path", _label_file(tmp, ["a", "b"])], "has 2 prompts"),
    "unreadable image": lambda data, sd, tmp: (["--data_dir", _corrupt(data), "--num_workers", 2], "3.png"),
    "not a model": lambda data, sd, tmp: (["--diffusion_checkpoints_path", tmp], "model_index.json"),
    "too few images": lambda data, sd, tmp: (["--ipc", 7], "fewer than --ipc 7"),
    "prompts of another dataset": lambda data, sd, tmp: (
        ["--label_file_path", _label_file(tmp, ["T-shirt/top", "Trouser", "Pullover"])],
        "do not name this dataset's classes (class 0 is 'class0', its prompt 'T-shirt/top')"),
    "repeated prompts as json": lambda data, sd, tmp: (
        ["--label_file_path", _label_file(tmp, ["class0", "class1", "class0"]), "--prototype_format", "json"],
        "default --prototype_format safetensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, image_folder, tiny_sd, tmp_path, capsys):
    override, message = BAD[case](image_folder, tiny_sd, tmp_path)
    out = tmp_path / "protos"
    capsys.readouterr()
    assert run_script(SCRIPT, args(image_folder, tiny_sd, out) + override) == 2
    err = shown(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists() or not any(out.iterdir())


def blobs(seed=0, centres=4, per=50, dim=32, spread=0.1):
    """Well-separated clusters in the shape of flattened latents."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen) * 5
    return (means.repeat_interleave(per, 0) + spread * torch.randn(centres * per, dim, generator=gen))


def test_full_kmeans_is_deterministic_and_finds_sklearns_optimum():
    from sklearn.cluster import KMeans

    from d4m.kmeans import class_centres, full_centres

    x = blobs()
    first = full_centres(x, 4, seed=0, label=3, device=torch.device("cpu"))
    assert np.array_equal(first, full_centres(x, 4, seed=0, label=3, device=torch.device("cpu")))
    _, full = class_centres("full", x, 4, 1, 0, 3, torch.device("cpu"))
    _, faithful = class_centres("faithful", x, 4, 1, 0, 3, torch.device("cpu"))
    best = KMeans(n_clusters=4, n_init=10, random_state=0).fit(x.double().numpy()).inertia_
    assert full == pytest.approx(best, rel=1e-5)
    assert full <= faithful * (1 + 1e-6)


def test_inertia_is_the_sum_of_squared_distances_to_the_nearest_centre():
    from d4m.kmeans import inertia

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert inertia(x, np.array([[0.0, 0.0], [10.0, 1.0]]), torch.device("cpu")) == pytest.approx(0 + 1 + 1)


@pytest.mark.parametrize("method", ["faithful", "full"])
def test_kmeans_method_and_inertia_are_reported_and_stored(method, image_folder, tiny_sd, tmp_path, capsys):
    out = tmp_path / "protos"
    assert run_script(SCRIPT, args(image_folder, tiny_sd, out, "--kmeans", method)) == 0
    protos = PrototypeFile(out / "data-ipc2-kmexpand2.safetensors")
    assert protos.shape == (3, 2, 4, 16, 16)
    inertias = protos.inertia()
    assert protos.metadata["kmeans"] == method and inertias.dtype == torch.float64
    assert inertias.shape == (3,) and bool((inertias > 0).all())
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "prototypes: cpu (1 threads), float32, 1 process, VAE batch 4"
    assert out.splitlines()[1] == "classes and prompts: class0 -> 'class0', class1 -> 'class1', class2 -> 'class2'"
    assert protos.metadata["name"] == "data"  # an image folder's outputs are named after it
    assert f"k-means {method}: mean per-class inertia {float(inertias.mean()):.6g}" in out


def test_writer_fills_classes_in_any_order_and_reads_back_one_class(tmp_path):
    from d4m.prototypes import PrototypeWriter, save_prototypes

    tensor = torch.randn(4, 2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c", "d"]
    path = tmp_path / "p.safetensors"
    writer = PrototypeWriter(path, tmp_path / ".p.build", prompts, (2, 4, 3, 3), {"seed": "0"}, "safetensors")
    writer.create()
    for label in (2, 0, 3, 1):
        writer.write(label, tensor[label].numpy(), float(label) + 0.5)
    assert not path.exists()
    writer.commit()
    protos = PrototypeFile(path)
    assert protos.prompts == prompts and protos.metadata["seed"] == "0" and protos.per_class == 2
    assert torch.equal(protos.of_class(3), tensor[3]) and torch.equal(protos.all(), tensor)
    assert protos.inertia().tolist() == [0.5, 1.5, 2.5, 3.5]
    save_prototypes(tmp_path / "p.json", prompts, tensor, "json")
    assert torch.equal(PrototypeFile(tmp_path / "p.json").all(), tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    with pytest.raises(UsageError, match="shape"):
        writer.write(0, tensor[0, :1].numpy(), 0.0)


def test_the_device_batches_write_the_file_of_the_originals_batch_of_10(tmp_path, tiny_sd):
    """The VAE batch stage 1 picks by device (VAE_BATCH: 10 on the CPU, 32 on CUDA) is a speed knob: the file is
    the same bytes at the original's 10 and at 32, on classes of more images than either."""
    from conftest import load_script, make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, per_class=40, size=16)
    for batch in (10, 32):
        argv = args(data, tiny_sd, tmp_path / f"b{batch}")
        argv[argv.index("--batch_size") + 1] = batch
        argv[argv.index("--size") + 1] = 16
        assert run_script(SCRIPT, argv) == 0
    name = "data-ipc2-kmexpand2.safetensors"
    assert (tmp_path / "b10" / name).read_bytes() == (tmp_path / "b32" / name).read_bytes()
    assert load_script(SCRIPT).VAE_BATCH == {"cuda": 32, "cpu": 10}


def test_the_compiled_encoders_padded_batches_give_the_same_latents(tiny_sd):
    """With --compile every VAE call is padded to --batch_size images (one compiled shape); the padding changes no
    latent. Run uncompiled on the CPU: the same path but for the compiler."""
    cpu = torch.device("cpu")
    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, str(tiny_sd), cpu)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with batch_invariant(pipe, cpu), torch.no_grad():
        plain = latent_encoder(pipe, 5, False)(pixels, [seeded_generator(0, 1, i) for i in range(5)])
        padded = latent_encoder(pipe, 8, True)(pixels, [seeded_generator(0, 1, i) for i in range(5)])
    assert padded.shape == plain.shape == (5, 4, 16, 16) and torch.equal(padded, plain)

"""Benchmark: peak host and device memory of the parts of each stage that grow with IPC, at ImageNet's size.

prototypes: stage 1 writes a prototype file of 1000 classes x IPC x 4 x 64 x 64 float32 class by class, and
            stage 2 reads it back one class at a time (what every synthesis process does); random prototypes.
fkd:        stages 3 and 4 with the tensor loader: a host cache of 1000 x IPC images of 224 px (filled with a
            pattern, not decoded from files), the epoch's soft labels (fp16, pinned on CUDA), then a few batches of
            matching (ResNet-18 teacher, fp16 autocast on CUDA) and of training (ResNet-18 student, bf16 autocast,
            AdamW) through the loader's workers.
Each IPC runs in its own process; host figures are that process's peak resident memory (its workers share the
cache's pages), device figures torch's peak allocation.

    python bench/bench_memory.py --part prototypes                       # CPU is enough
    python bench/bench_memory.py --part fkd --device cuda -j 8           # on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d4m import fkd, labelcodec, views
from d4m.data import IMAGENET_MEAN, IMAGENET_STD
from d4m.device import amp_dtype, autocast, memory_format, pick_device
from d4m.models import build_model
from d4m.prototypes import PrototypeFile, PrototypeWriter
from measure import machine, peak_device_gb, peak_host_gb, write_json

CLASSES = 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("prototypes", "fkd"), required=True)
    p.add_argument("--ipcs", type=int, nargs="+", default=[10, 50, 100, 200])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=4, help="batches of matching and of training (fkd)")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--folder", default=None, help="where the prototype files go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--ipc", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def prototypes_at(ipc: int, folder: Path) -> dict:
    prompts = [f"class {c}" for c in range(CLASSES)]
    path = folder / f"imagenet-ipc{ipc}.safetensors"
    writer = PrototypeWriter(path, folder / f".ipc{ipc}.build", prompts, (ipc, 4, 64, 64), {}, "safetensors")
    writer.create()
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        writer.write(label, rng.standard_normal((ipc, 4, 64, 64), dtype=np.float32), 1.0)
    writer.commit()
    written = peak_host_gb()
    protos = PrototypeFile(path)
    total = sum(float(protos.of_class(label)[0, 0, 0, 0]) for label in range(CLASSES))  # touch every class
    size = path.stat().st_size / 1e9
    path.unlink()
    return {"file_gb": size, "peak_host_gb_after_writing": written, "peak_host_gb": peak_host_gb(),
            "checksum": total}


def fkd_at(ipc: int, args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    count = CLASSES * ipc
    sizes = np.full((count, 2), 224, np.int64)
    images = views.HostImages(np.empty(views.HostImages.nbytes_of(sizes), np.uint8), sizes)
    images.data.reshape(-1, 256)[:] = np.arange(256, dtype=np.uint8)  # every page touched (224*224*3 = 588*256)
    source = views.CropViews(images, 224)
    soft = labelcodec.SoftLabels({"logits": torch.randn(count, CLASSES).half()}, CLASSES)
    soft = soft.pin() if device.type == "cuda" else soft
    torch.manual_seed(0)
    layout = memory_format(device)
    teacher = build_model("resnet18", CLASSES).to(device, memory_format=layout).eval().requires_grad_(False)
    student = build_model("resnet18", CLASSES).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    plan = fkd.draw_epoch(42, 0, sizes, args.batch_size, 224)
    jobs = [fkd.make_job(plan, b) for b in range(min(args.batches, plan.num_batches))]
    meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "mix_type": "cutmix"}
    replay = lambda: fkd.replay_batches(plan, jobs, source, args.workers, device, meta)  # noqa: E731
    with torch.no_grad(), autocast(device, amp_dtype("auto", device, prefer_fp16=True)):
        logits = [teacher(x.contiguous(memory_format=layout)).half().to("cpu", non_blocking=True) for _, x in replay()]
    for job, x in replay():
        start, end = plan.bounds(job.batch)
        optimizer.zero_grad(set_to_none=True)
        for piece, target in zip(x.chunk(2), soft.rows(start, end, device).chunk(2)):
            with autocast(device, amp_dtype("auto", device)):
                out = student(piece.contiguous(memory_format=layout))
            loss = F.kl_div(F.log_softmax(out.float() / 20, 1), F.softmax(target / 20, 1), reduction="sum")
            (loss / len(x)).backward()
        optimizer.step()
    return {"images": count, "cache_gb": images.data.nbytes / 1e9, "soft_labels_gb": count * CLASSES * 2 / 1e9,
            "peak_host_gb": peak_host_gb(), "peak_device_gb": peak_device_gb(device), "batches": len(logits),
            "machine": machine(device)}


def main() -> None:
    args = parse_args()
    if args.ipc is not None:
        if args.part == "prototypes":
            with tempfile.TemporaryDirectory(dir=args.folder) as folder:
                print(json.dumps(prototypes_at(args.ipc, Path(folder))))
        else:
            print(json.dumps(fkd_at(args.ipc, args)))
        return
    results = {}
    for ipc in args.ipcs:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ipc", str(ipc)], capture_output=True,
                              text=True)
        if done.returncode:
            sys.exit(f"IPC {ipc} failed:\n{done.stderr[-3000:]}")
        results[ipc] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[ipc]
        if args.part == "prototypes":
            print(f"IPC {ipc:4d}: file {r['file_gb']:6.2f} GB, peak host {r['peak_host_gb_after_writing']:.2f} GB "
                  f"writing, {r['peak_host_gb']:.2f} GB after reading every class")
        else:
            device_gb = f"{r['peak_device_gb']:.2f} GB" if r["peak_device_gb"] is not None else "- (CPU)"
            print(f"IPC {ipc:4d}: cache {r['cache_gb']:6.2f} GB + soft labels {r['soft_labels_gb']:.2f} GB per "
                  f"epoch; peak host {r['peak_host_gb']:6.2f} GB, peak device {device_gb}")
    write_json(args.json, {"part": args.part, "results": results})


if __name__ == "__main__":
    main()

"""Print the GPU table of bench/bench_gpu.sh from the JSON figures its three benchmarks wrote.

    python bench/gpu_table.py outputs/bench_gpu
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {1: ">= 250 incl. decoding", 2: ">= 6", 3: ">= 20,000", 4: ">= 9,000"}  # images/s on an H100


def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def rows(folder: Path) -> list[list[str]]:
    protos = json.loads((folder / "prototypes.json").read_text())
    synth = json.loads((folder / "synthesis.json").read_text())
    fkd = json.loads((folder / "fkd.json").read_text())
    fkd_set = fkd["settings"]
    vae = rate(protos["vae_alone_img_s"]) + (f" plain, {rate(protos['vae_alone_compiled_img_s'])} compiled"
                                             if protos["vae_alone_compiled_img_s"] else "")
    return [
        [f"1 VAE encoding, {protos['size']} px, JPEG input, batch {protos['batch']}", rate(protos["ours_img_s"]),
         rate(protos["original_img_s"]), vae, TARGETS[1]],
        [f"2 synthesis, {synth['size']} px, batch {synth['batch']}", rate(synth["batched_img_s"]),
         rate(synth["original_img_s"]),
         f"UNet {rate(synth['unet_alone_samples_s'])} samples/s = {rate(synth['unet_alone_img_s'])} img/s", TARGETS[2]],
        [f"3 matching, {fkd_set['arch']}, {fkd_set['input_size']} px, batch {fkd_set['batch_size']}",
         rate(fkd["ours"]["matching_img_s"]), rate(fkd["original"]["matching_img_s"]),
         rate(fkd["alone"]["matching_img_s"]), TARGETS[3]],
        [f"4 student training, {fkd_set['arch']}, batch {fkd_set['batch_size']} in {fkd_set['accumulation']} pieces",
         rate(fkd["ours"]["training_img_s"]), rate(fkd["original"]["training_img_s"]),
         rate(fkd["alone"]["training_img_s"]), TARGETS[4]],
    ]


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/bench_gpu")
    machine = json.loads((folder / "fkd.json").read_text())["machine"]
    print(f"images/s on {machine}")
    print("| stage | ours | original's way | network alone | target |")
    print("|---|---|---|---|---|")
    for row in rows(folder):
        print("| " + " | ".join(row) + " |")
    successors = folder / "successors.json"
    if successors.is_file():
        cost = json.loads(successors.read_text())
        per_image = cost["seconds_per_image"]
        print(f"\nseconds per image, {cost['model']}, {cost['size']} px, {cost['dtype']}, IPC {cost['ipc']}")
        print("| D4M | MGD3 | D3HR (+ inversion of 500 real images per class) | CaO2 |")
        print("|---|---|---|---|")
        print(f"| {per_image['d4m']:.3f} | {per_image['mgd3']:.3f} | {per_image['d3hr']:.3f} "
              f"({per_image['d3hr_with_inversion']:.3f}) | {per_image['cao2']:.3f} |")


if __name__ == "__main__":
    main()

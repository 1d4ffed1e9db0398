"""Where and how a stage computes: the device (never a silent CPU fallback), the line every stage prints at
start, mixed precision and memory layout for the classifiers, and the --deterministic switch."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

import torch

from d4m.cli import DIFFUSION_DTYPES, UsageError

DTYPES = {name: getattr(torch, name) for name in DIFFUSION_DTYPES}  # the diffusion weights
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def cuda_build() -> str:
    return f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                             else "a CPU-only build")


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else this process's CUDA device under torchrun, else the CPU with a warning.

    Asking for CUDA where torch cannot use it is a UsageError: a mismatch between torch's CUDA build and the
    driver would otherwise turn a GPU run into a CPU run of days."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise UsageError(f"--device {requested!r} is not a device name; use cuda, cuda:N or cpu") from err
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {requested} asked for, but torch.cuda.is_available() is false ({cuda_build()}); "
                                 "check that nvidia-smi sees the GPU and that torch's CUDA build suits the driver "
                                 "(README, Set-up), or pass --device cpu")
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if device.index >= torch.cuda.device_count():
                raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("D4M_CPU_NOTED"):  # run_all.sh says it once
        print(f"warning: no usable CUDA device (torch.cuda.is_available() is false; {cuda_build()}), so this runs "
              "on the CPU, which is slow at ImageNet scale; pass --device cpu to choose the CPU and silence this",
              file=sys.stderr, flush=True)
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def announce(stage: str, device: torch.device, precision: str, world: int, rank: int = 0, *details: str) -> None:
    """The one line every stage prints at start (rank 0 only): device, precision, processes and any details."""
    if rank == 0:
        parts = [describe(device), precision, f"{world} process" + ("es" if world > 1 else ""), *details]
        print(f"{stage}: " + ", ".join(parts), flush=True)


def amp_dtype(choice: str, device: torch.device, prefer_fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype of a classifier: auto is bf16 on CUDA (fp16 when `prefer_fp16`: matching with --use-fp16,
    whose logits are stored in fp16 anyway; the original's teacher ran float32) and none on the CPU, where the exact
    float32 path is kept."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.float16 if prefer_fp16 else torch.bfloat16
    dtype = AMP_DTYPES[choice]
    if dtype is not None and device.type != "cuda":
        raise UsageError(f"--amp {choice} runs on CUDA only; use --amp off (or auto) on the {device.type}")
    return dtype


def precision_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def eval_batch(device: torch.device) -> int:
    """Images per forward pass where a model only scores images (validation, label check, features): 256 on a GPU,
    32 on a CPU, where the ConvNet's 32 px activations of 256 images spill out of the cache and run slower. A
    batch changes an image's logits in the last bits at most (on this project's CPU, not at all from 16 to 256)."""
    return 256 if device.type == "cuda" else 32


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (what tensor-core convolutions read fastest); the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def set_deterministic(enabled: bool) -> None:
    """With `enabled`, deterministic kernels and no TF32, so that a GPU run repeats bit for bit (resume, replay);
    ops without a deterministic implementation warn rather than stop a long run. Otherwise cuDNN may benchmark
    and pick the fastest convolution algorithms."""
    if not enabled:
        torch.backends.cudnn.benchmark = True
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible reductions
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def compile_unavailable(device: torch.device) -> str:
    """Why torch.compile cannot run here ('' when it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    import torch._dynamo as dynamo

    if not dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    compiler = os.environ.get("CXX", "g++")
    if device.type == "cpu" and shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for TorchInductor's CPU kernels"
    return ""


def maybe_compile(module: torch.nn.Module, device: torch.device, enabled: bool, rank: int = 0) -> torch.nn.Module:
    """`torch.compile(module)` when asked and possible; otherwise the module, with a line saying why."""
    if not enabled:
        return module
    reason = compile_unavailable(device)
    if reason:
        if rank == 0:
            print(f"--compile skipped: {reason}; running uncompiled", file=sys.stderr)
        return module
    return torch.compile(module)

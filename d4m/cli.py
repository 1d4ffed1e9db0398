"""The command line every script shares. It imports only the standard library, so that a script answers --help
and refuses a bad flag before torch loads (seconds): the parser and its argument types, the choices flags take,
the device flags, and `cli`, which turns any refusal into one line and exit status 2."""
from __future__ import annotations

import argparse
import errno
import functools
import io
import math
import signal
import sys
from typing import Callable, NoReturn

DATASETS = ("imagenet", "tiny_imagenet", "cifar10", "cifar100", "fashion_mnist", "imagefolder")
KMEANS_METHODS = ("faithful", "full")
PROTOTYPE_FORMATS = ("safetensors", "json")
DIFFUSION_DTYPES = ("float16", "bfloat16", "float32")  # the diffusion weights' dtypes
AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # a classifier's autocast
MIX_TYPES = ("mixup", "cutmix", "None")
PROTOCOLS = ("fkd", "online", "hard")  # where a student's soft labels come from (validate/)
LOADERS = ("tensor", "pil")  # where FKD's views are cropped and resized (d4m.views)
RESIZE_FILTERS = ("bicubic", "bilinear", "lanczos", "nearest")  # PIL resampling filters of saved images
DIST_TIMEOUT_MINUTES = 180

WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                errno.EISDIR)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are UsageErrors, so that a bad flag is one line and exit status 2 like every other
    refusal (under `cli`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def _number(text: str, kind: type, ok: Callable[[float], bool], what: str) -> int | float:
    try:
        value = kind(text)
        if ok(value):
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")


def positive_int(text: str) -> int:
    """argparse type: 1, 2, ..."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: 0, 1, 2, ..."""
    return _number(text, int, lambda v: v >= 0, "0 or a positive integer")


def seed_int(text: str) -> int:
    """argparse type: a seed torch and numpy both take, 0 .. 2**63 - 1."""
    return _number(text, int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")


MAX_SIDE = 4096  # pixels: more than any classifier or SD VAE here takes; a 4096-px float image is 200 MB


def image_side(text: str) -> int:
    """argparse type: the side of a square image in pixels, 1 .. MAX_SIDE (beyond that a model's first pass alone
    would need terabytes)."""
    return _number(text, int, lambda v: 1 <= v <= MAX_SIDE, f"a side in pixels from 1 to {MAX_SIDE}")


def finite_float(text: str) -> float:
    """argparse type: any finite number (ranges are checked after parsing, with the flag named)."""
    return _number(text, float, math.isfinite, "a finite number")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (learning rates, temperatures, Beta parameters)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0 (weight decays, momenta)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "0 or a positive number")


def is_plain_name(name: object) -> bool:
    """One plain path component: a non-empty string without separators, not '.' or '..'."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def plain_name(text: str) -> str:
    """argparse type: a name that becomes part of an output path (--name)."""
    if not is_plain_name(text):
        raise argparse.ArgumentTypeError(f"must be a plain file name (no '/', not '..'), got {text!r}")
    return text


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --deterministic and --dist-timeout, the same in every stage."""
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: this process's CUDA device, else the CPU with a warning)")
    parser.add_argument("--deterministic", action="store_true",
                        help="the same bits on every run on a GPU: deterministic cuDNN/cuBLAS kernels and no TF32 "
                             "(slower); CPU runs are deterministic without it")
    parser.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT_MINUTES, metavar="MINUTES",
                        help="under torchrun, how long a process may wait for the others before the run is aborted")


def check_crop_scales(args: argparse.Namespace) -> None:
    """The RandomResizedCrop scale range of FKD's views, the same rule in matching and training."""
    if not 0 < args.min_scale_crops <= args.max_scale_crops <= 1:
        raise UsageError("crop scales need 0 < --min-scale-crops <= --max-scale-crops <= 1")


def first_line(err: BaseException) -> str:
    """An exception's first line (its type when it has no message), for a one-line error naming the cause."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def printable(text: str) -> str:
    """A name as a line of output shows it: as it is, or with its newlines and other control characters escaped
    (a class folder may be named so)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(message: str) -> str:
    """A UsageError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its own line.
    A name with a newline in it stays on the line."""
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split("UsageError: ", 1)[-1]
    return printable(message)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every lock and temporary file is released on the way out."""


def _terminate(signum: int, frame) -> NoReturn:
    raise Terminated()


INTERRUPTED = "interrupted; rerun the same command to resume"


def cli(main: Callable) -> Callable:
    """Wrap a script's main (or its argument parsing) so that a UsageError, or a write refused by the file system
    (read-only, full, not a folder), prints one line and exits with status 2; Ctrl-C and SIGTERM print one line
    and exit with 130 and 143, the run's locks and temporary files released."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if isinstance(sys.stdout, io.TextIOWrapper):  # print paths not named in UTF-8 escaped, as stderr does
            sys.stdout.reconfigure(errors="backslashreplace")
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return main(*args, **kwargs)
        except (KeyboardInterrupt, Terminated) as err:
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(128 + (signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM))
        except UsageError as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in WRITE_ERRORS:
                raise
            print(f"error: cannot write {err.filename or 'the output'}: {err.strerror}; free some space or choose "
                  "a writable output folder (what was complete before is kept)", file=sys.stderr)
            sys.exit(2)
        finally:
            signal.signal(signal.SIGTERM, previous)
            dist = sys.modules.get("torch.distributed")  # only a run that imported torch can hold a process group
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


def add_generator_args(parser: argparse.ArgumentParser, guidance_scale: float) -> None:
    """The flags every image generator of distillation/ shares: the diffusion model, the classes and their prompts,
    the set's size and place, the seed, the sampler's steps and guidance, the saved images."""
    parser.add_argument("--diffusion_checkpoints_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="local diffusers folder or hub id")
    parser.add_argument("--dataset", default="imagenet", choices=DATASETS)
    parser.add_argument("--label_file_path", "--label-file-path", default=None, help="one prompt per class, in class order")
    parser.add_argument("--ipc", type=positive_int, default=10, help="images per class")
    parser.add_argument("--seed", type=seed_int, default=0, help="image j of class c draws from generators seeded by "
                                                                 "(seed, class, j)")
    parser.add_argument("--save_init_image_path", default="outputs/syn", help="the set is a folder in this one")
    parser.add_argument("--name", type=plain_name, default=None,
                        help="names the set's folder (default: the dataset, or the image folder's name)")
    parser.add_argument("--num_inference_steps", type=positive_int, default=50, help="the sampler's schedule")
    parser.add_argument("--guidance_scale", "-g", type=non_negative_float, default=guidance_scale,
                        help="classifier-free guidance against the empty prompt; at most 1 turns it off")
    parser.add_argument("--size", type=image_side, default=512, help="the generator's image side (SD-1.5: 512)")
    parser.add_argument("--image_size", type=image_side, default=224, help="saved images are image_size x image_size")
    parser.add_argument("--resize_filter", default="lanczos", choices=RESIZE_FILTERS, help="PIL filter of that resize")
    parser.add_argument("--batch_size", type=positive_int, default=10, help="images per sampler call")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DIFFUSION_DTYPES),
                        help="weights and activations; auto: float16 on CUDA, float32 elsewhere")
    add_device_args(parser)

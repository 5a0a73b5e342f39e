"""Devices and dtypes from the names users type (`--device auto`, `--dtype bfloat16`, `--mixed-precision fp16`):
one resolution for every command, each refusal naming the option and the fix."""

from __future__ import annotations

from typing import Any

from lpo.core.errors import InputError

DTYPE_NAMES = ("float32", "float16", "bfloat16")
PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # accelerate's mixed-precision names


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str = "auto", option: str = "--device") -> str:
    """auto: cuda when a GPU is visible, else cpu; cuda asked for without a GPU is an InputError."""
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name.startswith("cuda") and not cuda_available():
        raise InputError(f"{option} {name} was asked for but CUDA is not available; use {option} cpu.")
    return name


def resolve_dtype(name: str, device: str | None = None, option: str = "--dtype", auto: Any = "default") -> Any:
    """The torch dtype `name` names. "auto" gives `auto` when the option has its own (None: the option takes no
    "auto"), else bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name == "auto" and auto is not None:
        if auto != "default":
            return auto
        return torch.bfloat16 if (device or "cpu").startswith("cuda") else torch.float32
    if name not in DTYPE_NAMES:
        choices = (["auto"] if auto is not None else []) + list(DTYPE_NAMES)
        raise InputError(f"{option} {name} is not one of {', '.join(choices)}.")
    return getattr(torch, name)


PRECISIONS = ("auto", "no", "fp16", "bf16")


def check_mixed_precision(name: str) -> None:
    """--mixed-precision is one accelerate runs on both GPUs and CPUs here (fp8 needs extra libraries and GPUs)."""
    if name not in PRECISIONS:
        raise InputError(f"--mixed-precision {name} is not one of {', '.join(PRECISIONS)}; pick one of them.")


def mixed_precision(name: str, cuda: bool, auto: str) -> str:
    """accelerate's mixed precision: `name`, or `auto`'s choice on CUDA and none ("no") on the CPU."""
    return name if name != "auto" else (auto if cuda else "no")


def precision_dtype(precision: str) -> Any:
    """The dtype frozen weights take under a mixed precision ("no" -> float32)."""
    import torch

    return getattr(torch, PRECISION_DTYPES.get(precision, "float32"))

"""Benchmarks: each module is a script (`python -m bench.<name> --help`) that prints and records its table."""
from __future__ import annotations

import argparse


def device_arg(value: str) -> str:
    """argparse type for `--device`: cpu, cuda or cuda:N, and a CUDA device only where one is visible."""
    import torch  # here, so that the torch-free scripts of this package (gpu_monitor, stl10_synth) start at once

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is visible here; use cpu")
    return value

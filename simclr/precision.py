"""The training step's number format and memory layout: `fp16_precision` (true, false or auto) and `amp_dtype`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flags of x86 CPUs that compute bfloat16 matrix products in hardware: Intel AMX (Sapphire Rapids on)
# and AVX512-BF16 (Cooper Lake, AMD Zen 4 on). Without them oneDNN emulates bfloat16, slower than float32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Precision:
    """What the step runs in: `amp_dtype` (None: float32 throughout), NHWC `channels_last`, and `reason` in words."""
    amp_dtype: torch.dtype | None
    channels_last: bool
    reason: str

    def summary(self) -> str:
        """E.g. `bfloat16 autocast, channels-last` or `float32, NCHW`."""
        dtype = "float32" if self.amp_dtype is None else f"{str(self.amp_dtype).removeprefix('torch.')} autocast"
        return f"{dtype}, {'channels-last' if self.channels_last else 'NCHW'}"

    def describe(self) -> str:
        """The run's start line: e.g. `precision: bfloat16 autocast, channels-last (fp16_precision: auto; ...)`."""
        return f"precision: {self.summary()} ({self.reason})"


def native_bf16_flags(cpuinfo: str) -> list[str]:
    """The `NATIVE_BF16_FLAGS` named on the `flags` lines of a /proc/cpuinfo text (empty: none, or not x86)."""
    found = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            found.update(flag for flag in value.split() if flag in NATIVE_BF16_FLAGS)
    return [flag for flag in NATIVE_BF16_FLAGS if flag in found]


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """/proc/cpuinfo's text, or "" where there is none (macOS, Windows: `auto` then keeps float32)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def choose_precision(setting: bool | str, amp_dtype: str, device_type: str, cpuinfo: str = "",
                     cuda_bf16: bool = False) -> Precision:
    """The step's precision and layout for `fp16_precision` = `setting` on a `device_type` ("cpu" or "cuda").

    Args:
        setting: True (autocast in `amp_dtype`), False (float32) or "auto" (bfloat16 autocast and channels-last
            where the hardware computes bfloat16 natively, float32 elsewhere; `amp_dtype` is not read).
        amp_dtype: "float16" or "bfloat16"; float16 autocast needs CUDA, so the CPU uses bfloat16 instead.
        cpuinfo: /proc/cpuinfo's text, read for `auto` on the CPU (`native_bf16_flags`).
        cuda_bf16: `torch.cuda.is_bf16_supported()`, read for `auto` on CUDA.
    Every choice is channels-last (NHWC): faster than NCHW on CUDA, and on the CPU in float32 (1.20x at 96 px,
    1.04x at 32 px) and bfloat16 alike (docs/TRAINING_SPEED.md, `python -m bench.original_step`).
    """
    cuda = device_type == "cuda"
    if setting == "auto":
        if cuda:
            if cuda_bf16:
                return Precision(torch.bfloat16, True, "fp16_precision: auto; this GPU computes bfloat16")
            return Precision(None, True, "fp16_precision: auto; this GPU has no bfloat16, so float32")
        flags = native_bf16_flags(cpuinfo)
        if flags:
            return Precision(torch.bfloat16, True, f"fp16_precision: auto; this CPU computes bfloat16 natively "
                                                   f"({', '.join(flags)})")
        return Precision(None, True, "fp16_precision: auto; this CPU reports neither amx_bf16 nor avx512_bf16, so "
                                      "float32 (bfloat16 would be emulated, slower)")
    if not setting:
        return Precision(None, True, "fp16_precision: false")
    if amp_dtype == "float16" and not cuda:
        return Precision(torch.bfloat16, True, "fp16_precision: true; float16 autocast needs CUDA, so bfloat16")
    dtype = torch.float16 if amp_dtype == "float16" else torch.bfloat16
    return Precision(dtype, True, f"fp16_precision: true, amp_dtype: {amp_dtype}")

"""Benchmarks: each module is a script (`python -m bench.<name> --help`) that prints its table, and records it in
docs/BENCHMARKS.md only when asked (`--record`), so that a run never edits a tracked file by surprise."""
from __future__ import annotations

import argparse
import platform
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "BENCHMARKS.md"


def add_record_args(parser: argparse.ArgumentParser, how: str) -> None:
    """`--record` and `--output FILE`: the table is written (`how`: e.g. "appended to its section") only with one."""
    parser.add_argument("--record", action="store_true",
                        help=f"also record the table: {how} of docs/BENCHMARKS.md (default: print it only)")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="record into this markdown file instead of docs/BENCHMARKS.md (implies --record)")


def print_and_record(args: argparse.Namespace, block: str, start: str, end: str, head: str = "",
                     replace: bool = False) -> None:
    """Print `block`; write it to its section where `add_record_args`' flags ask, else say how."""
    print(block)
    target = args.output or (BENCHMARKS if args.record else None)
    if target is None:
        print("(printed only: --record writes it to docs/BENCHMARKS.md)")
    else:
        write_section(target, start, end, block, head, replace)
        print(f"{'wrote' if replace else 'appended to'} {target}")


def write_section(path: Path, start: str, end: str, block: str, head: str = "", replace: bool = False) -> None:
    """Append `block` to the section of `path` marked by `start`/`end` (with `replace`: instead of it), keeping the
    rest; an absent section is added at the end with `head` above the block, an absent file created."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, rest = old.partition(start)
    section, found, after = rest.partition(end)
    if not found:  # a new section at the end of the file
        before, section, after = old.rstrip("\n") + "\n\n", "\n" + (head + "\n\n" if head else ""), "\n"
    kept = section.rstrip("\n") + "\n\n" if section.strip() and not (replace and found) else "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(before + start + kept + block + "\n" + end + after)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran benchmark `module` with `argv` (None: this process's), quoted to paste into a shell."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def timed(batches, warmup: int, steps: int, device, work) -> float:
    """Seconds for `steps` calls of `work(x1, x2)` on successive batches, after `warmup` untimed ones."""
    import torch  # here: the torch-free scripts of this package start at once

    iterator = iter(batches)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda device: None
    for _ in range(warmup):
        work(*next(iterator))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        work(*next(iterator))
    sync(device)
    return time.perf_counter() - start


def describe_machine(device: str = "cpu") -> str:
    """Where a benchmark ran: a CUDA `device`'s GPU, the CPU model and usable cores (as run.py counts), versions."""
    import torch
    import torchvision

    import startup
    from simclr.precision import read_cpuinfo

    models = [line.partition(":")[2].strip() for line in read_cpuinfo().splitlines() if line.startswith("model name")]
    host = f"{models[0] if models else platform.processor() or platform.machine()}, {startup.available_cpus()} cores"
    if device.startswith("cuda"):
        host = f"{torch.cuda.get_device_name(torch.device(device))}; host {host}"
    return (f"{host}; Python {platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}; {torch.get_num_threads()} torch thread{'s' * (torch.get_num_threads() != 1)}")


def device_arg(value: str) -> str:
    """argparse type for `--device`: cpu, cuda or cuda:N, and a CUDA device only where one is visible."""
    import torch  # here: the torch-free scripts of this package start at once

    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device here: use cpu, cuda or cuda:N")
    if value != "cpu" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is visible here; use cpu")
    return value

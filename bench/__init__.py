"""Benchmarks: each module is a script (`python -m bench.<name> --help`) that prints its table, and records it in
docs/BENCHMARKS.md only when asked (`--record`), so that a run never edits a tracked file by surprise."""
from __future__ import annotations

import argparse
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def add_record_args(parser: argparse.ArgumentParser, how: str) -> None:
    """`--record` and `--output FILE`: the table is printed, and written (`how`: e.g. "appended to its section")
    only with one of them."""
    parser.add_argument("--record", action="store_true",
                        help=f"also record the table: {how} of docs/BENCHMARKS.md (default: print it only)")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="record into this markdown file instead of docs/BENCHMARKS.md (implies --record)")


def record_path(args: argparse.Namespace) -> Path | None:
    """Where `add_record_args`' flags say to record, or None to print only (and say so: the flag that records)."""
    path = args.output or (BENCHMARKS if args.record else None)
    if path is None:
        print("(printed only: --record writes it to docs/BENCHMARKS.md)")
    return path


def print_and_record(args: argparse.Namespace, block: str, start: str, end: str, head: str) -> None:
    """Print a run's `block`; append it to its marked section (`append_section`) where `add_record_args`' flags ask."""
    print(block)
    target = record_path(args)
    if target:
        append_section(target, start, end, head, block)
        print(f"appended to {target}")


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


def append_section(path: Path, start: str, end: str, head: str, block: str) -> None:
    """Append `block` to the section of `path` marked by `start`/`end` (created with `head` if absent, the file too);
    the rest of the file is kept."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        section, after = rest.split(end, 1)
        new = before + start + section.rstrip("\n") + "\n\n" + block + "\n" + end + after
    else:
        new = old.rstrip("\n") + "\n\n" + start + "\n" + head + "\n\n" + block + "\n" + end + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)

"""Time and peak memory of NT-Xent forward + backward as the batch grows (N = 256 ... 8192 pairs, D = 128).

Each batch size runs in a fresh process, so that the CPU's peak resident memory (`ru_maxrss`) belongs to that size
alone; the table reports the peak above the memory held before the loss ran (on CUDA, `max_memory_allocated`). The
original repository's loss (sthalles/SimCLR's `loss/nt_xent.py`, imported from ../shared/seed/code: see
bench.original_step) broadcasts a `[2N, 2N, D]` tensor, so it runs beside ours for the small sizes only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench import REPO, add_record_args, command_line, describe_machine, device_arg, print_and_record, timed
from bench.original_step import SEED_CODE, load_original, seed_code_problem

GIB = 2**30


def measure_one(n: int, dim: int, device: str, which: str, repeats: int, code: str) -> dict:
    """Forward + backward of ours ("ntxent") or the original's loss ("seed", from `code`), both at temperature 0.5,
    on random `[n, dim]` projections: median seconds of `repeats` after one warm-up, and peak extra GiB."""
    from loss.nt_xent import NTXentLoss

    torch.manual_seed(0)
    device = torch.device(device)
    criterion = (NTXentLoss(temperature=0.5) if which == "ntxent"
                 else load_original(Path(code), "loss/nt_xent").NTXentLoss(device, n, 0.5, True)).to(device)
    z1, z2 = (torch.randn(n, dim, device=device, requires_grad=True) for _ in range(2))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_mem = (torch.cuda.memory_allocated(device) if cuda  # else the resident pages, as /proc counts them
                 else int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize())

    def step(a, b):
        a.grad = b.grad = None
        criterion(a, b).backward()

    times = [timed([(z1, z2)], 0, 1, device, step) for _ in range(repeats + 1)]
    peak = (torch.cuda.max_memory_allocated(device) if cuda  # ru_maxrss is in KiB
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - start_mem
    return {"n": n, "which": which, "seconds": statistics.median(times[1:]), "peak_gib": max(peak, 0) / GIB,
            "repeats": repeats}


def _run_in_subprocess(job: dict) -> dict:
    """`measure_one(**job)` in a fresh process (its peak memory is this size's alone), or the job and its error."""
    done = subprocess.run([sys.executable, "-m", "bench.loss_scaling", "--worker", json.dumps(job)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {**job, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cells(r: dict | None) -> str:
    """A measurement's time and memory cells of the table."""
    if r is None or "error" in r:
        return "(not run) | " if r is None else f"failed: {r['error']} | "
    return f"{r['seconds']:.3f} s | {r['peak_gib']:.2f} GiB"


def format_table(rows: list[dict], device: torch.device, dim: int, load: float | None = None,
                 command: str = "python -m bench.loss_scaling") -> str:
    """The markdown section: one line per N, the original repository's loss beside ours where it was measured."""
    seed = {r["n"]: r for r in rows if r["which"] == "seed"}
    memory = "peak extra RSS" if device.type == "cpu" else "peak extra allocated"
    lines = [f"## NT-Xent loss: time and memory vs batch size, {device.type} (bench/loss_scaling.py)", "",
             f"`{command}`: {describe_machine(str(device))}; D = {dim}, float32, median of the timed runs after one "
             f"warm-up; {memory} over the inputs."
             + (f" CPU load average {load:.1f} when it started (on a shared machine, times are upper bounds)."
                if load is not None else ""), "",
             "| N pairs (2N views) | `[2N, 2N]` logits | loss/nt_xent.py: time | memory | "
             "original repository's loss: time | memory |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} ({2 * r['n']}) | {(2 * r['n']) ** 2 * 4 / GIB:.3f} GiB | {_cells(r)} | "
              f"{_cells(seed.get(r['n']))} |" for r in rows if r["which"] == "ntxent"]
    lines += ["", "The original repository's loss materialises `[2N, 2N, D]` (at N = 8192: 2N x 2N x 128 x 4 bytes = "
              "128 GiB for the similarity alone, more with its backward); it is run only for the smallest sizes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed-up-to", type=int, default=512,
                        help="run the original repository's [2N,2N,D] loss up to this N")
    parser.add_argument("--seed-code", type=Path, default=SEED_CODE,
                        help="the original repository's code (default: ../shared/seed/code)")
    parser.add_argument("--repeats", type=int, default=3)
    add_record_args(parser, "the table replacing this device's section (the file is created if absent)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    seed_sizes = [n for n in args.sizes if n <= args.seed_up_to]
    if seed_sizes and seed_code_problem(args.seed_code):
        print(f"the original repository's loss is not measured: {seed_code_problem(args.seed_code)}", file=sys.stderr)
        seed_sizes = []
    rows, load = [], os.getloadavg()[0] if device.type == "cpu" else None
    for n, which in [(n, "ntxent") for n in args.sizes] + [(n, "seed") for n in seed_sizes]:
        repeats = args.repeats if n <= 2048 or device.type == "cuda" else 1
        rows.append(_run_in_subprocess(dict(n=n, dim=args.dim, device=args.device, which=which, repeats=repeats,
                                            code=str(args.seed_code))))
        print(json.dumps(rows[-1]), flush=True)
    marks = (f"<!-- bench/loss_scaling.py {device.type}: {end} -->" for end in ("start", "end"))
    print_and_record(args, format_table(rows, device, args.dim, load, command_line("bench.loss_scaling", argv)),
                     *marks, replace=True)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # one size, in the fresh process of `_run_in_subprocess`
    print(json.dumps(measure_one(**json.loads(sys.argv[2]))))
elif __name__ == "__main__":
    sys.exit(main())

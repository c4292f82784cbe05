"""The kNN monitor's cost: seconds per call (its share of a finished run: `python -m bench.run_summary RUN_DIR`).

    python -m bench.knn_monitor                          # 5,000 images at 96 px, ResNet-18, on the CPU
    python -m bench.knn_monitor --device cuda --images 5000 --size 96

Times `simclr.monitor.KnnMonitor.measure`, the trainer's own call, on synthetic images of 10 classes (its cost does
not depend on content), and each call's two parts: feature extraction and the weighted kNN. `--record` appends the
table, with the command, the machine and its load, to its section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

START, END = "<!-- bench/knn_monitor.py: start -->", "<!-- bench/knn_monitor.py: end -->"
SECTION_HEAD = "## kNN monitor (bench/knn_monitor.py)"


def time_calls(images: int, size: int, base_model: str, device: str, repeats: int, seed: int = 0) -> dict:
    """Seconds to prepare a monitor of `images` synthetic images at `size` px, and per `measure` call (each of
    `repeats`), with the share spent extracting features."""
    import torch

    from bench import timed
    from data_aug.datasets import TensorImages
    from knn.neighbours import weighted_knn_top1
    from models.resnet_simclr import create_model
    from simclr.monitor import KnnMonitor

    g = torch.Generator().manual_seed(seed)
    data = TensorImages(torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (images,), generator=g), [str(i) for i in range(10)])
    tic = time.perf_counter()
    monitor = KnnMonitor.from_dataset(data, size, max_images=images, seed=seed, device=device)
    prepare = time.perf_counter() - tic
    torch.manual_seed(seed)
    encoder = create_model(base_model, 128).encoder.to(device)
    calls, made = [timed([()], 0, 1, device, lambda: monitor.measure(encoder)) for _ in range(repeats)], []
    extract = [timed([()], 0, 1, device, lambda: made.append(monitor.features(encoder))) for _ in range(repeats)]
    x, y, n = made[-1], monitor.labels, monitor.fit_count  # features (N, D), labels (N,), the first n fitted
    search = timed([()], 0, 1, device, lambda: weighted_knn_top1(x[:n], y[:n], x[n:], y[n:], 10))
    return {"prepare_s": prepare, "call_s": statistics.median(calls), "features_s": statistics.median(extract),
            "knn_s": search, "calls": calls}


def load() -> str:
    """`uptime`'s load averages (1, 5, 15 minutes): other processes share the CPU this measures."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import add_record_args, command_line, describe_machine, device_arg, print_and_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="labelled images the monitor uses (default 5000)")
    parser.add_argument("--size", type=int, default=96, help="input size in px (default 96, STL10's)")
    parser.add_argument("--base-model", default="resnet18")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="calls timed (the median is shown)")
    add_record_args(parser, "the run appended to this benchmark's section")
    args = parser.parse_args(argv)
    if args.images < 10 or args.size < 8 or args.repeats < 1:
        parser.exit(2, f"{parser.prog}: error: --images must be >= 10, --size >= 8, --repeats >= 1\n")  # one line
    before = load()
    t = time_calls(args.images, args.size, args.base_model, args.device, args.repeats)
    block = (f"`{command_line('bench.knn_monitor', argv)}` ({datetime.date.today()}; {describe_machine(args.device)}; "
             f"load average {before} before, {load()} after):\n\n"
             f"| images | size | model | device | threads | prepare s | s per call (median of {args.repeats}) | "
             f"of which features s | of which kNN s |\n|---|---|---|---|---|---|---|---|---|\n"
             f"| {args.images:,} | {args.size} | {args.base_model} | {args.device} | {torch.get_num_threads()} | "
             f"{t['prepare_s']:.2f} | {t['call_s']:.2f} | {t['features_s']:.2f} | {t['knn_s']:.3f} |")
    print_and_record(args, block, START, END, SECTION_HEAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())

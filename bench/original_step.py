"""The original repository's training step next to the trainer's, on the same views, machine and invocation.

The original's model and loss (sthalles/SimCLR e8a690a in ../shared/seed/code, see ../shared/seed/CODE.md) are
loaded from their files (`load_original`: its packages have no `__init__.py`, so ours would shadow them on sys.path)
and stepped as its `SimCLR.train` does, next to `Trainer.train_step` in each of `TRAINER_SETTINGS`. The repeats
interleave the rows, so that other load falls on each alike. torch is imported once `main` has set run.py's CPU
policy. Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import startup  # standard library only, as is bench/__init__.py
from bench import REPO, add_record_args, command_line, describe_machine, print_and_record, timed

SEED_CODE = REPO.parent / "shared" / "seed" / "code"
START, END = "<!-- bench/original_step.py: start -->", "<!-- bench/original_step.py: end -->"
SECTION_HEAD = "## The original repository's step next to the trainer's (bench/original_step.py)"
# (--amp, --layout) of bench.throughput's create_trainer, and what that is in the config
TRAINER_SETTINGS = (("none", "nchw", "fp16_precision: false, NCHW forced: the CPU default before channels-last"),
                    ("none", "trainer", "fp16_precision: false, the default"),
                    ("auto", "trainer", "fp16_precision: auto"))
ORIGINAL = "original (sthalles/SimCLR e8a690a)"


def seed_code_problem(code: Path) -> str | None:
    """Why `code` is not the original's code (its model or loss file missing), or None."""
    missing = [name for name in ("models/resnet_simclr.py", "loss/nt_xent.py") if not (code / name).is_file()]
    return (f"--seed-code {code}: {', '.join(missing)} not found there; it must hold sthalles/SimCLR at commit "
            "e8a690a (../shared/seed/code next to this repository, see ../shared/seed/CODE.md), e.g. git clone "
            "https://github.com/sthalles/SimCLR DIR && git -C DIR checkout e8a690a, then --seed-code DIR"
            if missing else None)


def load_original(code: Path, name: str):
    """The original's module `name` ("models/resnet_simclr" or "loss/nt_xent"), loaded from its file in `code`
    (never copied here) under another name, so that neither shadows our package of that name."""
    spec = importlib.util.spec_from_file_location(f"original_{Path(name).name}", code / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original_training_step(code: Path, batch_size: int):
    """`work` for `timed`: the original's step, its `SimCLR.train` loop body and `SimCLR._step` as written there."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    with warnings.catch_warnings():  # its torchvision call passes the deprecated `pretrained=False`: not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        model = load_original(code, "models/resnet_simclr").ResNetSimCLR("resnet18", 256).train()
    optimizer = torch.optim.Adam(model.parameters(), 3e-4, weight_decay=1e-5)
    criterion = load_original(code, "loss/nt_xent").NTXentLoss("cpu", batch_size, 0.5, True)

    def step(xis, xjs):
        optimizer.zero_grad()
        _, zis = model(xis)
        _, zjs = model(xjs)
        criterion(F.normalize(zis, dim=1), F.normalize(zjs, dim=1)).backward()
        optimizer.step()
    return step


def measure(args) -> dict:
    """{"rows": {crop: {row: [images/s per repeat]}}, "loads": [1-minute load at each repeat's start]}: per crop,
    the original's step then each trainer's, `args.repeats` times in turn on the same views (made on the CPU)."""
    from bench.throughput import create_trainer, synthetic_images, trainer_step
    from data_aug.batches import DeviceBatches
    from data_aug.views import ViewSettings
    from simclr.trainer import flushed_denormals

    results = {"loads": [], "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for crop in args.crops:
            images = synthetic_images(args.batch_size * (args.warmup + args.steps), crop)
            views = list(DeviceBatches(images, args.batch_size, ViewSettings(crop), seed=0, device="cpu").batches(0))
            steps = {ORIGINAL: original_training_step(args.seed_code, args.batch_size)}
            for amp, layout, setting in TRAINER_SETTINGS:
                trainer = create_trainer(Path(tmp, "run"), "resnet18", crop, args.batch_size, "cpu", amp, layout)
                steps[f"Trainer.train_step, {trainer.precision.summary()} ({setting})"] = trainer_step(trainer)
            rows = results["rows"][crop] = {name: [] for name in steps}
            for repeat in range(args.repeats):
                results["loads"].append(os.getloadavg()[0])
                for name, step in steps.items():
                    print(f"{crop} px, repeat {repeat + 1}/{args.repeats}: {name} ...", flush=True)
                    # the trainer's steps flush denormals as Trainer.fit does; the original's do not
                    with contextlib.nullcontext() if name == ORIGINAL else flushed_denormals():
                        seconds = timed(itertools.cycle(views), args.warmup, args.steps, "cpu", step)
                    rows[name].append(args.batch_size * args.steps / seconds)
    return results


def format_run(args, results: dict, command: str) -> str:
    """The run as a markdown block: machine, load, and per crop the rows with their ratio to the original."""
    lines = [f"### {time.strftime('%Y-%m-%d')}, cpu", "",
             f"`{command}`; {describe_machine('cpu')}; ResNet-18, batch {args.batch_size}; {args.steps} timed steps "
             f"after {args.warmup} warm-up, {args.repeats} repeat(s) interleaved; 1-minute load average "
             f"{min(results['loads']):.2f}-{max(results['loads']):.2f} at the repeats' starts; {args.cpu_policy}.", "",
             "| crop | step | images/s (median) | range | vs original (median ratio) |",
             "|---|---|---:|---:|---:|"]
    for crop, rows in results["rows"].items():
        for name, rates in rows.items():
            ratio = statistics.median(r / o for r, o in zip(rates, rows[ORIGINAL]))
            lines.append(f"| {crop} px | {name} | {statistics.median(rates):,.1f} | {min(rates):,.1f}-"
                         f"{max(rates):,.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[96, 32], help="view sides")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all four rows, interleaved")
    parser.add_argument("--seed-code", type=Path, default=SEED_CODE,
                        help="the original repository's code (default: ../shared/seed/code)")
    add_record_args(parser, "the table appended to its section")
    args = parser.parse_args(argv)
    bad_numbers = args.batch_size < 2 or args.steps < 1 or args.warmup < 0 or args.repeats < 1 or min(args.crops) < 8
    problem = ("--batch-size must be >= 2, --steps and --repeats >= 1, --warmup >= 0, --crops >= 8" if bad_numbers
               else seed_code_problem(args.seed_code))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    cpu = startup.prepare_cpu("cpu", owner="bench.original_step")  # run.py's CPU policy, before torch is imported
    startup.exit_if_torch_is_broken()
    args.cpu_policy = f"OMP_WAIT_POLICY={cpu['omp_wait_policy']} (set by {cpu['set_by']})"
    block = format_run(args, measure(args), command_line("bench.original_step", argv))
    print_and_record(args, block, START, END, SECTION_HEAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The original repository's training step next to the trainer's, on the same views, machine and invocation.

The original (sthalles/SimCLR e8a690a in ../shared/seed/code, see ../shared/seed/CODE.md) times its own step on
views saved by this process, in a child process that runs this file as a script without this project on sys.path
(its packages have no `__init__.py`: ours would shadow them), so only the standard library is imported at the top.
The repeats interleave the rows, so that other load falls on each alike. Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    needed = ("models/resnet_simclr.py", "loss/nt_xent.py")
    missing = [name for name in needed if not (code / name).is_file()]
    return (f"--seed-code {code}: {', '.join(missing)} not found there; it must hold sthalles/SimCLR at commit "
            "e8a690a (../shared/seed/code next to this repository, see ../shared/seed/CODE.md), e.g. git clone "
            "https://github.com/sthalles/SimCLR DIR && git -C DIR checkout e8a690a, then --seed-code DIR"
            if missing else None)


def original_worker(code: str, views_file: str, batch_size: int, warmup: int, steps: int) -> float:
    """In the child (none of this project here): images/s of the original's step on the views in `views_file`."""
    sys.path.insert(0, code)
    import torch
    import torch.nn.functional as F
    from loss.nt_xent import NTXentLoss
    from models.resnet_simclr import ResNetSimCLR

    views = torch.load(views_file, weights_only=True)
    torch.manual_seed(0)
    model = ResNetSimCLR("resnet18", 256)  # prints "Feature extractor: resnet18": the parent reads the last line
    optimizer = torch.optim.Adam(model.parameters(), 3e-4, weight_decay=1e-5)
    criterion = NTXentLoss("cpu", batch_size, 0.5, True)
    model.train()

    def step(xis, xjs):  # SimCLR.train's loop body and SimCLR._step, as written there
        optimizer.zero_grad()
        _, zis = model(xis)
        _, zjs = model(xjs)
        criterion(F.normalize(zis, dim=1), F.normalize(zjs, dim=1)).backward()
        optimizer.step()

    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        step(*views[i % len(views)])
    return batch_size * steps / (time.perf_counter() - start)


def run_original(code: Path, views_file: Path, batch_size: int, warmup: int, steps: int) -> float:
    """`original_worker` in a child process with none of this project on its path; its images/s."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = dict(code=str(code), views_file=str(views_file), batch_size=batch_size, warmup=warmup, steps=steps)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], cwd=code,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the original's step failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    """{"rows": {crop: {row: [images/s per repeat]}}, "loads": [1-minute load at each repeat's start]}: per crop,
    the original's step then each trainer's, `args.repeats` times in turn on the same views (made on the CPU)."""
    import torch

    from bench import timed
    from bench.throughput import create_trainer, synthetic_images, trainer_step
    from data_aug.batches import DeviceBatches
    from data_aug.views import ViewSettings
    from simclr.trainer import flushed_denormals

    results = {"loads": [], "rows": {}}
    with tempfile.TemporaryDirectory() as tmp, flushed_denormals():  # the trainer's steps run as in Trainer.fit
        for crop in args.crops:
            images = synthetic_images(args.batch_size * (args.warmup + args.steps), crop)
            views = list(DeviceBatches(images, args.batch_size, ViewSettings(crop), seed=0, device="cpu").batches(0))
            torch.save(views, Path(tmp, "views.pt"))
            made = [(create_trainer(Path(tmp, "run"), "resnet18", crop, args.batch_size, "cpu", amp, layout), setting)
                    for amp, layout, setting in TRAINER_SETTINGS]
            trainers = {f"Trainer.train_step, {t.precision.summary()} ({setting})": t for t, setting in made}
            rows = results["rows"][crop] = {ORIGINAL: [], **{name: [] for name in trainers}}
            for repeat in range(args.repeats):
                results["loads"].append(os.getloadavg()[0])
                print(f"{crop} px, repeat {repeat + 1}/{args.repeats}: the original's step ...", flush=True)
                rows[ORIGINAL].append(run_original(args.seed_code, Path(tmp, "views.pt"), args.batch_size,
                                                   args.warmup, args.steps))
                for name, trainer in trainers.items():
                    print(f"  {name} ...", flush=True)
                    seconds = timed(itertools.cycle(views), args.warmup, args.steps, "cpu", trainer_step(trainer))
                    rows[name].append(args.batch_size * args.steps / seconds)
    return results


def format_run(args, results: dict, command: str) -> str:
    """The run as a markdown block: machine, load, and per crop the rows with their ratio to the original."""
    from bench import describe_machine

    loads = results["loads"]
    lines = [f"### {time.strftime('%Y-%m-%d')}, cpu", "",
             f"`{command}`; {describe_machine('cpu')}; ResNet-18, batch {args.batch_size}; {args.steps} timed steps "
             f"after {args.warmup} warm-up, {args.repeats} repeat(s) interleaved; 1-minute load average "
             f"{min(loads):.2f}-{max(loads):.2f} at the repeats' starts; {args.cpu_policy}.", "",
             "| crop | step | images/s (median) | range | vs original (median ratio) |",
             "|---|---|---:|---:|---:|"]
    for crop, rows in results["rows"].items():
        for name, rates in rows.items():
            ratio = statistics.median(r / o for r, o in zip(rates, rows[ORIGINAL]))
            lines.append(f"| {crop} px | {name} | {statistics.median(rates):,.1f} | {min(rates):,.1f}-"
                         f"{max(rates):,.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import startup
    from bench import add_record_args, command_line, print_and_record

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
    args.seed_code = args.seed_code.resolve()
    cpu = startup.prepare_cpu("cpu", owner="bench.original_step")  # run.py's CPU policy, inherited by the child
    startup.exit_if_torch_is_broken()
    args.cpu_policy = f"OMP_WAIT_POLICY={cpu['omp_wait_policy']} (set by {cpu['set_by']})"
    block = format_run(args, measure(args), command_line("bench.original_step", argv))
    print_and_record(args, block, START, END, SECTION_HEAD)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # the child: the original's code, not this project
    print(original_worker(**json.loads(sys.argv[2])))
elif __name__ == "__main__":
    sys.exit(main())

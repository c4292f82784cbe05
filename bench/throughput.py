"""Training throughput: `Trainer.train_step` on pre-made views, fed by the CPU (PIL) pipeline and by the device one.

The commands, and what each row means: docs/TRAINING_SPEED.md ("Measuring it"). The images are random uint8 of the
crop size: what the pipelines cost does not depend on content.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
from pathlib import Path

import startup  # standard library only

if __name__ == "__main__":  # as a command: run.py's CPU policy goes into the environment before torch loads OpenMP
    startup.prepare_cpu(startup.device_from_argv(sys.argv[1:]), owner="bench.throughput")
    startup.exit_if_torch_is_broken()  # a mismatched torch/torchvision pair: one line, not a traceback

import torch

from bench import add_record_args, command_line, describe_machine, device_arg, print_and_record, timed
from data_aug.datasets import TensorImages
from data_aug.batches import DeviceBatches, LoaderBatches
from data_aug.views import TwoViews, ViewSettings, create_view_transform
from models.resnet_simclr import FEATURE_DIMS
from simclr.config import load_config
from simclr.dist import init_distributed
from simclr.trainer import Trainer, flushed_denormals

START, END = "<!-- bench/throughput.py: start -->", "<!-- bench/throughput.py: end -->"
STL10_IMAGES = 105_000  # STL10 train + unlabeled
SECTION_HEAD = "## Training throughput (bench/throughput.py)"
AMP_SETTINGS = {"none": ["fp16_precision=false"], "auto": ["fp16_precision=auto"],
                "bf16": ["fp16_precision=true", "amp_dtype=bfloat16"],
                "fp16": ["fp16_precision=true", "amp_dtype=float16"]}
LAYOUTS = ("trainer", "channels-last", "nchw")
ROWS = {"ceiling": "model alone on pre-made views (ceiling)",  # the "_views" rows count views, the others images
        "cpu_step": "full step, CPU pipeline (PIL, {workers} workers)", "device_step": "full step, device pipeline",
        "cpu_views": "CPU pipeline alone (PIL, {workers} workers)", "device_views": "device pipeline alone ({device})"}


def synthetic_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """Seeded random uint8 images `[count, 3, side, side]` (what the views cost does not depend on their content)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)


def create_trainer(run_dir: Path, model: str, crop: int, batch_size: int, device: str, amp: str = "none",
                   layout: str = "trainer", compile_model: bool = False, trainer_class=Trainer) -> Trainer:
    """The `trainer_class` that `python run.py` would build for these settings (`amp`: a key of `AMP_SETTINGS`;
    `layout` other than "trainer" forces one), on scikit-learn's digits that it never steps on; writes nothing."""
    overrides = [f"batch_size={batch_size}", f"model.base_model={model}", f"dataset.input_shape=({crop},{crop},3)",
                 "dataset.name=digits", "dataset.valid_size=0", "knn_monitor.enabled=false", f"device={device}",
                 f"compile={str(compile_model).lower()}", f"run_dir={run_dir}", "epochs=1000", *AMP_SETTINGS[amp]]
    trainer = trainer_class(load_config(None, overrides), init_distributed(device))
    if layout != "trainer":  # before the first step: the optimiser has no state yet to match the new strides
        channels_last = layout == "channels-last"
        trainer.precision = dataclasses.replace(trainer.precision, channels_last=channels_last,
                                                reason=trainer.precision.reason + f"; --layout {layout}")
        trainer.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainer.model.train()
    return trainer


def trainer_step(trainer: Trainer):
    """`work` for `timed`: the trainer's own step on a pair of views, as `Trainer.train_epoch` calls it."""
    return lambda x1, x2: trainer.train_step(trainer.to_device(x1), trainer.to_device(x2))[0]


def run(args, trainer_class=Trainer) -> dict:
    """Every row of `ROWS` (images/s, or views/s), the load at the start and the trainer's precision."""
    with tempfile.TemporaryDirectory() as run_dir, flushed_denormals():  # the trainer's step, as `fit` runs it
        trainer = create_trainer(Path(run_dir), args.model, args.crop, args.batch_size, args.device, args.amp,
                                 args.layout, args.compile, trainer_class)
        device, step = torch.device(args.device), trainer_step(trainer)
        images = synthetic_images(args.batch_size * (args.warmup + args.steps), args.crop)
        results = {"load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
                   "precision": trainer.precision.describe()}
        views = ViewSettings(args.crop)
        pairs = TwoViews(TensorImages(images, torch.zeros(len(images), dtype=torch.int64), ["x"]),
                         create_view_transform(views), seed=0)
        device_batches = DeviceBatches(images, args.batch_size, views, seed=0, device=device, compile=args.compile)
        loader = LoaderBatches(pairs, args.batch_size, seed=0, num_workers=args.workers,
                               pin_memory=device.type == "cuda")
        fixed = device_batches.make_batch(0, 0)
        rows = {  # a row's batches (made when timed: a loader's workers live only for its row) and its work
            "ceiling": (lambda: iter(lambda: fixed, None), step), "cpu_step": (lambda: loader.batches(0), step),
            "device_step": (lambda: device_batches.batches(1), step),
            "cpu_views": (lambda: loader.batches(1), lambda a, b: (trainer.to_device(a), trainer.to_device(b))),
            "device_views": (lambda: device_batches.batches(2), lambda a, b: None)}
        for key, (batches, work) in rows.items():
            print(f"{ROWS[key].format(workers=args.workers, device=device.type)} ...", flush=True)
            seconds = timed(batches(), args.warmup, args.steps, device, work)
            results[key] = (2 if key.endswith("_views") else 1) * args.batch_size * args.steps / seconds
        return results


def format_run(args, r: dict, command: str) -> str:
    """One run as a markdown block: settings, the table, and the derived targets."""
    device, workers, ceiling = torch.device(args.device), args.workers, r["ceiling"]
    env = "".join(f", {k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)
    label = {key: text.format(workers=workers, device=device.type) for key, text in ROWS.items()}
    return "\n".join([
        f"### {datetime.date.today().isoformat()}, {device.type}", "",
        f"`{command}`; {describe_machine(args.device)}{env}; {args.model}, {args.crop}x{args.crop}, batch "
        f"{args.batch_size}, `--amp {args.amp} --layout {args.layout}`: {r['precision']}; torch.compile "
        f"{'on' if args.compile else 'off'}; {args.steps} timed steps after {args.warmup} warm-up; "
        f"{workers} DataLoader workers; load average {r['load']:.2f} at start.", "",
        "| measurement | images/s | views/s | vs model alone |", "|---|---:|---:|---:|",
        *(f"| {label[k]} | | {r[k]:,.0f} | |" if k.endswith("_views") else
          f"| {label[k]} | {r[k]:,.0f} | {2 * r[k]:,.0f} | {r[k] / ceiling:.2f} |" for k in ROWS), "",
        f"Full step with the device pipeline: {r['device_step'] / ceiling:.2f}x the model-only ceiling, "
        f"{r['device_step'] / r['cpu_step']:.2f}x the CPU pipeline with {workers} workers. At this rate an "
        f"STL10 epoch ({STL10_IMAGES:,} images, two views each) takes {STL10_IMAGES / r['device_step']:,.1f} s "
        f"(CPU pipeline: {STL10_IMAGES / r['cpu_step']:,.1f} s)."
        + (f" Feeding the ceiling with PIL would take about {2 * ceiling * workers / r['cpu_views']:,.0f} workers."
           if device.type == "cuda" and workers else "")])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    visible = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = startup.device_from_argv(sys.argv[1:] if argv is None else argv, visible).startswith("cuda")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default=visible, help="cpu, cuda or cuda:N (default: cuda if "
                        "visible); the defaults below are CUDA's / the CPU's")
    parser.add_argument("--model", default="resnet18", choices=FEATURE_DIMS, help="the encoder (model.base_model)")
    parser.add_argument("--crop", type=int, default=96, help="view side (and synthetic image side)")
    parser.add_argument("--batch-size", type=int, default=512 if cuda else 32, help="images per step (512 / 32)")
    parser.add_argument("--steps", type=int, default=20 if cuda else 3, help="timed steps per row (20 / 3)")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps first (5 / 1)")
    parser.add_argument("--amp", choices=list(AMP_SETTINGS), default="bf16" if cuda else "none", help="fp16_precision: "
                        "true with that amp_dtype (bf16, fp16), auto, or none (float32); bf16 / none")
    parser.add_argument("--compile", action="store_true", help="torch.compile model and pipeline (slow warm-up)")
    parser.add_argument("--layout", choices=LAYOUTS, default="trainer", help="the trainer's layout, or one forced")
    parser.add_argument("--workers", type=int, default=startup.available_cpus(), help="DataLoader workers (1 per core)")
    add_record_args(parser, "the run appended to this benchmark's section")
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        parser.exit(2, f"{parser.prog}: error: --batch-size must be >= 2, --steps >= 1 and --warmup >= 0\n")  # one line
    return args


def main(argv: list[str] | None = None, trainer_class=Trainer) -> int:
    """The benchmark's command; `trainer_class` is `create_trainer`'s (a test passes a subclass that counts steps)."""
    args = parse_args(argv)
    block = format_run(args, run(args, trainer_class), command_line("bench.throughput", argv))
    print_and_record(args, block, START, END, SECTION_HEAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())

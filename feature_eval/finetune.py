"""Semi-supervised fine-tuning: the encoder and a linear head trained end to end on a fraction of the labels.

    python -m feature_eval.finetune --checkpoint runs/<name> --label-fraction 0.01
    python -m feature_eval.finetune --checkpoint resnet-18_40-epochs --label-fraction 0.1 --baselines random

The paper's protocol (Section 6 and Appendix B.5), each step of it in docs/EVALUATION.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import startup  # standard library only

if __name__ == "__main__":  # as a command: the CPU policy goes into the environment before torch loads OpenMP
    startup.prepare_cpu(startup.device_from_argv(sys.argv[1:]), owner="feature_eval.finetune")
    startup.exit_if_torch_is_broken()  # a mismatched torch/torchvision pair: one line, not a traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data_aug.datasets import subset
from data_aug.device_views import resized_crop, sample_crop_boxes
from feature_eval.baselines import random_encoder
from feature_eval.classifiers import holdout_split, topk_accuracy
from feature_eval.context import EvalContext, EvalError, RunOptions, open_context, option, parse_names, run_cli
from feature_eval.features import extract_features
from feature_eval.results import COLUMNS, EXTRACTOR_NAMES, Row, log_row, markdown_table, table_caption, write_results
from simclr.config import DatasetConfig

# per 256 images: the paper's 0.05 (0.8 at batch 4096), a smaller step (fine-tuning a pretrained encoder often
# wants less than training from scratch) and two larger ones; each start's own hold-out chooses
DEFAULT_LRS = (0.02, 0.05, 0.1, 0.2)
BASELINES = ("random",)
# The evaluation table's columns, with both epoch counts: the checkpoint's pretraining and this fine-tuning.
FINETUNE_COLUMNS = (*COLUMNS[:5], "Pretrain epochs", "Fine-tune epochs", *COLUMNS[6:])


@dataclass
class FineTuneResult:
    """What `finetune_evaluate` found: the JSON record, its table, each extractor's model (CPU), the files written."""

    results: dict
    table: str
    models: dict[str, nn.Module]
    paths: dict[str, Path] = field(default_factory=dict)


class FineTuned(nn.Module):
    """Encoder f and a linear classifier on h: float images `[B, 3, S, S]` in [0, 1] -> logits `[B, C]`."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.feature_dim, num_classes)
        # As the paper's released code (normal, std 0.01): small logits at first, so the first steps do not
        # push large gradients from a random head into the pretrained encoder.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def default_epochs(label_fraction: float) -> int:
    """The paper's schedule (Appendix B.5): 60 epochs for 1 % of the labels or fewer, 30 for more."""
    return 60 if label_fraction <= 0.01 else 30


def fraction_tag(label_fraction: float) -> str:
    """`0.01 -> "1pct"`, `0.1 -> "10pct"`, `0.005 -> "0.5pct"` (file names and row names)."""
    return f"{round(label_fraction * 100, 6):g}pct"


def label_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices into `labels` of a seeded, class-balanced subset of the labelled (>= 0) items: each class
    `floor(fraction * N / C)` items (at least 1, or all it has), a seeded choice of classes one more, `round(fraction *
    N)` in all. A class's items come in one seeded order whatever `fraction`: for a seed, 1 % lies inside 10 %."""
    labels = np.asarray(labels, dtype=np.int64)
    labelled = np.flatnonzero(labels >= 0)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    if fraction >= 1:
        return labelled
    classes = np.unique(labels[labelled])
    total = int(round(fraction * len(labelled)))
    takes = np.full(len(classes), max(1, total // len(classes)))
    takes[np.random.default_rng([seed, 1]).permutation(len(classes))[:max(0, total - takes.sum())]] += 1
    chosen = [np.random.default_rng([seed, 2, int(c)]).permutation(np.flatnonzero(labels == c))[:n]
              for c, n in zip(classes, takes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class Diverged(EvalError):
    """The fine-tuning loss became non-finite (the learning rate is too high)."""


@dataclass(frozen=True)
class Schedule:
    """How one fine-tuning run trains (Appendix B.5), whatever its learning rate: one value for every run of a search.
    `batch_size` (at least 2: BatchNorm) is capped at the data set's size; `seed`: head init, order, views."""

    input_size: int
    epochs: int
    batch_size: int
    momentum: float = 0.9
    hflip: float = 0.5
    min_crop_scale: float = 0.08
    seed: int = 0
    device: str | torch.device = "cpu"

    def __post_init__(self):
        if self.batch_size < 2:
            raise EvalError(f"batch size {self.batch_size}: BatchNorm needs two images a step; "
                            "use --batch-size 2 or more")


def _batch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & (2**63 - 1)


def crop_flip_batches(dataset, schedule: Schedule, epoch: int):
    """One epoch of random resized crop + flip views, a function of (seed, epoch): float `[B, 3, S, S]` in [0, 1] and
    int64 labels `[B]` on the schedule's device, a batch cropped at once (torchvision's law) an image size at a time."""
    s, device = schedule, schedule.device
    generator = torch.Generator().manual_seed(_batch_seed(s.seed, epoch))
    order = torch.randperm(len(dataset), generator=generator)
    # a last batch of one image is dropped: BatchNorm in train mode cannot normalise a single image
    for start in range(0, len(order) - 1, s.batch_size):
        rows = order[start:start + s.batch_size]
        flip = torch.rand(len(rows), generator=generator) < s.hflip  # rand is in [0, 1): p 0 never, p 1 always
        images, labels = zip(*(dataset[row] for row in rows.tolist()))
        views = torch.empty(len(rows), 3, s.input_size, s.input_size, device=device)
        for size in dict.fromkeys(image.shape[-2:] for image in images):  # (H, W) in order of first appearance
            same = [i for i, image in enumerate(images) if image.shape[-2:] == size]
            batch = torch.stack([images[i] for i in same]).to(device).float().mul_(1 / 255)  # (M, 3, H, W)
            boxes = sample_crop_boxes(len(same), *size, generator, scale=(s.min_crop_scale, 1.0)).to(device)
            views[same] = resized_crop(batch, boxes, s.input_size, flip[same].to(device))
        yield views.clamp_(0, 1), torch.as_tensor(labels, dtype=torch.int64).to(device)


def finetune(encoder: nn.Module, dataset, num_classes: int, schedule: Schedule, base_lr: float,
             desc: str = "fine-tune") -> FineTuned:
    """Fine-tune `encoder` (in place: pass a copy to keep it) and a new linear head end to end on `dataset`'s
    crop + flip views (Appendix B.5; BatchNorm in train mode). Returns the `FineTuned` model, in eval mode."""
    s, device = schedule, torch.device(schedule.device)
    if len(dataset) < 2:
        raise EvalError(f"{desc}: {len(dataset)} labelled image(s) are too few to fine-tune on (need 2); "
                        "raise --label-fraction")
    batch_size = min(s.batch_size, len(dataset))
    torch.manual_seed(s.seed)
    model = FineTuned(encoder, num_classes).to(device, memory_format=torch.channels_last).requires_grad_(True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr * batch_size / 256, momentum=s.momentum, nesterov=True)
    total = max(1, s.epochs * len(range(0, len(dataset) - 1, batch_size)))  # steps, as crop_flip_batches cuts them
    cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in (bar := tqdm(range(s.epochs), desc=desc, unit="epoch", leave=False, disable=None)):
        for images, labels in crop_flip_batches(dataset, s, epoch):
            with amp:
                logits = model(images)  # (B, C)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise Diverged(f"{desc}: non-finite loss at epoch {epoch + 1} with base lr {base_lr}: "
                                "lower the values of --lrs")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cosine.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def select_lr(encoder: nn.Module, labelled, num_classes: int, lrs: tuple[float, ...], schedule: Schedule,
              valid_fraction: float, desc: str = "") -> tuple[float, dict]:
    """The base lr of `lrs` with the best top-1 (then loss) on a seeded `valid_fraction` hold-out of `labelled`,
    each lr fine-tuning a copy of `encoder` on the rest; the test split is not seen. Returns it and the grid."""
    if len(lrs) == 1:
        return lrs[0], {"chosen_by": "only value of --lrs (no hold-out)"}
    try:
        fit, valid = holdout_split(labelled.labels.numpy(), valid_fraction, schedule.seed)
    except ValueError as err:
        raise EvalError(f"{err}: raise --label-fraction, or pass one value to --lrs to skip the selection") from None
    fit_set, valid_set = subset(labelled, fit), subset(labelled, valid)
    grid = {}
    for lr in lrs:
        try:
            model = finetune(copy.deepcopy(encoder), fit_set, num_classes, schedule, lr, desc=f"{desc}select lr {lr:g}")
        except Diverged as err:  # a too-high lr is a result of the search, not the end of it
            grid[lr] = {"valid_top1": None, "valid_loss": None, "diverged": True}
            tqdm.write(f"{desc}base lr {lr:g}: diverged ({err})")
            continue
        # a model's "features" are its logits `[M, C]`, on the eval view (eval mode, BatchNorm frozen)
        out = extract_features(model, valid_set, schedule.input_size, device=schedule.device, desc="hold-out")
        loss = float(F.cross_entropy(out.features.double(), out.labels))
        grid[lr] = {"valid_top1": topk_accuracy(out.features, out.labels, (1,))[0], "valid_loss": loss}
        tqdm.write(f"{desc}base lr {lr:g}: hold-out top-1 {grid[lr]['valid_top1']:.1f}%, loss {loss:.3f}")
    finished = [lr for lr in lrs if not grid[lr].get("diverged")]
    if not finished:
        raise EvalError(f"every base lr of --lrs {','.join(f'{lr:g}' for lr in lrs)} diverged: pass smaller ones")
    chosen = max(finished, key=lambda lr: (grid[lr]["valid_top1"], -grid[lr]["valid_loss"]))
    return chosen, {"chosen_by": "hold-out top-1, then hold-out loss", "fit_items": len(fit),
                    "valid_items": len(valid), "grid": {f"{lr:g}": grid[lr] for lr in lrs}}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. 0.01 or 0.05,0.1") from None


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(_number(v) for v in text.split(",") if v.strip())


@dataclass(frozen=True, kw_only=True)
class FineTuneOptions(RunOptions):
    """`RunOptions` plus the fine-tuning protocol's; `epochs` to `min_crop_scale` make the `Schedule` of every run."""

    label_fraction: float = option(0.01, "fraction of the labelled train split, class-balanced (default 0.01; the "
                                         "paper's 0.01 and 0.1; 1.0 for all)", type=_number, bound="(0, 1]")
    epochs: int | None = option(None, "epochs (default: 60 for <= 1%% of labels, else 30)", type=int, bound=">= 1")
    batch_size: int = option(64, "images per step (2 or more: BatchNorm), capped at the labelled subset (default "
                                 "64); lr = base lr x batch/256", bound=">= 2")
    lrs: tuple[float, ...] = option(DEFAULT_LRS, "base learning rates per 256 images to choose from on the hold-out "
                                                 f"(default {','.join(f'{v:g}' for v in DEFAULT_LRS)}); one value "
                                                 "skips the choice", type=_numbers, bound="all > 0")
    momentum: float = option(0.9, "Nesterov momentum (the paper's 0.9)", bound="[0, 1)")
    hflip: float | None = option(None, "probability that a fine-tuning view is mirrored (default: the checkpoint's "
                                       "dataset.hflip, else 0.5, the paper's)", type=_number, bound="[0, 1]")
    min_crop_scale: float = option(0.08, "smallest crop area (default 0.08)", type=_number, bound="(0, 1]")
    valid_fraction: float = option(0.2, "share of the labels held out to choose the lr (default 0.2)", bound="(0, 1)")
    baselines: str | tuple[str, ...] = option((), "random: also fine-tune a randomly initialised encoder "
                                                  "(supervised from scratch on the same labels); none (default)")
    eval_batch_size: int = option(256, "images per forward pass when scoring (default 256)", bound=">= 1")

    def __post_init__(self):
        object.__setattr__(self, "lrs", tuple(dict.fromkeys(float(lr) for lr in self.lrs)))
        object.__setattr__(self, "baselines", parse_names(self.baselines, BASELINES, "--baselines"))
        super().__post_init__()


def finetune_evaluate(checkpoint: str | Path, options: FineTuneOptions | None = None, *,
                      log: Callable[[str], None] = print, **fields) -> FineTuneResult:
    """Fine-tune a checkpoint's encoder on `label_fraction` of the labels and score it on test: `options`
    (`FineTuneOptions`) or its fields as keywords, as `evaluate` takes them. Raises the user errors of `evaluate`."""
    started = time.perf_counter()
    o = FineTuneOptions.of("feature_eval.finetune", checkpoint, options, **fields)
    ctx = open_context(checkpoint, o, encoder_device="cpu")
    # the flip as pretrained; the paper's 0.5 (DatasetConfig's default) where the file names no data
    flip_from = "--hflip" if o.hflip is not None else "as pretrained" if ctx.trained_data else "the paper's"
    o = dataclasses.replace(o, epochs=o.epochs or default_epochs(o.label_fraction),
                            hflip=o.hflip if o.hflip is not None else (ctx.trained_data or DatasetConfig()).hflip)
    schedule = Schedule(ctx.input_size, o.epochs, o.batch_size, o.momentum, o.hflip, o.min_crop_scale, o.seed,
                        ctx.device)
    labels = ctx.train_set.labels.numpy()
    indices = label_subset(labels, o.label_fraction, o.seed)
    labelled, counts = subset(ctx.train_set, indices), np.bincount(labels[indices], minlength=len(ctx.classes))
    # The subset is what was fit, not the fraction asked for: at least one image per class can make it larger.
    labelled_total, per_class = int((labels >= 0).sum()), f"{counts.min()}-{counts.max()} per class"
    share = f"{100 * len(indices) / labelled_total:.3g}%"
    fit = f"{len(indices):,} of {labelled_total:,} train images ({share}; --label-fraction {o.label_fraction:g})"
    epochs = f"{o.epochs} epoch" if o.epochs == 1 else f"{o.epochs} epochs"
    log(f"fine-tuning {ctx.checkpoint} on {fit} of {ctx.dataset}, {per_class}, {epochs}, {ctx.input_size}px, "
        f"crop scale {o.min_crop_scale:g}-1, hflip {o.hflip:g} ({flip_from}), on {ctx.device}; base lr from "
        f"{', '.join(f'{lr:g}' for lr in o.lrs)}")
    rows, models = [], {}
    starts = {"simclr": (ctx.encoder, ctx.trained_epochs)}  # extractor key: (encoder to start from, pretraining epochs)
    if "random" in o.baselines:  # supervised from scratch: the same protocol from random weights
        starts["random"] = (random_encoder(ctx.config.model.base_model, ctx.config.model.cifar_stem, o.seed), 0)
    for extractor, (start, pretrained_epochs) in starts.items():
        row, models[extractor] = _finetune_row(ctx, o, schedule, labelled, extractor, start, pretrained_epochs, share)
        rows.append(row)
        log_row(log, row, f"base lr {row.details['base_lr']:g}, ")
    timings = {f"finetune_{r.extractor}": r.seconds for r in rows} | {"total": round(time.perf_counter() - started, 3)}
    results = _record(ctx, o, fit, indices, counts, rows, timings)
    outcome = FineTuneResult(results, markdown_table(rows, FINETUNE_COLUMNS), models)
    if o.write:
        lr = "base lr chosen on a hold-out of those labels" if len(o.lrs) > 1 else \
            f"base lr {o.lrs[0]:g} (one --lrs value: no hold-out)"
        caption = table_caption(results, f"`{ctx.checkpoint}` fine-tuned end to end", f"{fit}, class-balanced "
                                f"({per_class}), views: {results['options']['augmentation']}, {lr}")
        stem = f"{ctx.results_stem()}_finetune-{fraction_tag(o.label_fraction)}"  # next to evaluate's results
        outcome.paths = write_results(results, outcome.table, ctx.out_dir, stem, caption)
    return outcome


def _finetune_row(ctx: EvalContext, o: FineTuneOptions, schedule: Schedule, labelled, extractor: str,
                  start: nn.Module, pretrained_epochs: int | None, share: str) -> tuple[Row, FineTuned]:
    """Choose the base lr on a hold-out of `labelled`, fine-tune a copy of `start` on all of it, score it on test."""
    tic, name = time.perf_counter(), EXTRACTOR_NAMES[extractor]
    chosen, selection = select_lr(start, labelled, len(ctx.classes), o.lrs, schedule, o.valid_fraction, f"{name}: ")
    model = finetune(copy.deepcopy(start), labelled, len(ctx.classes), schedule, chosen, desc=f"{name}: final")
    test = extract_features(model, ctx.test_set, ctx.input_size, o.eval_batch_size, ctx.device, desc="test")
    top1, top5 = topk_accuracy(test.features, test.labels)  # the one place test labels are read
    batch = min(o.batch_size, len(labelled))
    return Row("finetune", f"Fine-tuned end to end ({share} labels)", extractor, ctx.architecture, start.feature_dim,
               None, pretrained_epochs, top1, top5, round(time.perf_counter() - tic, 3),
               {"base_lr": chosen, "lr": chosen * batch / 256, "finetune_epochs": o.epochs, "batch_size": batch,
                "selection": selection}), model.cpu()


def _record(ctx: EvalContext, o: FineTuneOptions, fit: str, indices: np.ndarray, counts: np.ndarray,
            rows: list[Row], timings: dict) -> dict:
    views = f"random resized crop (scale {o.min_crop_scale:g}-1)" + (  # in words, as the caption quotes them
        f" + horizontal flip (p {o.hflip:g})" if o.hflip else " without flips")
    return ctx.record(
        o, {"fit": fit, "train": len(ctx.train_set), "labelled": len(indices), "test": len(ctx.test_set)},
        {**o.recorded("label_fraction", "epochs", "batch_size", "lrs", "momentum", "hflip", "min_crop_scale",
                      "valid_fraction", "baselines"), "augmentation": views,
         "optimizer": "SGD, Nesterov momentum, no weight decay, cosine decay, no warmup"}, timings,
        protocol="finetune", label_subset={"fraction": o.label_fraction, "seed": o.seed,
                                           "per_class": {c: int(n) for c, n in zip(ctx.classes, counts)},
                                           "indices": indices.tolist() if len(indices) <= 5000 else None},
        selection={row.extractor: row.details["selection"] for row in rows}, rows=[row.to_json() for row in rows])


def main(argv: list[str] | None = None) -> int:
    return run_cli(FineTuneOptions, "feature_eval.finetune", __doc__, argv, finetune_evaluate)


if __name__ == "__main__":
    sys.exit(main())

"""The kNN monitor: how well the backbone's features classify, measured while the run trains.

A weighted cosine kNN (k = 200, temperature 0.1: Wu et al. 2018, as solo-learn and DINO monitor) is fitted on a
seeded 80 % of a seeded sample of the data set's labelled `train` split and scored on the other 20 %. The test
split is never read, and nothing is chosen by the number: `best.pt` follows the validation NT-Xent. The images
are the evaluation's deterministic view at the run's input size, prepared once; each measurement only runs the
encoder over them in eval mode, so it draws no random number and leaves BatchNorm's running statistics alone.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torchvision.transforms import v2
from tqdm import tqdm

from data_aug.datasets import load_split
from data_aug.views import create_eval_resize
from knn.neighbours import weighted_knn_top1

SCORED_SHARE = 0.2  # of the sampled labelled images, scored; the rest are the neighbours
MIN_IMAGES = 5  # four neighbours and one image to score
PREPARE_BATCH = 256


class MonitorUnavailable(ValueError):
    """The data set has nothing the monitor can measure (no labels, one class, too few images): a one-line reason."""


def monitor_sample(labels: torch.Tensor, max_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (fit, scored) indices into a labelled split: at most `max_images` of its labelled items, 20 % scored.

    Uses its own generator: the run's global random state is not touched.
    Args:
        labels: int64 `[N]`, -1 where an item has no label (never chosen).
    Returns:
        sorted int64 index tensors (fit `[F]`, scored `[S]`).
    Raises:
        MonitorUnavailable: fewer than `MIN_IMAGES` labelled items or fewer than two classes among them.
    """
    labelled = torch.nonzero(labels >= 0).flatten()
    if len(labelled) < MIN_IMAGES:
        raise MonitorUnavailable(f"{len(labelled)} labelled image(s) in the train split; it needs {MIN_IMAGES}")
    order = labelled[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))][:max_images]
    if len(torch.unique(labels[order])) < 2:
        raise MonitorUnavailable("the train split's labelled images are all of one class")
    scored = max(1, round(SCORED_SHARE * len(order)))
    return order[scored:].sort().values, order[:scored].sort().values


class KnnMonitor:
    """The monitor's images, prepared once, and `measure(encoder)`, the weighted kNN top-1 of its features.

    Args:
        images: uint8 `[n, 3, crop, crop]`, the evaluation view without its scaling to [0, 1].
        labels: int64 `[n]`; fit_count: the first `fit_count` images are the neighbours, the rest are scored.
        num_classes: classes of the data set.
        k, temperature: the weighted kNN's neighbours and vote temperature.
        device: where the encoder runs; batch_size: images per forward pass.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, fit_count: int, num_classes: int, k: int = 200,
                 temperature: float = 0.1, device: torch.device | str = "cpu", batch_size: int = 256):
        self.images, self.labels, self.fit_count = images, labels, fit_count
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.device, self.batch_size = torch.device(device), batch_size
        self.to_float = v2.ToDtype(torch.float32, scale=True)  # the evaluation transform's last step

    @classmethod
    def from_dataset(cls, data, crop_size: int, max_images: int, seed: int, **kwargs) -> "KnnMonitor":
        """The monitor of a labelled split `data` (items `(uint8 [3, H, W], label)`, with `labels`; `images` used
        when present): a seeded sample of at most `max_images`, at the evaluation view of `crop_size`.

        Raises:
            MonitorUnavailable: see `monitor_sample`.
        """
        labels = torch.as_tensor(data.labels, dtype=torch.int64)
        fit, scored = monitor_sample(labels, max_images, seed)
        chosen = torch.cat([fit, scored])
        resize = create_eval_resize(crop_size)
        held = getattr(data, "images", None)
        batches = []
        for start in tqdm(range(0, len(chosen), PREPARE_BATCH), desc="kNN monitor images", unit="batch",
                          leave=False, disable=None):
            index = chosen[start:start + PREPARE_BATCH]
            if isinstance(held, torch.Tensor):
                batches.append(resize(held[index]))
            else:  # files, decoded one by one and stored at the view's size
                batches.append(torch.stack([resize(data[int(i)][0]) for i in index]))
        num_classes = len(getattr(data, "classes", [])) or int(labels.max()) + 1
        return cls(torch.cat(batches), labels[chosen], len(fit), num_classes, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        """`k=200, T=0.1; 1,150 labelled train images as neighbours, 287 scored`."""
        return (f"k={self.k}, T={self.temperature:g}; {self.fit_count:,} labelled train images as neighbours, "
                f"{len(self) - self.fit_count:,} scored")

    @torch.no_grad()
    def features(self, encoder: nn.Module, autocast: Callable = contextlib.nullcontext,
                 watch: Callable[[Iterable], Iterable] = lambda batches: batches) -> torch.Tensor:
        """float32 `[n, D]` features of the monitor's images, in eval mode (BatchNorm uses and keeps its running
        statistics) under `autocast()`; the encoder's train/eval mode is restored after.

        `watch` wraps the batches (the trainer's guard marks the run alive at each one)."""
        was_training = encoder.training
        encoder.eval()
        out = []
        try:
            starts = range(0, len(self), self.batch_size)
            bar = tqdm(starts, desc="kNN monitor", unit="batch", leave=False, disable=None)
            for start in watch(bar):
                x = self.to_float(self.images[start:start + self.batch_size]).to(self.device, non_blocking=True)
                with autocast():
                    out.append(encoder(x).float())  # (B, D)
        finally:
            encoder.train(was_training)
        return torch.cat(out)

    def measure(self, encoder: nn.Module, autocast: Callable = contextlib.nullcontext,
                watch: Callable[[Iterable], Iterable] = lambda batches: batches) -> float:
        """Weighted kNN top-1 (%) of the scored images against the fitted ones, on `encoder`'s features."""
        features = self.features(encoder, autocast, watch)
        labels = self.labels.to(features.device)
        n = self.fit_count
        return weighted_knn_top1(features[:n], labels[:n], features[n:], labels[n:], self.num_classes, self.k,
                                 self.temperature)


def load_monitor(dataset: str, root, skip_bad_images: bool, crop_size: int, max_images: int, seed: int,
                 **kwargs) -> KnnMonitor:
    """The monitor of a data set's labelled `train` split (digits, STL10's 5,000 labelled images, CIFAR's train,
    an ImageFolder's train/): never `unlabeled`, never `test`.

    Raises:
        MonitorUnavailable: the split has no two classes to tell apart, or too few images.
    """
    data = load_split(dataset, root, "train", download=False, skip_bad_images=skip_bad_images)
    return KnnMonitor.from_dataset(data, crop_size, max_images, seed, **kwargs)

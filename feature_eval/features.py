"""Frozen-encoder features: batched extraction with a progress bar, cached on disk by checkpoint and split."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_aug.views import Transformed, create_eval_transform


@dataclass
class FeatureSplit:
    """One split's features float32 `[N, D]` and labels int64 `[N]`, on the CPU, and `facts` the extractor found
    with them (PCA: components, explained variance), cached with them."""

    features: torch.Tensor
    labels: torch.Tensor
    facts: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def image_batches(dataset, crop_size: int, batch_size: int, num_workers: int = 0, desc: str = "images"):
    """Yield `(images, labels)`: float `[B, 3, crop, crop]` in [0, 1] (the deterministic eval view), int64 `[B]`;
    an in-memory data set (`.images`/`.labels` tensors) directly, others (items `(uint8 [3, H, W], label)`) through
    a DataLoader with `num_workers` workers."""
    transform = create_eval_transform(crop_size)
    if all(isinstance(getattr(dataset, name, None), torch.Tensor) for name in ("images", "labels")):
        chunks = zip(dataset.images.split(batch_size), dataset.labels.split(batch_size))
        batches = ((transform(x), y) for x, y in chunks)  # a whole batch at a time: several times faster
    else:
        batches = DataLoader(Transformed(dataset, transform), batch_size=batch_size, num_workers=num_workers)
    for images, labels in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None,
                               total=(len(dataset) + batch_size - 1) // batch_size):
        yield images, torch.as_tensor(labels, dtype=torch.int64)


def extract_features(encoder: torch.nn.Module, dataset, crop_size: int, batch_size: int = 256,
                     device: str | torch.device | None = None, num_workers: int = 0,
                     desc: str = "features") -> FeatureSplit:
    """Features of every image of `dataset` (items `(uint8 [3, H, W], label)`), in order, on `device` (default
    `best_device()`): float32 `[N, D]` and int64 labels `[N]` on the CPU. Eval mode under `torch.inference_mode()`:
    BatchNorm in train mode would change the model being evaluated (the mode is restored after). Never autocast."""
    device = torch.device(device) if device is not None else best_device()
    was_training = encoder.training
    encoder.eval().to(device, memory_format=torch.channels_last)  # in place; the trainer's layout: faster, same numbers
    features, labels = [], []
    try:
        with torch.inference_mode():
            for images, batch_labels in image_batches(dataset, crop_size, batch_size, num_workers, desc):
                out = encoder(images.to(device, non_blocking=True))  # (B, D)
                features.append(out.float().cpu())
                labels.append(batch_labels)
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError(f"{desc}: the data set is empty")
    return FeatureSplit(torch.cat(features), torch.cat(labels).long())


def data_fingerprint(dataset) -> str:
    """A digest of a data set's content for cache keys: an in-memory set's images and labels, or an image folder's
    labels and each file's path, size and modification time."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(torch.as_tensor(dataset.labels, dtype=torch.int64).contiguous().numpy())
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy())
    else:
        for path in dataset.files:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def encoder_features(encoder: torch.nn.Module, name: str, key: dict, splits: dict, crop_size: int,
                     batch_size: int, device, num_workers: int, cache_dir: str | Path | None,
                     log: Callable[[str], None] = print) -> tuple[FeatureSplit, ...]:
    """`extract_features` of each split of `splits` (split name -> data set), cached under `key` plus the split's
    name and content digest (`data_fingerprint`): features of other data are never reused."""
    return tuple(cached_features(
        cache_dir, {**key, "split": split, "data": data_fingerprint(data) if cache_dir else None},
        lambda data=data, split=split: extract_features(encoder, data, crop_size, batch_size, device, num_workers,
                                                        f"{name} features ({split})"), log)
        for split, data in splits.items())


def cached_features(cache_dir: str | Path | None, key: dict, compute: Callable[[], FeatureSplit],
                    log: Callable[[str], None] = print) -> FeatureSplit:
    """`compute()` once per `key` (JSON-able: everything the features depend on), stored as `<cache_dir>/<sha256 of
    key>.pt`; a file whose key or shapes disagree is recomputed, one that cannot be written only warns, and
    `cache_dir=None` reads and writes nothing."""
    if cache_dir is None:
        return compute()
    text = json.dumps(key, sort_keys=True)
    path = Path(cache_dir) / (hashlib.sha256(text.encode()).hexdigest()[:32] + ".pt")
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            split = FeatureSplit(state["features"], state["labels"], state.get("facts") or {})
            if state.get("key") == text and split.features.ndim == 2 and len(split.features) == len(split.labels):
                log(f"features: loaded {len(split)} x {split.features.shape[1]} from cache {path}")
                return split
        except Exception as err:  # noqa: BLE001 - any unreadable cache file is only recomputed
            warnings.warn(f"feature cache {path} is unreadable ({type(err).__name__}); recomputing", stacklevel=2)
    split = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed once whole: a reader never sees half
        torch.save({"key": text, "features": split.features, "labels": split.labels, "facts": split.facts}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write feature cache {path} ({err.strerror or err}); pass --cache-dir to a "
                      "writable folder to reuse features", stacklevel=2)
    return split

"""Baseline feature extractors: PCA of raw pixels, and the same encoder architecture with random weights."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from feature_eval.features import FeatureSplit, cached_features, data_fingerprint, encoder_features, image_batches
from models.loading import RUNS_DIR, freeze
from models.resnet_simclr import Encoder

# Baselines do not depend on the run: their features are shared by every run evaluated on the same data.
BASELINE_CACHE = RUNS_DIR / "eval_cache" / "baselines"


def pca_baseline(train_dataset, test_dataset, crop_size: int, n_components: int, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0) -> tuple[FeatureSplit, FeatureSplit]:
    """The original repository's (sthalles/SimCLR) baseline: `StandardScaler`, then `PCA(n_components)` (capped at
    min(N, pixels)), fitted on train's eval-view pixels; test is projected batch by batch, so only the training
    pixels are held at once. Returns train `[N, K]` (its facts: components, variance) and test `[M, K]`."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    def pixels(dataset, split: str, project=lambda x: x) -> tuple[np.ndarray, torch.Tensor]:
        batches = [(project(images.flatten(1).numpy()), labels) for images, labels
                   in image_batches(dataset, crop_size, batch_size, num_workers, f"pixels ({split})")]
        return np.concatenate([x for x, _ in batches]), torch.cat([y for _, y in batches]).long()

    train, train_labels = pixels(train_dataset, "train")  # (N, P) float32
    components = min(n_components, train.shape[0], train.shape[1])
    scaler = StandardScaler().fit(train)
    train = scaler.transform(train)  # a scaled copy replaces the pixels: one training-size array at a time
    pca = PCA(n_components=components, random_state=seed)
    train_split = FeatureSplit(torch.from_numpy(pca.fit_transform(train).astype(np.float32)), train_labels, {
        "n_components": components, "explained_variance": float(pca.explained_variance_ratio_.sum())})
    del train
    test, test_labels = pixels(test_dataset, "test", lambda x: pca.transform(scaler.transform(x)).astype(np.float32))
    return train_split, FeatureSplit(torch.from_numpy(test), test_labels)


def random_encoder(base_model: str, cifar_stem: bool, seed: int) -> Encoder:
    """The encoder architecture with torchvision's seeded random initialisation, frozen (BatchNorm keeps its initial
    statistics, as the untrained network has)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(base_model, cifar_stem)
    return freeze(encoder)


def random_init_features(base_model: str, cifar_stem: bool, seed: int, train_dataset, test_dataset, crop_size: int,
                         batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
                         cache_dir: str | Path | None = None,
                         log: Callable[[str], None] = print) -> tuple[FeatureSplit, FeatureSplit]:
    """Features of both splits under `random_encoder(base_model, cifar_stem, seed)`, cached by architecture, seed,
    torch version, eval size and content (`BASELINE_CACHE` shares them with `feature_eval.evaluate`)."""
    key = {"extractor": "random", "base_model": base_model, "cifar_stem": cifar_stem, "seed": seed,
           "torch": torch.__version__, "input_size": crop_size}
    return encoder_features(random_encoder(base_model, cifar_stem, seed), "Random init", key,
                            {"train": train_dataset, "test": test_dataset}, crop_size, batch_size, device,
                            num_workers, cache_dir, log)


def pca_features(train_dataset, test_dataset, crop_size: int, n_components: int, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[FeatureSplit, FeatureSplit, dict]:
    """`pca_baseline`, cached across runs by both splits' content digests, eval size, components and seed."""
    import sklearn

    key = {"extractor": "pca", "n_components": n_components, "seed": seed, "input_size": crop_size,
           "sklearn": sklearn.__version__, "train": data_fingerprint(train_dataset),
           "test": data_fingerprint(test_dataset)}
    both = functools.cache(lambda: pca_baseline(train_dataset, test_dataset, crop_size, n_components, batch_size,
                                                num_workers, seed))  # once, for whichever split is not cached
    train, test = (cached_features(cache_dir, {**key, "split": split}, lambda i=i: both()[i], log)
                   for i, split in enumerate(("train", "test")))
    # a cache file written before the facts were kept has none
    return train, test, train.facts or {"n_components": int(train.features.shape[1]), "explained_variance": None}

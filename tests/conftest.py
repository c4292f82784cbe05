"""Shared fixtures: tiny data sets in real on-disk formats and tiny training configs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4, n_unlabeled: int = 10, seed: int = 0) -> dict:
    """Write tiny STL10 files in the real binary layout (uint8, each channel column-major, labels 1..10).

    Returns the images as torchvision orients them ([N, 3, 96, 96], row-major) and the 0-based labels.
    """
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # (row, column) orientation
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # stored column-major
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, size=n, dtype=np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
        out[split] = (images, None if labels is None else labels.astype(np.int64) - 1)
    return out


@pytest.fixture
def stl10_root(tmp_path):
    data = write_stl10(tmp_path)
    return tmp_path, data


TINY_OVERRIDES = ["dataset.name=digits", "dataset.input_shape=(16,16,3)", "batch_size=8", "epochs=2",
                  "model.out_dim=16", "dataset.valid_size=0.05", "log_every_n_steps=1", "device=cpu",
                  "dataset.num_workers=0", "seed=0"]

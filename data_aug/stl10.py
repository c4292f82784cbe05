"""STL10 from its real on-disk format (`<root>/stl10_binary/*.bin`, as torchvision lays it out)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_aug.errors import DataError

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
ARCHIVE_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
IMAGE_BYTES = 3 * 96 * 96
SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
          "unlabeled": ("unlabeled_X.bin", None)}
_HOW_TO_GET = ("set dataset.download: true to fetch it (2.6 GB, checksum verified), or extract "
               f"{URL} so that <root>/stl10_binary/ holds the .bin files")


def read_stl10(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an STL10 split from `<root>/stl10_binary/`.

    Args:
        root: folder that holds `stl10_binary/`.
        split: `train` (5,000), `test` (8,000), `unlabeled` (100,000) or `train+unlabeled`.

    Returns:
        images: uint8 `[N, 3, 96, 96]`, oriented as torchvision's `STL10.data` (the files are column-major).
        labels: int64 `[N]`, 0..9, and -1 for unlabeled images.
    """
    if split not in SPLITS:
        raise ValueError(f"STL10 split {split!r} is not one of {', '.join(SPLITS)}")
    parts = split.split("+")
    folder = Path(root) / "stl10_binary"
    counts = [_count_images(folder / _FILES[p][0]) for p in parts]
    images = torch.empty((sum(counts), 3, 96, 96), dtype=torch.uint8)
    labels = []
    start = 0
    for part, count in zip(parts, counts):
        x_name, y_name = _FILES[part]
        _copy_images(folder / x_name, images[start:start + count])
        labels.append(_read_labels(folder / y_name, count) if y_name else torch.full((count,), -1, dtype=torch.int64))
        start += count
    return images, torch.cat(labels)


def download_stl10(root: str | Path) -> None:
    """Download and extract the STL10 archive into `root` (verified against its MD5) unless present."""
    from torchvision.datasets.utils import download_and_extract_archive

    root, archive = Path(root), Path(root) / "stl10_binary.tar.gz"
    folder, existed = root / "stl10_binary", root.exists()
    if all((folder / name).is_file() for pair in _FILES.values() for name in pair if name):
        return
    try:
        download_and_extract_archive(URL, str(root), filename=archive.name, md5=ARCHIVE_MD5)
    except (OSError, RuntimeError) as err:  # no network, a full disk, a checksum mismatch
        archive.unlink(missing_ok=True)  # a partial archive cannot be resumed: the next try starts over anyway
        if not existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind that looks like a data set
        raise DataError(f"downloading STL10 into {root} failed ({err}): check the network and disk space, or "
                        f"fetch {URL} yourself and extract it so that {folder} holds the .bin files") from None


def _count_images(path: Path) -> int:
    if not path.is_file():
        raise DataError(f"STL10 file {path} is missing: {_HOW_TO_GET}")
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"STL10 file {path} is truncated or damaged ({size} bytes is not a whole number of "
                        f"{IMAGE_BYTES}-byte images): delete it and {_HOW_TO_GET}")
    return size // IMAGE_BYTES


def _copy_images(path: Path, out: torch.Tensor, chunk: int = 4096) -> None:
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    for i in range(0, len(raw), chunk):
        # Each channel is stored column-major; the transpose gives torchvision's (row, column) layout.
        out[i:i + chunk] = torch.from_numpy(np.ascontiguousarray(raw[i:i + chunk].transpose(0, 1, 3, 2)))
    del raw


def _read_labels(path: Path, count: int) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"STL10 file {path} is missing: {_HOW_TO_GET}")
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count:
        raise DataError(f"STL10 file {path} holds {len(raw)} labels for {count} images: the download is "
                        f"damaged; delete {path.parent} and {_HOW_TO_GET}")
    if len(raw) and (raw.min() < 1 or raw.max() > 10):
        raise DataError(f"STL10 file {path} has labels outside 1..10 (found {raw.min()}..{raw.max()}): "
                        f"the file is damaged; delete it and {_HOW_TO_GET}")
    return torch.from_numpy(raw.astype(np.int64) - 1)

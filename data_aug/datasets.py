"""Data sets as uint8 images `[3, H, W]` with int64 labels (-1 where there is none).

`load_split(name, root, split)` is the one entry point. Splits: `pretrain` (everything usable without
labels: STL10 train+unlabeled, ImageFolder train + unlabeled), `train` (labelled, for linear probes)
and `test`. Fixed-size sets are held as one tensor (`TensorImages.images`); ImageFolder decodes files
lazily, converting grey, palette and RGBA images to RGB.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from data_aug.errors import DataError
from data_aug.stl10 import download_stl10, read_stl10

SPLITS = ("pretrain", "train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DIGITS_SIZE = 32


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as one uint8 tensor `[N, 3, H, W]` with labels `[N]`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on access to uint8 RGB `[3, H, W]`."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str]):
        self.files, self.labels, self.classes = files, torch.tensor(labels, dtype=torch.int64), classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.files[index]), int(self.labels[index])


def decode_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB `[3, H, W]`; a damaged file raises DataError naming it."""
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path} ({err}): remove or replace the file, "
                        "or set dataset.skip_bad_images: true to skip unreadable files") from None


def load_split(name: str, root: str | Path, split: str, download: bool = False,
               skip_bad_images: bool = False) -> TensorImages | ImageFiles:
    """Load one split of a data set by name (`stl10`, `cifar10`, `cifar100`, `imagefolder`, `digits`)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    root = Path(root)
    if name == "stl10":
        if download:
            download_stl10(root)
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        images, labels = read_stl10(root, stl_split)
        classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
        return TensorImages(images, labels, classes)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, split, download)
    if name == "digits":
        return _load_digits(split)
    if name == "imagefolder":
        return _load_image_folder(root, split, skip_bad_images)
    raise ValueError(f"unknown dataset {name!r}")


def split_validation(n: int, valid_size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, deterministic (train, valid) index split holding out `valid_size` of `n` items."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_valid = int(round(n * valid_size))
    if valid_size > 0:
        n_valid = min(max(n_valid, 2), n - 2)  # NT-Xent needs two images on each side
    return order[n_valid:].sort().values, order[:n_valid].sort().values


def subset(data: TensorImages | ImageFiles, indices) -> TensorImages | ImageFiles:
    """The items `indices` (a sequence or array of ints) of a data set from `load_split`, as the same kind of data
    set, labels included: a gather of tensors or file names, no image decoded."""
    index = torch.as_tensor(indices, dtype=torch.int64)
    if isinstance(data, TensorImages):
        return TensorImages(data.images[index], data.labels[index], data.classes)
    return ImageFiles([data.files[i] for i in index.tolist()], data.labels[index].tolist(), data.classes)


def _load_cifar(name: str, root: Path, split: str, download: bool) -> TensorImages:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        data = cls(str(root), train=split != "test", download=download)
    except (OSError, RuntimeError) as err:  # not found, no network, or a checksum mismatch
        action = "check the network and disk space" if download else "set dataset.download: true"
        raise DataError(f"{name} could not be loaded from {root} ({err}): {action}, or point "
                        "dataset.root at the folder holding the extracted archive") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
    return TensorImages(images, torch.tensor(data.targets, dtype=torch.int64), list(data.classes))


def _load_digits(split: str) -> TensorImages:
    """scikit-learn's 8x8 digits, upscaled to 32x32 RGB; a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8), in [0, 1]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=digits.target)
    index = torch.tensor(test_idx if split == "test" else train_idx)
    return TensorImages(images[index], labels[index], [str(i) for i in range(10)])


def _load_image_folder(root: Path, split: str, skip_bad_images: bool) -> ImageFiles:
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"ImageFolder root {root} {what} (resolved: {root.resolve()}): set dataset.root to the folder "
                        "holding train/<class>/* and test/<class>/*")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"ImageFolder root {root} has no train/ folder: lay it out as "
                        "<root>/train/<class>/*, <root>/test/<class>/* and optionally <root>/unlabeled/**")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders: put images in {train_dir}/<class>/")
    files, labels = [], []
    if split in ("pretrain", "train"):
        files, labels = _class_files(train_dir, classes)
    if split == "test":
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise DataError(f"ImageFolder root {root} has no test/ folder: evaluation needs <root>/test/<class>/*")
        unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise DataError(f"{test_dir} has classes not in {train_dir}: {', '.join(unknown)}")
        files, labels = _class_files(test_dir, classes)
    if split == "pretrain" and (root / "unlabeled").is_dir():
        extra = sorted(p for p in (root / "unlabeled").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files, labels = files + extra, labels + [-1] * len(extra)
    if not files:
        raise DataError(f"no images with suffixes {', '.join(IMAGE_SUFFIXES)} found for split {split!r} under {root}")
    # Found now, not mid-epoch: a damaged file would otherwise stop a run before its first checkpoint.
    bad = find_bad_images(files, thorough=skip_bad_images, desc=f"checking {split} images")
    if bad and not skip_bad_images:
        path, reason = next(iter(bad.items()))
        raise DataError(f"{len(bad)} of {len(files)} images under {root} cannot be decoded, e.g. {path} ({reason}): "
                        "remove or replace them, or set dataset.skip_bad_images: true to go on without them")
    if bad:
        path, reason = next(iter(bad.items()))
        warnings.warn(f"skipped {len(bad)} of {len(files)} images under {root} that cannot be decoded, e.g. {path} "
                      f"({reason})", stacklevel=2)
        kept = [i for i, f in enumerate(files) if f not in bad]
        files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    return ImageFiles(files, labels, classes)


def find_bad_images(files: list[Path], thorough: bool = False, desc: str = "checking images") -> dict[Path, str]:
    """The files that cannot be decoded, each with the reason, found before training rather than mid-epoch.

    A PNG or JPEG counts as whole when its header parses and its last bytes close it (the IEND chunk, the EOI
    marker): about 0.04 ms a file, 0.2 s for 4,000 small images (docs/CPU.md). Any other file, or one whose end
    is not where it should be (cut short, or followed by padding), is decoded in full. `thorough` decodes every
    file in full (as `dataset.skip_bad_images` does, so that a run that skips never meets a bad file later).
    A progress bar shows on a terminal for large folders.
    """
    from tqdm import tqdm

    bad = {}
    for path in tqdm(files, desc=desc, unit="image", leave=False, disable=True if len(files) < 20000 else None):
        if thorough or not _looks_whole(path):
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                bad[path] = " ".join(str(err).split()) or type(err).__name__
    return bad


def _looks_whole(path: Path) -> bool:
    """Whether the header of `path` parses and the file ends as a complete PNG or JPEG does; False for a damaged
    file and for every other format (the caller then decodes it)."""
    try:
        with open(path, "rb") as f, Image.open(f) as img:
            kind = img.format
            f.seek(max(0, f.seek(0, 2) - 12))
            tail = f.read()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return (kind == "PNG" and tail[4:8] == b"IEND") or (kind == "JPEG" and tail.endswith(b"\xff\xd9"))


def _class_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        files += found
        labels += [label] * len(found)
    return files, labels



def decode_all(data: ImageFiles, desc: str = "decoding images") -> TensorImages:
    """An image folder decoded once into memory, for views made in batch (`augment_on: device`).

    Raises:
        DataError: the images do not all have the same size (they cannot form one tensor), naming two sizes.
    """
    from tqdm import tqdm

    images, first = [], None
    for path in tqdm(data.files, desc=desc, unit="image", leave=False, disable=None):
        image = decode_image(path)
        if first is None:
            first = (path, tuple(image.shape[1:]))
        elif tuple(image.shape[1:]) != first[1]:
            raise DataError(f"dataset.augment_on = 'device' needs images of one size: {first[0]} is "
                            f"{first[1][1]}x{first[1][0]}, {path} is {image.shape[2]}x{image.shape[1]}; resize them "
                            "to one size, or use dataset.augment_on: cpu")
        images.append(image)
    return TensorImages(torch.stack(images), data.labels.clone(), data.classes)

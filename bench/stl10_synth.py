"""A synthetic STL10 folder in the real binary format, of any size, for speed tests without the download.

    python -m bench.stl10_synth bench_data/stl10                      # full size: 5,000 + 8,000 + 100,000 images
    python -m bench.stl10_synth bench_data/small --unlabeled 49000     # a smaller pretraining set

Writes `<root>/stl10_binary/{train,test}_{X,y}.bin`, `unlabeled_X.bin`, `class_names.txt` and
`fold_indices.txt` exactly as the archive lays them out (uint8 images, each channel stored column-major;
labels 1..10), so `data_aug.stl10.read_stl10` and `python run.py dataset.root=<root>` read them as the real
data. The content is noise: a view pipeline costs the same whatever the pixels are. To be fast (the full
size is 3.1 GB) one random block of images is drawn once and each chunk of a file is that block shifted by
its own constant (uint8 arithmetic wraps), so images in different chunks differ.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (3, 96, 96)
IMAGE_BYTES = 3 * 96 * 96
CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FULL = {"train": 5_000, "test": 8_000, "unlabeled": 100_000}


def expected_sizes(n_train: int, n_test: int, n_unlabeled: int) -> dict[str, int]:
    """File name -> size in bytes of a complete folder with these image counts."""
    return {"train_X.bin": n_train * IMAGE_BYTES, "train_y.bin": n_train,
            "test_X.bin": n_test * IMAGE_BYTES, "test_y.bin": n_test,
            "unlabeled_X.bin": n_unlabeled * IMAGE_BYTES}


def _write_images(path: Path, count: int, pool: np.ndarray, shift: int) -> None:
    chunk = len(pool)
    with open(path, "wb") as f:
        for index, start in enumerate(range(0, count, chunk)):
            n = min(chunk, count - start)
            block = pool[:n] + np.uint8((shift + 37 * index) % 256)  # (row, column) orientation, wraps mod 256
            f.write(np.ascontiguousarray(block.transpose(0, 1, 3, 2)).tobytes())  # stored column-major


def write_synthetic_stl10(root: str | Path, n_train: int = FULL["train"], n_test: int = FULL["test"],
                          n_unlabeled: int = FULL["unlabeled"], seed: int = 0, chunk: int = 4096,
                          reuse: bool = True) -> Path:
    """Write a synthetic STL10 folder `<root>/stl10_binary/` with these image counts; returns that folder.

    Args:
        n_train, n_test, n_unlabeled: images per split (the real set: 5,000, 8,000, 100,000); at least 1 each.
        seed: the same seed writes the same bytes.
        chunk: images made and written at a time (memory is about `chunk` x 27.6 kB, twice).
        reuse: keep the folder as it is when every file already has the size these counts give.
    """
    counts = {"train": n_train, "test": n_test, "unlabeled": n_unlabeled}
    bad = [f"{name}={n}" for name, n in counts.items() if n < 1]
    if bad or chunk < 1:
        raise ValueError("every split needs at least one image and chunk >= 1 "
                         f"(got {', '.join(bad) or f'chunk={chunk}'})")
    folder = Path(root) / "stl10_binary"
    sizes = expected_sizes(n_train, n_test, n_unlabeled)
    if reuse and all((folder / name).is_file() and (folder / name).stat().st_size == size
                     for name, size in sizes.items()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(min(chunk, max(counts.values())), *IMAGE_SHAPE), dtype=np.uint8)
    for shift, (split, count) in enumerate(counts.items()):
        _write_images(folder / f"{split}_X.bin", count, pool, 101 * shift)
        if split != "unlabeled":
            rng.integers(1, 11, size=count, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    folds = np.array_split(rng.permutation(n_train), 10)  # the archive's 10 folds of train indices, 0-based
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, fold)) + "\n" for fold in folds))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder that will hold stl10_binary/")
    parser.add_argument("--train", type=int, default=FULL["train"], help="labelled training images (5,000)")
    parser.add_argument("--test", type=int, default=FULL["test"], help="test images (8,000)")
    parser.add_argument("--unlabeled", type=int, default=FULL["unlabeled"], help="unlabeled images (100,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reuse", action="store_true", help="rewrite even if the files have the right sizes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = write_synthetic_stl10(args.root, args.train, args.test, args.unlabeled, args.seed,
                                       reuse=not args.no_reuse)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = args.train + args.test + args.unlabeled
    gigabytes = total * IMAGE_BYTES / 1e9
    print(f"{folder}: {args.train:,} train + {args.test:,} test + {args.unlabeled:,} unlabeled images "
          f"({gigabytes:.2f} GB) ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A synthetic STL10 folder in the real binary format, of any size, for speed tests without the download.

    python -m bench.stl10_synth bench_data/stl10                      # full size: 5,000 + 8,000 + 100,000 images
    python -m bench.stl10_synth bench_data/small --unlabeled 49000     # a smaller pretraining set

The files are laid out as the archive's (uint8, each channel column-major, labels 1..10, 10 folds), so
`python run.py dataset.root=<root>` reads them as the real data; the pixels are noise, which costs a view pipeline
the same. To write 3.1 GB fast, one random block is drawn once and each chunk is that block plus its own constant.
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


def expected_sizes(n_train: int, n_test: int, n_unlabeled: int) -> dict[str, int]:
    """File name -> size in bytes of a complete folder with these image counts."""
    return {"train_X.bin": n_train * IMAGE_BYTES, "train_y.bin": n_train, "test_X.bin": n_test * IMAGE_BYTES,
            "test_y.bin": n_test, "unlabeled_X.bin": n_unlabeled * IMAGE_BYTES}


def write_synthetic_stl10(root: str | Path, n_train: int = 5_000, n_test: int = 8_000, n_unlabeled: int = 100_000,
                          seed: int = 0, chunk: int = 4096, reuse: bool = True) -> Path:
    """Write `<root>/stl10_binary/` with these image counts (at least 1 each) and return it. The same seed writes
    the same bytes; `chunk` images are made at a time; with `reuse`, a folder whose files already have the sizes
    these counts give is kept as it is."""
    counts = {"train": n_train, "test": n_test, "unlabeled": n_unlabeled}
    bad = [f"{name}={n}" for name, n in counts.items() if n < 1]
    if bad or chunk < 1:
        raise ValueError("every split needs at least one image and chunk >= 1 "
                         f"(got {', '.join(bad) or f'chunk={chunk}'})")
    folder = Path(root) / "stl10_binary"
    if reuse and all((folder / name).is_file() and (folder / name).stat().st_size == size
                     for name, size in expected_sizes(n_train, n_test, n_unlabeled).items()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(min(chunk, max(counts.values())), *IMAGE_SHAPE), dtype=np.uint8)
    for shift, (split, count) in enumerate(counts.items()):
        with open(folder / f"{split}_X.bin", "wb") as f:
            for index, start in enumerate(range(0, count, len(pool))):
                block = pool[:count - start] + np.uint8((101 * shift + 37 * index) % 256)  # wraps mod 256
                f.write(np.ascontiguousarray(block.transpose(0, 1, 3, 2)).tobytes())  # stored column-major
        if split != "unlabeled":
            rng.integers(1, 11, size=count, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    folds = np.array_split(rng.permutation(n_train), 10)  # the archive's 10 folds of train indices, 0-based
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, fold)) + "\n" for fold in folds))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder that will hold stl10_binary/")
    parser.add_argument("--train", type=int, default=5_000, help="labelled training images (5,000)")
    parser.add_argument("--test", type=int, default=8_000, help="test images (8,000)")
    parser.add_argument("--unlabeled", type=int, default=100_000, help="unlabeled images (100,000)")
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
    print(f"{folder}: {args.train:,} train + {args.test:,} test + {args.unlabeled:,} unlabeled images "
          f"({total * IMAGE_BYTES / 1e9:.2f} GB) ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

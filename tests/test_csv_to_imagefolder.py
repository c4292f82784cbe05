"""bench/csv_to_imagefolder.py: a CSV of grey images becomes an ImageFolder the project reads."""
import gzip

import numpy as np
from PIL import Image

from bench import csv_to_imagefolder
from data_aug.datasets import load_split


def write_csv(path, images, labels):
    rows = [",".join(str(v) for v in list(img.ravel()) + [label]) for img, label in zip(images, labels)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")


def test_images_labels_and_split_survive_the_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 4, 4), dtype=np.uint8)
    labels = np.repeat([0, 1], 10)
    write_csv(tmp_path / "x.csv.gz", images, labels)
    out = tmp_path / "folder"
    assert csv_to_imagefolder.main([str(tmp_path / "x.csv.gz"), str(out), "--size", "4", "--test-fraction", "0.2"]) == 0
    test_files = sorted(out.glob("test/*/*.png"))
    assert len(sorted(out.glob("train/*/*.png"))) == 16 and len(test_files) == 4
    assert sorted(p.parent.name for p in test_files) == ["0", "0", "1", "1"]  # stratified
    for path in test_files:  # same pixels (no resize at --size 4), under its own label
        index = int(path.stem)
        assert np.array_equal(np.asarray(Image.open(path)), images[index])
        assert int(path.parent.name) == labels[index]
    assert len(load_split("imagefolder", str(out), "train")) == 16


def test_resize_and_label_column_first(tmp_path):
    images = np.full((4, 3, 3), 200, dtype=np.uint8)
    rows = "\n".join(f"{label}," + ",".join(["200"] * 9) for label in (0, 1, 0, 1))
    (tmp_path / "x.csv").write_text(rows + "\n")
    out = tmp_path / "folder"
    assert csv_to_imagefolder.main([str(tmp_path / "x.csv"), str(out), "--size", "8", "--label-column", "0",
                                    "--test-fraction", "0.5"]) == 0
    assert sorted({p.parent.name for p in out.glob("*/*/*.png")}) == ["0", "1"]  # labels from column 0
    picture = Image.open(next(out.glob("train/*/*.png")))
    assert picture.size == (8, 8) and np.asarray(picture).min() == images.min()


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("1,2,3,0\n")  # 3 pixels: not a square
    assert csv_to_imagefolder.main([str(tmp_path / "x.csv"), str(tmp_path / "out")]) == 1  # a bad file: runtime
    assert "not a square image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "exists").mkdir()
    assert csv_to_imagefolder.main([str(tmp_path / "x.csv"), str(tmp_path / "exists")]) == 2
    assert "exists" in capsys.readouterr().err

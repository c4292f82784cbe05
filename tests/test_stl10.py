from pathlib import Path

import numpy as np
import pytest
import torch

from data_aug.datasets import load_split
from data_aug.errors import DataError
from data_aug.stl10 import read_stl10
from tests.conftest import write_stl10


@pytest.mark.parametrize("split", ["train", "test", "unlabeled"])
def test_read_matches_written_images_and_labels(stl10_root, split):
    root, data = stl10_root
    images, labels = read_stl10(root, split)
    expected, expected_labels = data[split]
    assert images.dtype == torch.uint8 and images.shape == (len(expected), 3, 96, 96)
    assert torch.equal(images, torch.from_numpy(expected))
    assert labels.dtype == torch.int64
    if expected_labels is None:
        assert (labels == -1).all()
    else:
        assert torch.equal(labels, torch.from_numpy(expected_labels)) and labels.min() >= 0 and labels.max() <= 9


def test_orientation_matches_torchvision(stl10_root, monkeypatch):
    from torchvision.datasets import STL10

    root, _ = stl10_root
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)  # our tiny files have other md5s
    reference = STL10(str(root), split="train", download=False)
    images, labels = read_stl10(root, "train")
    assert torch.equal(images, torch.from_numpy(reference.data))
    assert torch.equal(labels, torch.from_numpy(reference.labels.astype(np.int64)))


def test_orientation_is_row_major(tmp_path):
    """A pixel written at (row 0, column 5) in the file's column-major layout reads back at [0, 5]."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    image = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    image[0, 0, 0, 5] = 255  # row 0, column 5
    image.transpose(0, 1, 3, 2).tofile(folder / "unlabeled_X.bin")
    images, _ = read_stl10(tmp_path, "unlabeled")
    assert images[0, 0, 0, 5] == 255 and images[0, 0, 5, 0] == 0


def test_train_plus_unlabeled(stl10_root):
    root, data = stl10_root
    images, labels = read_stl10(root, "train+unlabeled")
    assert len(images) == len(data["train"][0]) + len(data["unlabeled"][0])
    assert (labels[:6] >= 0).all() and (labels[6:] == -1).all()
    assert torch.equal(images[6:], torch.from_numpy(data["unlabeled"][0]))
    pretrain = load_split("stl10", root, "pretrain")
    assert len(pretrain) == len(images)


def test_missing_file_is_named(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "test_X.bin").unlink()
    with pytest.raises(DataError, match="test_X.bin.*download"):
        read_stl10(tmp_path, "test")


def test_truncated_file_is_named(tmp_path):
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train_X.bin.*truncated"):
        read_stl10(tmp_path, "train")


def test_label_count_and_range_checked(tmp_path):
    write_stl10(tmp_path)
    y = tmp_path / "stl10_binary" / "train_y.bin"
    y.write_bytes(y.read_bytes()[:-1])
    with pytest.raises(DataError, match="train_y.bin.*labels"):
        read_stl10(tmp_path, "train")
    np.array([0, 1, 2, 3, 4, 11], dtype=np.uint8).tofile(y)
    with pytest.raises(DataError, match="outside 1..10"):
        read_stl10(tmp_path, "train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        read_stl10("nowhere", "validation")


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, root, filename, md5):  # as torchvision does: the folder and a partial archive, then the error
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"partial")
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(DataError, match="downloading STL10.*failed.*network"):
        load_split("stl10", tmp_path / "data", "pretrain", download=True)
    assert not (tmp_path / "data").exists()  # nothing left behind that looks like a data set
    (tmp_path / "mine").mkdir()  # a folder the user made stays, emptied of the partial archive only
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError):
        load_split("stl10", tmp_path / "mine", "pretrain", download=True)
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]

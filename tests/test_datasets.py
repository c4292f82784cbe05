from pathlib import Path
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data_aug.datasets import ImageFiles, TensorImages, load_split, split_validation, subset
from data_aug.errors import DataError


def test_digits_offline():
    train, test = load_split("digits", "unused", "train"), load_split("digits", "unused", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label <= 9
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey as 3 channels
    assert set(test.labels.tolist()) == set(range(10))


def _image_folder(root):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20 + i, 30, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    Image.new("L", (17, 13), 128).save(root / "train" / "cat" / "grey.jpg")
    Image.new("RGBA", (25, 25), (10, 20, 30, 0)).save(root / "train" / "dog" / "alpha.png")
    Image.new("P", (12, 12)).save(root / "test" / "dog" / "palette.gif")
    (root / "unlabeled" / "deep").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "unlabeled" / "deep" / "u.jpg")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_layout_and_modes(tmp_path):
    _image_folder(tmp_path)
    train = load_split("imagefolder", tmp_path, "train")
    pretrain = load_split("imagefolder", tmp_path, "pretrain")
    test = load_split("imagefolder", tmp_path, "test")
    assert train.classes == ["cat", "dog"] and len(train) == 8 and len(pretrain) == 9 and len(test) == 5
    assert (pretrain.labels == -1).sum() == 1
    for dataset in (train, test):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and label in (0, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no train/ folder"):
        load_split("imagefolder", tmp_path, "train")
    _image_folder(tmp_path)
    (tmp_path / "test" / "horse").mkdir()
    with pytest.raises(DataError, match="horse"):
        load_split("imagefolder", tmp_path, "test")


def test_bad_image_named_or_skipped(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "cat" / "text.jpg").write_text("hello")
    good = tmp_path / "train" / "dog" / "0.png"
    Image.open(good).convert("RGB").save(tmp_path / "train" / "dog" / "cut.jpg")
    cut = tmp_path / "train" / "dog" / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"3 of 11 images under .* cannot be decoded, e.g. .*empty.jpg .*skip_bad"):
        load_split("imagefolder", tmp_path, "train")  # up front, not when the bad file's turn comes
    with pytest.warns(UserWarning, match="skipped 3 of 11 images under .* that cannot be decoded"):
        skipped = load_split("imagefolder", tmp_path, "train", skip_bad_images=True)
    assert len(skipped) == 8 and not {"empty.jpg", "text.jpg", "cut.jpg"} & {f.name for f in skipped.files}
    assert torch.equal(skipped.labels, torch.tensor([0] * 4 + [1] * 4))


def test_the_quick_check_finds_cut_files_and_accepts_padded_ones(tmp_path):
    from data_aug.datasets import find_bad_images

    rng = np.random.default_rng(0)
    files = []
    for suffix in (".png", ".jpg", ".bmp"):
        whole, cut, padded = (tmp_path / f"{name}{suffix}" for name in ("whole", "cut", "padded"))
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(whole)
        data = whole.read_bytes()
        cut.write_bytes(data[:-40])
        padded.write_bytes(data + b"\0" * 16)  # some cameras and tools leave bytes after the end
        files += [whole, cut, padded]
    bad = find_bad_images(files)
    assert sorted(p.name for p in bad) == ["cut.bmp", "cut.jpg", "cut.png"] and all(bad.values())
    assert sorted(find_bad_images(files, thorough=True)) == sorted(bad)


def test_a_bad_image_stops_training_before_the_run_dir_exists(tmp_path, capsys):
    import run

    _image_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    run_dir = tmp_path / "run"
    args = ["--config", str(Path(__file__).parent / "data" / "seed_config.yaml"), "fine_tune_from=None",
            "dataset.name=imagefolder", f"dataset.root={tmp_path / 'data'}", "dataset.input_shape=(16,16,3)",
            "batch_size=2", "epochs=1", "device=cpu", f"run_dir={run_dir}"]
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 10 images under") and "broken.png" in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # our fake files have other md5s
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    train = load_split("cifar10", tmp_path, "pretrain")
    assert train.images.shape == (10, 3, 32, 32) and train.labels.tolist()[:2] == [1, 7]
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0].reshape(3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(first))


def test_cifar_missing_is_clear(tmp_path):
    with pytest.raises(DataError, match="download"):
        load_split("cifar10", tmp_path, "train")


def test_validation_split_is_seeded_and_disjoint():
    a_train, a_valid = split_validation(100, 0.1, seed=1)
    b_train, b_valid = split_validation(100, 0.1, seed=1)
    c_train, c_valid = split_validation(100, 0.1, seed=2)
    assert torch.equal(a_valid, b_valid) and not torch.equal(a_valid, c_valid)
    assert len(a_valid) == 10 and len(set(a_train.tolist()) | set(a_valid.tolist())) == 100
    assert len(split_validation(100, 0.0, 0)[1]) == 0


def test_a_subset_keeps_the_kind_of_data_set_and_its_labels(tmp_path):
    """`subset` gathers tensors or file names (no image decoded) and keeps classes and labels in index order."""
    digits = load_split("digits", "", "train")
    part = subset(digits, np.array([5, 0, 7]))
    assert isinstance(part, TensorImages) and part.classes == digits.classes
    assert torch.equal(part.images, digits.images[[5, 0, 7]])
    assert part.labels.tolist() == digits.labels[[5, 0, 7]].tolist()
    _image_folder(tmp_path)
    train = load_split("imagefolder", tmp_path, "train")
    files = subset(train, [7, 1])
    assert isinstance(files, ImageFiles) and files.files == [train.files[7], train.files[1]]
    assert files.labels.tolist() == [int(train.labels[7]), int(train.labels[1])] and files.classes == train.classes


def test_an_image_folder_of_one_size_trains_with_device_views(tmp_path):
    """augment_on: device decodes a same-size image folder once and makes its views in batch."""
    import run
    from data_aug.datasets import decode_all

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    folder = load_split("imagefolder", tmp_path, "pretrain")
    held = decode_all(folder)
    assert held.images.shape == (12, 3, 12, 12) and torch.equal(held.images[3], folder[3][0])
    assert torch.equal(held.labels, folder.labels)
    code = run.main(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), "dataset.name=imagefolder", f"dataset.root={tmp_path}",
                     "dataset.input_shape=8,8,3", "batch_size=4", "epochs=1", "final_eval=false", "model.out_dim=4",
                     "dataset.valid_size=0", f"run_dir={tmp_path / 'run'}", "device=cpu"])
    assert code == 0 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    # Images of several sizes cannot be held as one tensor: one line naming two of them.
    Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(tmp_path / "train" / "b" / "big.png")
    with pytest.raises(DataError, match=r"one size: .* is 12x12, .*big\.png is 16x20.*augment_on: cpu"):
        decode_all(load_split("imagefolder", tmp_path, "pretrain"))

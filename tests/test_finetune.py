"""feature_eval.finetune: the balanced label subset, crop+flip views against torchvision, end-to-end fine-tuning
changing the encoder, the lr chosen without the test set, feature_eval's output format, CLI errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from data_aug.datasets import TensorImages
from data_aug.device_views import sample_crop_boxes
from feature_eval import finetune as finetune_module
from feature_eval.baselines import random_encoder
from feature_eval.classifiers import topk_accuracy
from feature_eval.finetune import (FINETUNE_COLUMNS, FineTuned, Schedule, crop_flip_batches, default_epochs, finetune,
                                   finetune_evaluate, fraction_tag, label_subset, main)
from models.resnet_simclr import create_model
from simclr.checkpoint import save_checkpoint
from simclr.config import config_to_dict, load_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run dir with an untrained (seeded) resnet18 checkpoint configured for digits at 16px."""
    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    config = load_config(None, ["dataset.name=digits", "model.out_dim=8", "epochs=3", "dataset.input_shape=(16,16,3)"])
    torch.manual_seed(3)
    model = create_model("resnet18", 8)
    save_checkpoint(run_dir / "checkpoints" / "last.pt", {"model": model.state_dict(),
                                                          "config": config_to_dict(config), "next_epoch": 3})
    return run_dir


def uneven_labels(seed=0):
    """Ten classes of 60-120 items, shuffled, with some unlabelled (-1) items among them."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(rng.integers(60, 121, 10))] + [np.full(50, -1)])
    return rng.permutation(labels)


# ---------------------------------------------------------------- the label subset

@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5])
def test_label_subset_is_class_balanced_with_the_right_total(fraction):
    labels = uneven_labels()
    labelled = int((labels >= 0).sum())
    subset = label_subset(labels, fraction, seed=0)
    counts = np.bincount(labels[subset], minlength=10)
    assert labels[subset].min() >= 0 and len(np.unique(subset)) == len(subset)
    assert counts.max() - counts.min() <= 1 and counts.min() >= 1
    assert len(subset) == max(10, round(fraction * labelled))


def test_label_subset_is_reproducible_nested_and_seeded():
    labels = uneven_labels()
    small, large = label_subset(labels, 0.01, seed=4), label_subset(labels, 0.1, seed=4)
    np.testing.assert_array_equal(small, label_subset(labels.copy(), 0.01, seed=4))
    assert set(small) <= set(large)  # 1 % of the labels lies inside 10 % for the same seed
    assert set(label_subset(labels, 0.1, seed=5)) != set(large)
    np.testing.assert_array_equal(label_subset(labels, 1.0, seed=4), np.flatnonzero(labels >= 0))


def test_label_subset_takes_all_of_a_small_class_and_refuses_bad_fractions():
    labels = np.array([0] * 100 + [1] * 100 + [2] * 3)
    counts = np.bincount(labels[label_subset(labels, 0.3, seed=0)])
    assert counts[2] == 3 and sorted(counts[:2].tolist()) in ([20, 20], [20, 21])
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            label_subset(labels, bad, seed=0)


def test_schedule_and_names_follow_the_paper():
    assert default_epochs(0.01) == 60 and default_epochs(0.1) == 30 and default_epochs(1.0) == 30
    assert [fraction_tag(f) for f in (0.01, 0.1, 1.0, 0.005)] == ["1pct", "10pct", "100pct", "0.5pct"]


# ---------------------------------------------------------------- views

def test_crop_flip_views_match_torchvision_and_nothing_else_is_applied():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8)
    data = TensorImages(images, torch.arange(5), [str(i) for i in range(5)])
    schedule = Schedule(input_size=12, epochs=1, batch_size=2, seed=7, device="cpu")
    batches = list(crop_flip_batches(data, schedule, epoch=3))
    assert [len(y) for _, y in batches] == [2, 2]  # the last batch of one image is dropped (BatchNorm)
    # The reference: the same random draws, then torchvision's resized crop and flip image by image.
    generator = torch.Generator().manual_seed(finetune_module._batch_seed(7, 3))
    order = torch.randperm(5, generator=generator)
    for start, (views, labels) in zip((0, 2), batches):
        rows = order[start:start + 2]
        flip = torch.rand(2, generator=generator) < 0.5
        boxes = sample_crop_boxes(2, 20, 24, generator)
        assert labels.tolist() == rows.tolist()
        for view, row, box, mirror in zip(views, rows, boxes.int().tolist(), flip):
            expected = TF.resized_crop(images[row].float() / 255, *box, [12, 12], antialias=True)
            expected = TF.horizontal_flip(expected) if mirror else expected
            torch.testing.assert_close(view, expected.clamp(0, 1), atol=2e-5, rtol=0)
    again = list(crop_flip_batches(data, schedule, epoch=3))
    torch.testing.assert_close(again[0][0], batches[0][0])
    other = next(crop_flip_batches(data, schedule, epoch=4))[0]
    assert not torch.equal(other, batches[0][0])


class MixedSizes(torch.utils.data.Dataset):
    """An image folder's shape: items of different sizes, read one by one (no `images` tensor)."""

    def __init__(self, images):
        self.images, self.labels = images, torch.arange(len(images))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


@pytest.mark.parametrize("in_memory", [True, False])
def test_views_keep_colours_no_jitter_grayscale_or_blur(in_memory):
    colours = torch.tensor([[255, 0, 0], [10, 200, 30], [90, 90, 250], [0, 0, 0]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(-1, -1, 16, 16).contiguous()
    data = TensorImages(images, torch.arange(4), list("abcd"))
    if not in_memory:  # one crop path for both: each size of a batch is cropped apart and put back in its place
        data = MixedSizes([colour[:, None, None].expand(-1, size, size + 3) for colour, size in
                           zip(colours, (16, 20, 16, 9))])
    schedule = Schedule(input_size=8, epochs=1, batch_size=4, seed=0, device="cpu")
    for views, labels in crop_flip_batches(data, schedule, epoch=0):
        assert views.shape == (4, 3, 8, 8) and sorted(labels.tolist()) == [0, 1, 2, 3]
        expected = colours[labels].float()[:, :, None, None].expand_as(views) / 255
        torch.testing.assert_close(views, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.08, 0.5])  # the paper's and a --min-crop-scale
def test_images_of_several_sizes_are_cropped_as_torchvision_crops_each(scale):
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((20, 24), (16, 16), (20, 24), (9, 30))]
    schedule = Schedule(input_size=12, epochs=1, batch_size=4, min_crop_scale=scale, seed=5, device="cpu")
    (views, labels), = crop_flip_batches(MixedSizes(images), schedule, epoch=1)
    # The reference: the order, the flips, then the boxes of each size in order of first appearance.
    generator = torch.Generator().manual_seed(finetune_module._batch_seed(5, 1))
    rows = torch.randperm(4, generator=generator).tolist()
    flip = torch.rand(4, generator=generator) < 0.5
    assert labels.tolist() == rows
    for size in dict.fromkeys(images[row].shape[-2:] for row in rows):
        places = [i for i, row in enumerate(rows) if images[row].shape[-2:] == size]
        boxes = sample_crop_boxes(len(places), *size, generator, scale=(scale, 1.0))
        for place, box in zip(places, boxes.int().tolist()):
            expected = TF.resized_crop(images[rows[place]].float() / 255, *box, [12, 12], antialias=True)
            expected = TF.horizontal_flip(expected) if flip[place] else expected
            torch.testing.assert_close(views[place], expected.clamp(0, 1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("hflip", [0.0, 0.5, 1.0])
def test_hflip_is_the_share_of_mirrored_views(hflip):
    ramp = (torch.arange(32, dtype=torch.uint8) * 8).expand(3, 32, 32)  # brighter to the right
    data = TensorImages(ramp.expand(200, -1, -1, -1).contiguous(), torch.zeros(200, dtype=torch.int64), ["a"])
    schedule = Schedule(input_size=16, epochs=1, batch_size=50, hflip=hflip, seed=0, device="cpu")
    views = torch.cat([views for views, _ in crop_flip_batches(data, schedule, epoch=0)])  # (200, 3, 16, 16)
    left, right = views[..., 0].mean(dim=(1, 2)), views[..., -1].mean(dim=(1, 2))
    assert len(views) == 200 and bool((left != right).all())  # every view is either mirrored or not
    share = (left > right).float().mean().item()
    assert share == hflip if hflip in (0.0, 1.0) else 0.4 < share < 0.6
    with pytest.raises(finetune_module.EvalError, match="--batch-size 2 or more"):
        Schedule(input_size=16, epochs=1, batch_size=1)


# ---------------------------------------------------------------- fine-tuning

def test_finetune_changes_the_encoder_end_to_end_and_is_reproducible():
    torch.manual_seed(0)
    data = TensorImages(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"])
    original = random_encoder("resnet18", False, seed=0)
    schedule = Schedule(input_size=16, epochs=2, batch_size=4, seed=1, device="cpu")
    model = finetune(copy.deepcopy(original), data, 2, schedule, base_lr=2.0)
    tuned, before = model.encoder.state_dict(), original.state_dict()
    changed = [k for k in before if not torch.equal(before[k], tuned[k])]
    assert any(k.endswith("conv1.weight") for k in changed) and "backbone.layer4.1.conv2.weight" in changed
    assert any(k.endswith("running_mean") for k in changed)  # BatchNorm trained too: the whole network adapts
    assert "backbone.conv1.weight" in changed  # gradients reached the first layer
    assert not original.training and not any(p.requires_grad for p in original.parameters())  # the copy trained
    torch.manual_seed(1)  # the head as finetune initialised it
    initial_head = FineTuned(original, 2).classifier.weight
    assert not model.training and not torch.equal(model.classifier.weight, initial_head)
    again = finetune(copy.deepcopy(original), data, 2, schedule, base_lr=2.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, msg=key)


def test_lr_is_chosen_on_the_labelled_hold_out_and_test_is_scored_once(digits_run, tmp_path, monkeypatch):
    events = []
    original_extract, original_finetune = finetune_module.extract_features, finetune_module.finetune

    def recording_extract(model, dataset, *args, **kwargs):  # a fine-tuned model's outputs: its logits
        events.append(("predict", kwargs["desc"], len(dataset)))
        return original_extract(model, dataset, *args, **kwargs)

    def recording_finetune(encoder, dataset, *args, **kwargs):
        events.append(("finetune", kwargs["desc"], len(dataset)))
        return original_finetune(encoder, dataset, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "extract_features", recording_extract)
    monkeypatch.setattr(finetune_module, "finetune", recording_finetune)
    result = finetune_evaluate(digits_run, label_fraction=0.02, epochs=1, batch_size=16, lrs=(0.05, 0.4),
                               device="cpu", out_dir=tmp_path / "out", command="test", log=lambda _: None)
    labelled = result.results["splits"]["labelled"]
    assert labelled == 29 and [e[0] for e in events] == ["finetune", "predict"] * 2 + ["finetune", "predict"]
    selection = result.results["selection"]["simclr"]
    fit, valid = selection["fit_items"], selection["valid_items"]
    assert fit + valid == labelled and [e[2] for e in events[:4]] == [fit, valid, fit, valid]
    assert events[4] == ("finetune", "SimCLR: final", labelled) and events[5][1:] == ("test", 360)
    assert set(selection["grid"]) == {"0.05", "0.4"}
    per_class = result.results["label_subset"]["per_class"]
    assert sum(per_class.values()) == 29 and max(per_class.values()) - min(per_class.values()) <= 1
    # The reported numbers are those of the returned model on the test split.
    from data_aug.datasets import load_split

    logits = original_extract(result.models["simclr"], load_split("digits", "data", "test"), 16)
    row = result.results["rows"][0]
    assert [row["top1"], row["top5"]] == pytest.approx(topk_accuracy(logits.features, logits.labels), abs=1e-9)
    assert row["details"]["base_lr"] in (0.05, 0.4) and row["details"]["batch_size"] == 16
    # feature_eval's format (both epoch counts) and JSON row keys, in <out>/<ckpt>_<data>_finetune-<pct>.*
    assert result.paths["json"].name == "last_digits_finetune-2pct.json"
    written = json.loads(result.paths["json"].read_text())
    assert written["rows"][0]["top1"] == row["top1"] and written["checkpoint_sha256"] and written["command"] == "test"
    table = result.paths["markdown"].read_text().split("\n\n")[1].splitlines()
    assert table[0] == "| " + " | ".join(FINETUNE_COLUMNS) + " |"
    cells = dict(zip(FINETUNE_COLUMNS, (cell.strip() for cell in table[2].strip("|").split("|"))))
    assert cells["Pretrain epochs"] == "3" and cells["Fine-tune epochs"] == "1"  # the checkpoint's 3, this run's 1


def test_cli_runs_on_tiny_data_and_one_lr_skips_the_hold_out(digits_run, tmp_path, capsys, monkeypatch):
    out, flips = tmp_path / "out", []
    original = finetune_module.crop_flip_batches
    monkeypatch.setattr(finetune_module, "crop_flip_batches",
                        lambda data, schedule, epoch: flips.append(schedule.hflip) or original(data, schedule, epoch))
    assert main(["--checkpoint", str(digits_run), "--label-fraction", "0.01", "--epochs", "1", "--lrs", "0.1",
                 "--device", "cpu", "--out-dir", str(out), "--baselines", "random", "--hflip", "0"]) == 0
    results = json.loads((out / "last_digits_finetune-1pct.json").read_text())
    assert [r["extractor"] for r in results["rows"]] == ["simclr", "random"]
    assert results["selection"]["simclr"] == {"chosen_by": "only value of --lrs (no hold-out)"}
    assert results["command"].startswith("python -m feature_eval.finetune --checkpoint")
    assert "Fine-tuned end to end (0.974% labels)" in capsys.readouterr().out
    # --hflip 0 reaches every fine-tuning view and is recorded: the JSON, and the caption says what was used
    assert flips == [0.0, 0.0] and results["options"]["hflip"] == 0.0
    assert results["options"]["augmentation"] == "random resized crop (scale 0.08-1) without flips"
    caption = (out / "last_digits_finetune-1pct.md").read_text().split("\n\n")[0]
    assert "views: random resized crop (scale 0.08-1) without flips, base lr" in caption and "horizontal" not in caption
    # one --lrs value: the caption says so instead of claiming a hold-out choice
    assert "base lr 0.1 (one --lrs value: no hold-out)" in caption and "chosen on a hold-out" not in caption


@pytest.mark.parametrize("argv, message", [
    (["--label-fraction", "0"], "must be in (0, 1]"),
    (["--label-fraction", "1.5"], "must be in (0, 1]"),
    (["--label-fraction", "ten"], "is not a number"),
    (["--lrs", "0.1,-1"], "positive numbers"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--valid-fraction", "1"], "--valid-fraction 1: must be in (0, 1)"),
    (["--hflip", "1.5"], "--hflip 1.5: must be in [0, 1]"),
    (["--hflip", "-0.1"], "--hflip -0.1: must be in [0, 1]"),
    (["--batch-size", "1"], "--batch-size 1: must be at least 2"),  # BatchNorm: one image a step trained nothing
    (["--momentum", "1"], "--momentum 1: must be in [0, 1)"),
])
def test_cli_bad_options_exit_2(digits_run, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(digits_run), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "4"], "--input-size 4: must be at least 8 (e.g. 96 for STL10)"),
    (["--batch-size", "0"], "--batch-size 0: must be at least"),
])
def test_both_drivers_check_numbers_with_one_function(argv, message, capsys):
    from feature_eval import evaluate as evaluate_module

    for parse_args in (main, evaluate_module.parse_args):  # finetune's main stops as it parses
        with pytest.raises(SystemExit) as stop:
            parse_args(["--checkpoint", "x", *argv])
        err = capsys.readouterr().err  # one line: the option, its value and bound; no usage
        assert stop.value.code == 2 and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        evaluate_module.parse_args(["--checkpoint", "x", "--num-workers", "-1"])
    assert "--num-workers -1: must be >= 0" in capsys.readouterr().err
    for option in ("--C", "--weighted-knn-temperature"):
        with pytest.raises(SystemExit):
            evaluate_module.parse_args(["--checkpoint", "x", option, "0"])
        assert f"{option} 0: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message, code", [  # docs/EXIT_CODES.md: 1 for a checkpoint, 2 for an option
    (["--checkpoint", "no-such-package"], "no pretrained package 'no-such-package'", 1),
    (["--checkpoint", "/nonexistent/run/last.pt"], "not found", 1),
    (["--dataset", "mnist"], "--dataset mnist", 2),
    (["--baselines", "pca"], "--baselines: unknown pca", 2),
])
def test_cli_user_errors_are_one_line(digits_run, extra, message, code, capsys):
    argv = ["--checkpoint", str(digits_run), "--device", "cpu"]
    assert main(argv + extra) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_diverging_lr_is_skipped_in_the_search_and_reported(monkeypatch):
    torch.manual_seed(0)
    data = TensorImages(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"])
    encoder = random_encoder("resnet18", False, seed=0)
    schedule = Schedule(input_size=16, epochs=1, batch_size=4, momentum=0.9, seed=0, device="cpu")
    with pytest.raises(finetune_module.Diverged, match="non-finite loss.*lower the values of --lrs"):
        finetune(copy.deepcopy(encoder), data, 2, schedule, base_lr=float("inf"))
    chosen, facts = finetune_module.select_lr(encoder, data, 2, (float("inf"), 0.05), schedule, valid_fraction=0.4)
    assert chosen == 0.05 and facts["grid"]["inf"]["diverged"] and facts["grid"]["0.05"]["valid_top1"] is not None
    json.dumps(facts, allow_nan=False)  # the record stays valid JSON
    with pytest.raises(finetune_module.EvalError, match=r"every base lr of --lrs inf,1e\+30 diverged"):
        finetune_module.select_lr(encoder, data, 2, (float("inf"), 1e30), schedule, valid_fraction=0.4)


def test_the_real_share_of_labels_is_reported_when_each_class_needs_one(digits_run, tmp_path):
    # 0.1 % of 1437 digits would be 1 image; every one of the 10 classes gets one, so 10 (0.696 %) are used.
    result = finetune_evaluate(digits_run, label_fraction=0.001, epochs=1, lrs=(0.1,), device="cpu",
                               out_dir=tmp_path, command="test", log=lambda _: None)
    fit = "10 of 1,437 train images (0.696%; --label-fraction 0.001)"
    assert result.results["splits"]["fit"] == fit and result.results["splits"]["labelled"] == 10
    assert result.results["rows"][0]["classifier_name"] == "Fine-tuned end to end (0.696% labels)"
    caption = result.paths["markdown"].read_text().split("\n\n")[0]
    assert f"fit on {fit}" in caption and "0.1%" not in caption
    # the default views, the checkpoint's (the paper's), are said too; the API checks --hflip as the command line does
    assert "views: random resized crop (scale 0.08-1) + horizontal flip (p 0.5), base lr" in caption
    assert result.results["options"]["hflip"] == 0.5
    with pytest.raises(finetune_module.EvalError, match=r"--hflip 2: must be in \[0, 1\]"):
        finetune_evaluate(digits_run, label_fraction=0.1, hflip=2, device="cpu", write=False)


def test_the_flip_follows_the_pretraining_unless_asked_otherwise(tmp_path):
    # A checkpoint pretrained without flips (the quickstart's: a mirrored digit is another symbol): fine-tuning
    # mirrors no view either, for SimCLR and scratch alike; the crops stay the paper's; both options override.
    config = load_config(None, ["dataset.name=digits", "model.out_dim=8", "dataset.input_shape=(16,16,3)",
                                "dataset.hflip=0", "dataset.min_crop_scale=0.3"])
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", {"model": create_model("resnet18", 8).state_dict(),
                                                                   "config": config_to_dict(config), "next_epoch": 1})
    lines = []
    asked = dict(label_fraction=0.01, epochs=1, lrs=(0.1,), device="cpu", write=False, log=lines.append)
    options = finetune_evaluate(tmp_path / "run", **asked).results["options"]
    assert (options["hflip"], options["min_crop_scale"]) == (0, 0.08) and "hflip 0 (as pretrained)" in lines[0]
    assert ", 1 epoch, " in lines[0]  # one epoch, in the singular
    assert options["augmentation"] == "random resized crop (scale 0.08-1) without flips"
    results = finetune_evaluate(tmp_path / "run", **{**asked, "epochs": 2}, hflip=0.5, min_crop_scale=0.3).results
    assert results["options"]["augmentation"] == "random resized crop (scale 0.3-1) + horizontal flip (p 0.5)"
    assert any("hflip 0.5 (--hflip)" in line and ", 2 epochs, " in line for line in lines)
    # from Python, the command recorded is the one that asks for the same (not the interpreter's own arguments)
    assert results["command"] == (f"python -m feature_eval.finetune --checkpoint {tmp_path / 'run'} --device cpu "
                                  "--epochs 2 --lrs 0.1 --hflip 0.5 --min-crop-scale 0.3")
    with pytest.raises(finetune_module.EvalError, match=r"--min-crop-scale 0: must be in \(0, 1\]"):
        finetune_evaluate(tmp_path / "run", min_crop_scale=0, **asked)


def test_cli_checks_the_output_folder_before_fine_tuning_and_names_another_size(digits_run, tmp_path, capsys,
                                                                                monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    argv = ["--checkpoint", str(digits_run), "--label-fraction", "0.01", "--epochs", "1", "--lrs", "0.1",
            "--device", "cpu"]
    original = finetune_module.finetune
    monkeypatch.setattr(finetune_module, "finetune", lambda *a, **k: pytest.fail("fine-tuned before the check"))
    assert main(argv + ["--out-dir", str(blocked / "out")]) == 2
    assert "cannot write results" in capsys.readouterr().err
    monkeypatch.setattr(finetune_module, "finetune", original)
    assert main(argv + ["--out-dir", str(tmp_path / "out"), "--input-size", "24"]) == 0
    assert (tmp_path / "out" / "last_digits_24px_finetune-1pct.json").is_file()


def test_data_is_checked_as_feature_eval_evaluate_checks_it(digits_run, tmp_path, capsys):
    """Both drivers load data through one function: a missing data set names this command's option, and a train
    split of one class is refused before any fine-tuning."""
    argv = ["--checkpoint", str(digits_run), "--device", "cpu", "--label-fraction", "1.0", "--epochs", "1"]
    assert main(argv + ["--dataset", "stl10", "--root", str(tmp_path / "no")]) == 1  # data: a runtime error
    err = capsys.readouterr().err
    assert "pass --download" in err and "dataset.download" not in err and err.count("\n") == 1
    from tests.test_feature_eval import write_image_folder

    write_image_folder(tmp_path / "one", {"train": {"a": 4}, "test": {"a": 2}})
    assert main(argv + ["--dataset", "imagefolder", "--root", str(tmp_path / "one")]) == 1
    assert "at least two classes" in capsys.readouterr().err

"""Pictures a run writes (views.png, curves.png, the TensorBoard image) and `python -m simclr.preview`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import run
from data_aug.view_grid import draw_view_grid, pick_images, sample_views
from data_aug.views import ViewSettings
from simclr import preview
from simclr.run_plots import write_curves
from simclr.trainer import epoch_summary
from tests.conftest import SEED_CONFIG, tiny_args


def assert_picture(path, min_size=(300, 200)):
    """A PNG of at least `min_size` pixels that is not blank: many colours, spread out."""
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] >= min_size[0] and picture.shape[0] >= min_size[1], picture.shape
    assert picture.std() > 20 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    return picture


def images(count=5, size=24):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_sample_views_follow_the_settings_and_leave_the_global_stream_alone(augment_on):
    chosen = pick_images(list(zip(images(), range(5))), 3, seed=0)  # (image, label) items, as data sets give
    assert len(chosen) == 3 and chosen[0].dtype == torch.uint8
    settings = ViewSettings(16, s=1.0, blur=True, min_crop_scale=0.2)
    before = torch.get_rng_state()
    strong = sample_views(chosen, 4, settings, augment_on=augment_on, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # training's random stream is untouched
    assert strong.shape == (3, 4, 3, 16, 16) and 0 <= strong.min() and strong.max() <= 1
    assert torch.equal(strong, sample_views(chosen, 4, settings, augment_on=augment_on, seed=3))  # seeded
    weak = ViewSettings(16, s=0.0, blur=True, min_crop_scale=0.2)
    assert not torch.equal(strong, sample_views(chosen, 4, weak, augment_on=augment_on, seed=3))  # dataset.s shows
    assert not torch.equal(strong[:, 0], strong[:, 1])  # the views of one image differ


def test_view_grid_picture_is_drawn(tmp_path):
    chosen = list(images(2, 40))
    views = sample_views(chosen, 3, ViewSettings(20, s=1.0, blur=False, min_crop_scale=0.08), augment_on="cpu", seed=0)
    picture = draw_view_grid(chosen, views, "a title long enough to wrap onto a second line " * 3)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    Image.fromarray(picture).save(tmp_path / "grid.png")
    assert_picture(tmp_path / "grid.png", (300, 200))


def test_run_writes_views_curves_and_the_tensorboard_image(straight_run):
    views = assert_picture(straight_run / "views.png", (600, 700))
    assert views.shape[0] > views.shape[1]  # 8 rows of image + 6 views
    assert_picture(straight_run / "curves.png", (1000, 300))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run), size_guidance={"images": 0}).Reload()
    assert "views" in events.Tags()["images"]
    image = events.Images("views")[0]
    assert (image.width, image.height) == (views.shape[1], views.shape[0]) and image.step == 0


def test_preview_draws_the_runs_own_picture(straight_run, data_root, tmp_path, capsys, one_thread):
    out = tmp_path / "preview.png"
    args = ["--config", str(SEED_CONFIG), "--out", str(out)] + tiny_args(data_root, straight_run)[2:]
    assert preview.main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == (straight_run / "views.png").read_bytes()
    assert preview.main(args + ["dataset.s=0.2"]) == 0
    assert out.read_bytes() != (straight_run / "views.png").read_bytes()


def test_device_views_run_and_preview_agree(data_root, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "device"
    args = tiny_args(data_root, run_dir, "epochs=1", "dataset.augment_on=device", "dataset.valid_size=0")
    assert run.main(args) == 0
    out = tmp_path / "preview.png"
    assert preview.main(["--out", str(out), *args]) == 0
    assert out.read_bytes() == (run_dir / "views.png").read_bytes()
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("epoch 1/1:"))
    assert line.endswith(" s)") and "seconds" not in line  # the time rounded, as people read it


def test_preview_errors_are_one_line(tmp_path, capsys, one_thread):
    assert preview.main(["--config", str(SEED_CONFIG), "batch_sise=4"]) == 2
    assert capsys.readouterr().err.startswith("config error: ")
    assert preview.main(["--config", str(SEED_CONFIG), "dataset.name=digits", "--out",
                         str(tmp_path / "missing" / "v.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1


def test_epoch_summary_rounds_what_people_read():
    line = epoch_summary({"kind": "epoch", "epoch": 0, "train_loss": 4.123456, "valid_loss": 3.98766,
                          "valid_top1": 12.3456, "valid_top5": 40.0, "seconds": 125.7883,
                          "ended": "2026-12-05T05:30:00.123+00:00"})  # the wall clock: for programs, not the line
    assert line == "train_loss 4.1235, valid_loss 3.9877, valid_top1 12.3%, valid_top5 40.0% (125.8 s)"


def test_curves_from_metrics(tmp_path):
    records = [{"kind": "step", "epoch": e, "step": s, "global_step": 5 * e + s + 1, "loss": 5 - 0.1 * (5 * e + s),
                "top1": 10.0 * e + s, "lr": 1e-3 * (1 - 0.1 * (5 * e + s))} for e in range(2) for s in range(5)]
    records.insert(5, {"kind": "epoch", "epoch": 0, "train_loss": 4.8, "valid_loss": 4.7, "valid_top1": 9.0})
    lines = [json.dumps(r) for r in records] + ['{"kind": "step", "glo']  # a half-written last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    path = write_curves(tmp_path, total_epochs=3)
    assert path == tmp_path / "curves.png"
    assert_picture(path, (1000, 300))


def test_device_views_of_images_of_several_sizes_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="one size"):
        sample_views([images(1, 20)[0], images(1, 24)[0]], 2, ViewSettings(16, s=1.0, blur=False, min_crop_scale=0.5),
                     augment_on="device", seed=0)
    for split, size in (("train/a", 20), ("train/b", 24), ("test/a", 20)):
        (tmp_path / split).mkdir(parents=True)
        Image.new("RGB", (size, size), "red").save(tmp_path / split / "0.png")
    code = preview.main(["--config", str(SEED_CONFIG), "dataset.name=imagefolder", f"dataset.root={tmp_path}",
                         "dataset.augment_on=device", "dataset.valid_size=0", "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: dataset.augment_on = 'device' needs images of one size")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "v.png").exists()


def test_preview_by_default_writes_under_runs_so_the_checkout_stays_clean(data_root, tmp_path, monkeypatch, capsys,
                                                                        one_thread):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(SEED_CONFIG)] + tiny_args(data_root, tmp_path / "unused")[2:]
    assert preview.main(args) == 0
    assert capsys.readouterr().out.strip() == "runs/preview.png"
    assert (tmp_path / "runs" / "preview.png").stat().st_size > 0 and not (tmp_path / "views.png").exists()


def test_run_takes_config_before_or_after_the_overrides():
    before = run.parse_args(["--config", "a.yaml", "epochs=2", "seed=1"])
    after = run.parse_args(["epochs=2", "--config", "a.yaml", "seed=1"])
    assert vars(before) == vars(after) == {"config": "a.yaml", "overrides": ["epochs=2", "seed=1"]}

"""The trainer's kNN monitor (simclr/monitor.py): its number, its data, and what it must never change."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
import simclr.monitor as monitor_module
from data_aug.datasets import load_split
from models.resnet_simclr import create_model
from simclr.config import ConfigError, load_config
from simclr.monitor import KnnMonitor, MonitorUnavailable, monitor_sample
from tests.conftest import assert_same_weights, final_weights, tiny_args
from tests.fault_runner import on_nth, signal_self


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def knn_values(run_dir: Path) -> list[tuple]:
    """(kind, epoch, knn_top1) of every record that holds a kNN value, in file order."""
    return [(r["kind"], r["epoch"], r["knn_top1"]) for r in records(run_dir) if "knn_top1" in r]


@pytest.fixture(scope="module")
def digits_monitor():
    torch.manual_seed(0)
    model = create_model("resnet18", 8)
    monitor = KnnMonitor.from_dataset(load_split("digits", "data", "train"), 32, max_images=120, seed=3)
    return model.encoder, monitor


def test_the_sample_is_seeded_capped_and_80_20(one_thread):
    labels = torch.tensor([0, 1] * 50 + [-1] * 10)
    fit, scored = monitor_sample(labels, 60, seed=1)
    again = monitor_sample(labels, 60, seed=1)
    assert torch.equal(fit, again[0]) and torch.equal(scored, again[1])
    assert (len(fit), len(scored)) == (48, 12) and not set(fit.tolist()) & set(scored.tolist())
    assert (labels[torch.cat([fit, scored])] >= 0).all()  # unlabelled items are never chosen
    assert not torch.equal(scored, monitor_sample(labels, 60, seed=2)[1])
    with pytest.raises(MonitorUnavailable, match="one class"):
        monitor_sample(torch.zeros(20, dtype=torch.int64), 60, 0)
    with pytest.raises(MonitorUnavailable, match="3 labelled"):
        monitor_sample(torch.tensor([0, 1, 0, -1]), 60, 0)


def test_the_number_is_a_brute_force_weighted_knn_on_the_evaluations_features(digits_monitor, one_thread):
    """Features equal feature_eval's extraction (the evaluation view) of the same images; the top-1 equals
    scikit-learn's KNN with weights exp(cosine / T) on them."""
    from sklearn.neighbors import KNeighborsClassifier
    from torch.utils.data import Subset

    from feature_eval.features import extract_features

    encoder, monitor = digits_monitor
    data = load_split("digits", "data", "train")
    fit, scored = monitor_sample(data.labels, 120, seed=3)
    features = monitor.features(encoder)
    reference = extract_features(encoder, Subset(data, torch.cat([fit, scored]).tolist()), 32, device="cpu")
    torch.testing.assert_close(features, reference.features, rtol=1e-4, atol=1e-4)
    assert torch.equal(monitor.labels, reference.labels)

    x, y, n = features.numpy(), monitor.labels.numpy(), len(fit)
    sk = KNeighborsClassifier(n_neighbors=200 if n >= 200 else n, metric="cosine",
                              weights=lambda d: np.exp((1 - d) / 0.1)).fit(x[:n], y[:n])
    expected = 100 * float((sk.predict(x[n:]) == y[n:]).mean())
    assert monitor.measure(encoder) == pytest.approx(expected, abs=1e-9)


def test_measuring_leaves_the_model_and_every_random_stream_as_it_was(digits_monitor, one_thread):
    import random

    encoder, monitor = digits_monitor
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    monitor.measure(encoder)
    assert encoder.training  # put back in train mode
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # BatchNorm stats untouched
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_config_keys_are_checked():
    assert load_config(None).knn_monitor.every_n_epochs is None  # follows eval_every_n_epochs
    for override, key in (("knn_monitor.max_images=5", "knn_monitor.max_images"),
                          ("knn_monitor.every_n_epochs=0", "knn_monitor.every_n_epochs"),
                          ("knn_monitor.temperature=0", "knn_monitor.temperature"),
                          ("knn_monitor.k=0", "knn_monitor.k")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


@pytest.fixture(scope="module")
def monitor_off_run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "off"
    assert run.main(tiny_args(data_root, run_dir, "epochs=3", "knn_monitor.enabled=false")) == 0
    return run_dir


@pytest.mark.slow
def test_training_is_the_same_with_the_monitor_on_or_off(data_root, monitor_off_run, tmp_path, monkeypatch):
    """The monitor draws no random number and changes no weight or BatchNorm statistic: the same weights, losses
    and random state. It reads the labelled train split, never test; every 2 epochs and at the last."""
    splits = []
    real = monitor_module.load_split
    monkeypatch.setattr(monitor_module, "load_split", lambda name, root, split, **kw: splits.append(split) or
                        real(name, root, split, **kw))
    run_dir = tmp_path / "on"
    assert run.main(tiny_args(data_root, run_dir, "epochs=3", "knn_monitor.every_n_epochs=2")) == 0
    assert splits == ["train"]
    on, off = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True), \
        torch.load(monitor_off_run / "checkpoints" / "last.pt", weights_only=True)
    assert_same_weights(on["model"], off["model"], atol=0)
    assert torch.equal(on["rng_cpu"], off["rng_cpu"])
    losses = [[r.get("train_loss", r.get("loss")) for r in records(d) if r["kind"] != "knn_reference"]
              for d in (run_dir, monitor_off_run)]
    assert losses[0] == losses[1]
    assert [(kind, epoch) for kind, epoch, _ in knn_values(run_dir)] == [("knn_reference", 0), ("epoch", 1),
                                                                           ("epoch", 2)]
    assert knn_values(monitor_off_run) == []


@pytest.mark.slow
def test_the_reference_comes_from_the_untrained_weights(straight_run, data_root, one_thread):
    config = load_config(None, ["dataset.name=stl10", f"dataset.root={data_root}", "dataset.input_shape=(32,32,3)"])
    torch.manual_seed(0)  # the trainer's seed, then the model: the weights of the run before its first step
    model = create_model("resnet18", 8)
    monitor = monitor_module.load_monitor("stl10", data_root, False, 32, 5000, config.seed)
    reference = [value for kind, _, value in knn_values(straight_run) if kind == "knn_reference"]
    assert reference == [monitor.measure(model.encoder)]
    trained = create_model("resnet18", 8)
    trained.load_state_dict(final_weights(straight_run))
    assert knn_values(straight_run)[-1][2] == monitor.measure(trained.encoder)  # the last epoch's: its weights


@pytest.mark.slow
def test_a_resume_keeps_one_reference_and_every_epoch_once(data_root, straight_run, tmp_path):
    run_dir = tmp_path / "resumed"

    def crash():
        raise KeyboardInterrupt

    # killed in epoch 1 before any checkpoint: the restart is a fresh start, whose reference replaces the first
    assert run.main(tiny_args(data_root, run_dir), on_event=on_nth("step", 2, crash)) == 130
    assert [kind for kind, _, _ in knn_values(run_dir)] == ["knn_reference"]
    assert run.main(tiny_args(data_root, run_dir, "resume=auto"), on_event=on_nth("step", 4, crash)) == 130
    assert run.main([f"resume={run_dir}"]) == 0  # resumed after epoch 1: the reference is kept, not measured again
    assert knn_values(run_dir) == knn_values(straight_run)
    assert [(r["kind"], r.get("global_step"), r["epoch"]) for r in records(run_dir)] == \
        [(r["kind"], r.get("global_step"), r["epoch"]) for r in records(straight_run)]


@pytest.mark.slow
def test_a_signal_during_the_monitor_stops_at_the_epoch_boundary(data_root, straight_run, tmp_path, capsys):
    run_dir = tmp_path / "stopped"
    # the first "monitor" event is the reference before training, the second the measurement after epoch 1
    code = run.main(tiny_args(data_root, run_dir), on_event=on_nth("monitor", 2, signal_self(signal.SIGTERM)))
    assert code != 1 and code != 130
    assert "stopped by SIGTERM after epoch 1; checkpoint saved" in capsys.readouterr().out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 1 and state["step_in_epoch"] == 0
    assert run.main([f"resume={run_dir}"]) == 0
    assert_same_weights(final_weights(run_dir), final_weights(straight_run))
    assert knn_values(run_dir) == knn_values(straight_run)


@pytest.mark.slow
def test_a_data_set_of_one_class_says_so_in_one_line_and_trains_on(tmp_path, capsys):
    for i in range(12):
        (tmp_path / "data" / "train" / "only").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "train" / "only" / f"{i}.png")
    args = tiny_args(tmp_path, tmp_path / "run", "dataset.name=imagefolder", f"dataset.root={tmp_path / 'data'}",
                     "epochs=1", "dataset.input_shape=(16,16,3)")
    assert run.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "kNN monitor" in line]
    assert lines == ["kNN monitor off: the train split's labelled images are all of one class (it needs labels of "
                     "two classes or more); training goes on"]
    assert knn_values(tmp_path / "run") == []

"""Validation compares with training: batches of the training size where the hold-out has them, else the loss
scaled to the training batch's negatives; what the numbers are measured among is said in curves.png's legend
and in TensorBoard's text `validation` (digits, 72 held-out images)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from simclr.config import load_config
from simclr.dist import DistInfo
from simclr.run_plots import validation_labels
from simclr.trainer import Trainer, describe_validation

pytestmark = pytest.mark.usefixtures("one_thread")


class SameProjection(nn.Module):
    """Every image gets the same projection: NT-Xent is then log(candidates), whatever the batch holds."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.scale * torch.ones(x.shape[0], 4)  # (B, 4)
        return z, z


def _trainer(tmp_path, batch_size: int) -> Trainer:
    config = load_config(None, ["dataset.name=digits", "dataset.input_shape=(16,16,3)", "dataset.augment_on=device",
                                f"batch_size={batch_size}", "model.out_dim=8", "device=cpu",
                                f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
    assert trainer.valid_batches.num_images == 72  # 5 % of digits' 1,437 training images
    trainer.train_model = SameProjection()
    return trainer


def test_a_hold_out_smaller_than_a_batch_reads_as_the_training_loss_of_equal_views(tmp_path):
    trainer = _trainer(tmp_path, batch_size=128)
    assert trainer.validation_batch() == 72
    x1, x2 = next(iter(trainer.train_batches.batches(0)))
    train_loss, _ = trainer.train_step(x1, x2)
    rng = torch.get_rng_state()
    valid = trainer.validate()
    assert torch.equal(rng, torch.get_rng_state())  # validation draws nothing from the training's stream
    assert train_loss.item() == pytest.approx(math.log(255), rel=1e-6)
    assert valid["valid_loss"] == pytest.approx(train_loss.item(), rel=1e-6)  # unscaled it was log(143)


def test_a_hold_out_of_a_batch_or_more_validates_in_training_sized_batches(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, batch_size=32)
    sizes = []
    original = trainer.criterion.loss_and_accuracy

    def spy(z_i, z_j, topk=(1, 5), negatives=None):
        sizes.append((z_i.shape[0], negatives))
        return original(z_i, z_j, topk, negatives)

    monkeypatch.setattr(trainer.criterion, "loss_and_accuracy", spy)
    valid = trainer.validate()
    assert trainer.validation_batch() == 32 and sizes == [(32, 62), (32, 62)]  # 72 images: 2 whole batches
    assert valid["valid_loss"] == pytest.approx(math.log(63), rel=1e-6)


def test_the_labels_say_what_validation_is_measured_among(tmp_path):
    assert validation_labels(72, 128) == {"valid_loss": "validation: 72 images, scaled to batch 128",
                                          "valid_top1": "validation: among 143 candidates (train: 255)"}
    assert set(validation_labels(512, 512).values()) == {"validation (batches of 512, as training)"}
    assert "scaled to the training batch's 254 negatives" in describe_validation(72, 72, 128)
    assert "143 candidates" in describe_validation(72, 72, 128)
    assert "scaled" not in describe_validation(5250, 512, 512)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, batch_size=128)
    with trainer._open_writer():  # what a run's start writes: config, views.png and the text
        pass
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("validation/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == describe_validation(72, 72, 128)

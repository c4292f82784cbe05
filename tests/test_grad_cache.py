"""Gradient caching gives the full-batch NT-Xent gradient while running the model on chunks."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from loss.nt_xent import NTXentLoss
from simclr.grad_cache import grad_cache_backward


class TinySimCLR(nn.Module):
    """A small conv encoder with BatchNorm and an MLP head; `forward(x)` returns `(h, z)` like ResNetSimCLR."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


class _NoScale:
    """A GradScaler stand-in that leaves the loss as it is."""

    def scale(self, loss):
        return loss


def _views(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 8, 8, generator=g)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _full_batch(model, criterion, x1, x2):
    """The trainer's plain step: both views in one forward, loss, backward."""
    _, z = model(torch.cat([x1, x2]))
    loss, acc = criterion.loss_and_accuracy(z[:len(x1)], z[len(x1):])
    loss.backward()
    return loss.detach(), acc


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunks", [1, 2, 3, 12])
def test_gradients_equal_full_batch_with_batchnorm_in_eval(chunks):
    torch.manual_seed(0)
    model, criterion = TinySimCLR(), NTXentLoss(temperature=0.2)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm does something
        model.encoder[1].running_mean.uniform_(-0.5, 0.5)
        model.encoder[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x1, x2 = _views(12)
    ref_loss, ref_acc = _full_batch(model, criterion, x1, x2)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    loss, acc = grad_cache_backward(model, criterion, x1, x2, chunks, contextlib.nullcontext, _NoScale())
    torch.testing.assert_close(loss, ref_loss)
    assert not loss.requires_grad
    assert acc.keys() == ref_acc.keys() and all(torch.equal(acc[k], ref_acc[k]) for k in acc)
    _assert_grads_close(_grads(model), ref)


def test_train_mode_batchnorm_uses_per_chunk_statistics_and_updates_once_per_chunk():
    torch.manual_seed(0)
    model, criterion = TinySimCLR(), NTXentLoss(temperature=0.5)
    reference = TinySimCLR()
    reference.load_state_dict(model.state_dict())
    model.train(), reference.train()
    x1, x2 = _views(8)
    # Reference: each chunk [x1_i; x2_i] through the model with a graph, the loss on all z at once.
    zs = [reference(torch.cat([a, b]))[1] for a, b in zip(x1.chunk(2), x2.chunk(2))]
    z1 = torch.cat([z[:4] for z in zs])
    z2 = torch.cat([z[4:] for z in zs])
    ref_loss = criterion(z1, z2)
    ref_loss.backward()

    loss, _ = grad_cache_backward(model, criterion, x1, x2, 2, contextlib.nullcontext, _NoScale())
    torch.testing.assert_close(loss, ref_loss.detach())
    _assert_grads_close(_grads(model), _grads(reference))
    # The no-graph pass must not move BatchNorm's running statistics: two updates, not four.
    bn, ref_bn = model.encoder[1], reference.encoder[1]
    assert int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    # ...and per-chunk statistics really differ from the full batch's (so the documentation matters).
    full = TinySimCLR()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        full.train()
        z_full = full(torch.cat([x1, x2]))[1]
    assert not torch.allclose(z_full[:4], z1[:4].detach(), atol=1e-4)


def test_dropout_masks_are_replayed_and_rng_is_left_as_after_one_pass():
    model, criterion = TinySimCLR(dropout=0.5), NTXentLoss(temperature=0.5)
    model.eval()
    model.head[0].train()  # dropout on, BatchNorm frozen: only the RNG can make the passes differ
    x1, x2 = _views(6)
    torch.manual_seed(1)
    zs = [model(torch.cat([a, b]))[1] for a, b in zip(x1.chunk(3), x2.chunk(3))]
    ref_loss = criterion(torch.cat([z[:2] for z in zs]), torch.cat([z[2:] for z in zs]))
    ref_loss.backward()
    ref, after_reference = _grads(model), torch.rand(3)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    loss, _ = grad_cache_backward(model, criterion, x1, x2, 3, contextlib.nullcontext, _NoScale())
    torch.testing.assert_close(loss, ref_loss.detach())
    _assert_grads_close(_grads(model), ref)
    torch.testing.assert_close(torch.rand(3), after_reference)


def test_gradients_are_those_of_the_scaled_loss():
    torch.manual_seed(0)
    model, criterion = TinySimCLR(), NTXentLoss(temperature=0.5)
    model.eval()
    x1, x2 = _views(8)
    _full_batch(model, criterion, x1, x2)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss, _ = grad_cache_backward(model, criterion, x1, x2, 4, contextlib.nullcontext, scaler)
    _assert_grads_close(_grads(model), {k: 1024.0 * v for k, v in ref.items()}, atol=1e-3)
    assert loss.item() < 100  # the returned loss is not scaled


def test_bfloat16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    model, criterion = TinySimCLR(), NTXentLoss(temperature=0.5)
    model.eval()
    x1, x2 = _views(8)
    _full_batch(model, criterion, x1, x2)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, _ = grad_cache_backward(model, criterion, x1, x2, 2,
                                  lambda: torch.autocast("cpu", dtype=torch.bfloat16), _NoScale())
    assert torch.isfinite(loss)
    for name, g in _grads(model).items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref[name], rtol=0.1, atol=0.02)


def test_too_many_chunks_is_an_error():
    x1, x2 = _views(4)
    with pytest.raises(ValueError, match="chunks"):
        grad_cache_backward(TinySimCLR(), NTXentLoss(), x1, x2, 5, contextlib.nullcontext, _NoScale())


def test_trainer_step_with_chunks_equals_the_plain_step(tmp_path, one_thread):
    """The trainer's wiring: grad_cache_chunks=2 and =1 give the same weights after one SGD step
    (BatchNorm in eval mode, where the two are exactly equal)."""
    from simclr.config import load_config
    from simclr.dist import DistInfo
    from simclr.trainer import Trainer
    from tests.conftest import write_stl10

    write_stl10(tmp_path)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    before, after = [], []
    for chunks in (1, 2):
        config = load_config(None, [f"dataset.root={tmp_path}", "dataset.name=stl10", "dataset.download=false",
                                    "dataset.input_shape=(32,32,3)", "batch_size=4", "model.out_dim=8",
                                    "optimizer.name=sgd", "optimizer.lr=0.5", "device=cpu", "epochs=1",
                                    f"run_dir={tmp_path / f'run{chunks}'}", f"grad_cache_chunks={chunks}"])
        trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
        trainer.train_model.eval()
        before.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        loss, acc = trainer.train_step(x1, x2)
        assert torch.isfinite(loss) and "top1" in acc
        after.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    _assert_grads_close(before[1], before[0], rtol=0, atol=0)  # same start
    assert any(not torch.allclose(after[0][k], before[0][k]) for k in after[0])  # the step moved the weights
    _assert_grads_close(after[1], after[0], rtol=1e-4, atol=1e-6)

"""LARS against its formula, weight-decay exclusions, learning-rate scaling and the per-step schedule."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from simclr.optim import LARS, create_optimizer, create_scheduler, match_state_layout, scaled_lr, warmup_cosine


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, bias=False))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    return ((model(x) - y) ** 2).mean()


def test_lars_matches_the_papers_update_written_out():
    """Three steps with a changing learning rate, against the update of the paper's lars_optimizer.py."""
    model = _tiny_model()
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    velocity = {name: torch.zeros_like(p) for name, p in reference.items()}
    lr0, weight_decay, momentum, eta = 0.5, 1e-2, 0.9, 0.001
    optimizer = create_optimizer(model, "lars", lr0, weight_decay, momentum)
    assert isinstance(optimizer, LARS)
    for step, lr in enumerate([0.5, 0.2, 0.05]):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        _loss(model, step).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        for name, w in reference.items():
            g = grads[name].double()
            w64 = w.double()
            excluded = name.endswith("bias") or name.startswith("1.")  # biases and BatchNorm
            trust = 1.0
            if not excluded:
                g = g + weight_decay * w64
                w_norm, g_norm = w64.norm().item(), g.norm().item()
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            velocity[name] = momentum * velocity[name].double() + lr * trust * g
            reference[name] = (w64 - velocity[name]).float()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), reference[name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"step {step}, {name}: {m}")


def test_lars_trust_ratio_changes_the_step_and_zero_weights_fall_back_to_one():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    zero = nn.Parameter(torch.zeros(2))
    opt = LARS([{"params": [w]}, {"params": [zero]}], lr=1.0, momentum=0.9, trust_coefficient=0.001)
    w.grad, zero.grad = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 1.0])  # ||g|| = 10
    opt.step()
    # trust = 0.001 * 5 / 10: the step is 5e-4 * g, far from the plain SGD step g.
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.005]))
    torch.testing.assert_close(zero.detach(), torch.tensor([-1.0, -1.0]))


def test_lars_excludes_batchnorm_and_biases_from_decay_and_adaptation():
    model = _tiny_model()
    optimizer = create_optimizer(model, "lars", 1.0, 1e-6, 0.9)
    adapted, excluded = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in adapted["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in excluded["params"]) == ["0.bias", "1.bias", "1.weight"]
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0
    assert not adapted["lars_exclude"] and adapted["weight_decay"] == 1e-6
    assert adapted["momentum"] == 0.9 and adapted["trust_coefficient"] == 0.001


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_sgd_and_adam_do_not_decay_batchnorm_or_biases(name, cls):
    model = _tiny_model()
    optimizer = create_optimizer(model, name, 0.1, 1e-4, 0.9)
    assert isinstance(optimizer, cls)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    if name == "sgd":
        assert decay["momentum"] == 0.9


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="adam, sgd or lars"):
        create_optimizer(_tiny_model(), "rmsprop", 0.1, 0.0)


def test_learning_rate_scaling_rules_match_the_paper():
    # Appendix B.1: 0.3 x B/256 (linear) and 0.075 x sqrt(B) (square root) meet at B = 4096.
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.3, 256, "linear") == pytest.approx(0.3)
    assert scaled_lr(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scaled_lr(3e-4, 8192, "none") == 3e-4


def test_schedule_warms_up_linearly_then_decays_by_cosine_every_step():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    total, warmup = 20, 5
    scheduler = create_scheduler(optimizer, total, warmup, cosine=True)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.0 * (s + 1) / warmup for s in range(warmup)]
    expected += [2.0 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)]
    assert seen == pytest.approx(expected)
    assert seen[warmup - 1] == pytest.approx(2.0) and max(seen) == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(seen[warmup:], seen[warmup + 1:]))  # decays monotonically
    assert warmup_cosine(total, total, warmup) == pytest.approx(0.0)


def test_schedule_without_warmup_or_cosine():
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5)
    assert [warmup_cosine(s, 10, 2, cosine=False) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_restored_adam_state_takes_the_parameters_layout():
    """A contiguous checkpoint restored into a channels_last model steps as it would in the contiguous one."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))

    def step(net, optimizer):
        torch.manual_seed(1)
        net(torch.randn(2, 3, 6, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    saved = model()
    adam = torch.optim.Adam(saved.parameters(), lr=0.1)
    step(saved, adam)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net = model().to(memory_format=layout)
        net.load_state_dict(saved.state_dict())
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)  # fused: what CUDA runs
        optimizer.load_state_dict(copy.deepcopy(adam.state_dict()))  # as torch.load gives it: not shared
        match_state_layout(optimizer)
        for p in net.parameters():
            assert all(v.stride() == p.stride() for v in optimizer.state[p].values() if v.shape == p.shape)
        step(net, optimizer)
        results.append([p.detach().clone() for p in net.parameters()])
    for contiguous, channels_last in zip(*results):
        torch.testing.assert_close(channels_last, contiguous, atol=1e-6, rtol=1e-5)

"""Optimisers (Adam, SGD, LARS), learning-rate scaling, and the per-step warmup + cosine schedule."""
from __future__ import annotations

import math

import torch


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """The paper's rules (Appendix B.1): `linear` = base x B/256, `sqrt` = base x sqrt(B), `none` = base."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    return base_lr


def _split_decay(model: torch.nn.Module) -> tuple[list, list]:
    """Weights of convolutions and linear layers decay; BatchNorm parameters and biases do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return decay, no_decay


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it (Section 2.2, the paper's `lars_optimizer.py`).

    For each weight tensor `w` with gradient `g`, with `classic momentum` (the learning rate inside the
    momentum buffer, so a schedule changes the step at once, as in the paper's code):

        g <- g + weight_decay * w
        trust = trust_coefficient * ||w|| / ||g||     (1 if either norm is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v

    Parameter groups with `lars_exclude=True` (BatchNorm parameters and biases) get neither the weight
    decay nor the trust ratio: `v <- momentum * v + lr * g`.

    Args:
        params: parameters or parameter groups (a group may set `lars_exclude`, `weight_decay`, ...).
        lr: learning rate (paper: 0.3 x B/256 for batch B).
        momentum: paper 0.9.
        weight_decay: paper 1e-6.
        trust_coefficient: eta, paper 0.001.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                scale = torch.ones((), device=p.device)
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # Stays on the device: no host sync per tensor.
                    scale = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, scale)
                step = update * (scale * group["lr"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = step.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(step)
                p.sub_(state["momentum_buffer"])
        return loss


def create_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                     momentum: float = 0.9) -> torch.optim.Optimizer:
    """Adam (the config's default: it trains at the small batches one GPU holds), SGD with momentum, or LARS (the
    paper's, for batches of thousands), with decay excluded from BatchNorm and biases."""
    decay, no_decay = _split_decay(model)
    if name == "lars":
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adam":
        # fused: one kernel per step, and GradScaler then needs no host sync per step to check for overflow
        return torch.optim.Adam(groups, lr=lr, fused=next(model.parameters()).is_cuda)
    raise ValueError(f"unknown optimizer {name!r}: use adam, sgd or lars")


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor shaped like its parameter the parameter's memory layout, in place.

    `load_state_dict` keeps the saved layout, so a checkpoint from a contiguous model (a CPU run) restored
    into a channels_last one (CUDA) would leave Adam's moments with other strides than their parameters:
    fused Adam then stops with an error on CUDA and pairs the wrong elements on the CPU.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, cosine: bool = True) -> float:
    """Learning-rate multiplier at `step`: linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                     cosine: bool = True) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimiser step (not per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, cosine))

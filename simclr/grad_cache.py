"""Gradient caching: the exact NT-Xent gradient of a large batch, running the encoder on chunks of it.

The technique of Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(2021). The contrastive loss couples every image of the batch, so the batch cannot simply be split into
accumulation steps; but the loss itself is cheap, and only the encoder's activations are large. So:

1. embed every chunk with no graph, keeping only `z` (`[2n, D]`, a few MB even at n = 8192);
2. compute the loss on the whole batch of cached `z` (under torchrun, with the negatives of every
   rank) and its gradient `d loss / d z`;
3. run each chunk again, with a graph, and backpropagate its slice of `d loss / d z`.

By the chain rule the parameter gradients summed over chunks are those of the full batch, as long as
a chunk's `z` does not depend on the other chunks. Activation memory is that of one chunk; the price is
one extra forward pass of the encoder per step (about a third more compute than forward + backward).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper of `model` (under torch.compile's `_orig_mod`), if any."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_backward(model: nn.Module, criterion, x1: torch.Tensor, x2: torch.Tensor, chunks: int,
                        autocast, scaler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backpropagate the full-batch NT-Xent into `model`'s `.grad`, running `model` on 1/`chunks` of the batch.

    Chunk i holds the i-th slice of `x1` and the i-th slice of `x2`, run in one forward like the
    trainer's `model(torch.cat([x1, x2]))`. What differs from the one-pass step:

    - BatchNorm in train mode normalises each chunk with that chunk's statistics (2n/chunks images), as
      separate GPUs without SyncBatchNorm would; the gradient is exact for that model (it equals the
      full-batch gradient when BatchNorm is in eval mode or absent). Running statistics are updated
      once per chunk, by step 3 only: step 1's updates are undone by restoring every buffer.
    - Randomness in the forward (dropout; none in ResNetSimCLR) is replayed: step 3 runs each chunk
      from the RNG state step 1 used, and the RNG is left where step 1 left it.
    - Under DistributedDataParallel the parameter gradients are all-reduced once, in the backward of
      the last chunk (`no_sync()` for the others), so each rank communicates as much as in a plain step.

    Args:
        model: the network, maybe wrapped in DDP and/or torch.compile; `model(x)` returns `(h, z)`.
        criterion: an `NTXentLoss` (gathers `z` across ranks when a process group is initialised).
        x1, x2: `[n, C, H, W]` the two views of this rank's n images.
        chunks: number of sub-batches, 1 <= chunks <= n (need not divide n).
        autocast: a callable returning the autocast context for forward passes (a no-op context is fine).
        scaler: a `torch.amp.GradScaler`; gradients are those of `scaler.scale(loss)`, as in the plain step.
    Returns:
        The detached loss (scalar tensor) and the accuracy dict of `NTXentLoss.loss_and_accuracy`.
    """
    # Over 60 lines only through its docstring: the three steps below share the cached tensors and RNG states,
    # and read best as one piece next to the paper's description (Gao et al. 2021, Section 3).
    n = x1.shape[0]
    if not 1 <= chunks <= n:
        raise ValueError(f"chunks must be in [1, {n}] (the number of images on this rank), got {chunks}")
    parts1, parts2 = x1.tensor_split(chunks), x2.tensor_split(chunks)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    # 1. Embed every chunk without a graph; remember the RNG state each chunk started from.
    states, cached = [], []
    with torch.no_grad():
        for a, b in zip(parts1, parts2):
            states.append(_rng_state(a.device))
            with autocast():
                _, z = model(torch.cat([a, b]))  # (2m, D)
            cached.append(z.split([a.shape[0], b.shape[0]]))
        for buffer, saved in buffers:
            buffer.copy_(saved)
    end_state = _rng_state(x1.device)

    # 2. The loss of the whole batch and its gradient with respect to the cached projections.
    z1 = torch.cat([c[0] for c in cached]).requires_grad_()  # (n, D)
    z2 = torch.cat([c[1] for c in cached]).requires_grad_()
    with autocast():
        loss, accuracy = criterion.loss_and_accuracy(z1, z2)
    scaler.scale(loss).backward()
    grads = list(zip(z1.grad.tensor_split(chunks), z2.grad.tensor_split(chunks)))

    # 3. Re-run each chunk with a graph and push its slice of d(loss)/dz into the parameters.
    ddp = _find_ddp(model)
    for i, (a, b) in enumerate(zip(parts1, parts2)):
        _set_rng_state(a.device, states[i])
        last = i == chunks - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast():
                _, z = model(torch.cat([a, b]))
            z.backward(torch.cat(grads[i]).to(z.dtype))
    _set_rng_state(x1.device, end_state)
    return loss.detach(), accuracy

"""NT-Xent, the normalised temperature-scaled cross-entropy loss (SimCLR, Section 2.1, Algorithm 1)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the gradient and returns this rank's slice of it."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never modify autograd's buffer in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Concatenate `z` `[n, D]` from every rank into `[world * n, D]`, in rank order.

    Gradients flow back: the backward pass sums, over all ranks, the gradient each rank's loss sends to
    every slice (an all-reduce of `[world * n, D]`, small next to the encoder's gradients) and returns to
    each rank the sum for its own slice. So each rank's `z` receives the gradient of the *sum* of all
    ranks' losses, and DDP's averaging of parameter gradients over ranks turns that into exactly the
    gradient of the mean loss over the global batch. (A gather that returned only the local loss's
    gradient would scale it by 1 / world; one without a backward would drop the negatives' gradient.)
    Every rank must pass the same n. Without an initialised process group, or with one process, it
    returns `z` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _GatherWithGrad.apply(z)


class NTXentLoss(nn.Module):
    """Mean NT-Xent over the 2N anchors of N positive pairs, with negatives from every rank.

    Args:
        temperature: tau, the softmax temperature (paper: 0.1 to 0.5).
        use_cosine_similarity: cosine similarity (the paper) if True, else the raw dot product.
    Memory is O(N^2): a few `[2n, 2N]` float32 matrices (logits, softmax, their gradient), never a
    `[2N, 2N, D]` tensor. See bench/loss_scaling.py for measured time and memory up to N = 8192.
    """

    def __init__(self, temperature: float = 0.5, use_cosine_similarity: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.use_cosine_similarity = use_cosine_similarity

    def logits(self, z_i: torch.Tensor, z_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity logits of the local anchors against all keys, and the index of each positive.

        Args:
            z_i, z_j: `[n, D]` projections of the two views of this rank's n images.
        Returns:
            logits `[2n, 2N]` with the self-similarity set to -inf, and targets `[2n]` (int64).
        """
        if z_i.shape != z_j.shape or z_i.ndim != 2:
            raise ValueError(f"z_i and z_j must both be [N, D], got {tuple(z_i.shape)} and {tuple(z_j.shape)}")
        # float32 even under autocast: bfloat16 logits (spacing 0.0625 at |logit| 10, tau = 0.1) would blur the
        # gaps between the positive and the hard negatives, and the matmul would drop back to it under autocast
        with torch.autocast(z_i.device.type, enabled=False):
            return self._logits(z_i.float(), z_j.float())

    def _logits(self, z_i: torch.Tensor, z_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_cosine_similarity:
            z_i, z_j = F.normalize(z_i, dim=1), F.normalize(z_j, dim=1)
        n = z_i.shape[0]
        all_i, all_j = gather_with_grad(z_i), gather_with_grad(z_j)  # (N, D) each
        total = all_i.shape[0]
        if total < 2:
            raise ValueError("NT-Xent needs at least 2 images in the (global) batch")
        offset = n * (dist.get_rank() if total != n else 0)
        anchors = torch.cat([z_i, z_j]) / self.temperature  # (2n, D): dividing here, not the (2n, 2N) logits
        keys = torch.cat([all_i, all_j])  # (2N, D)
        logits = anchors @ keys.T  # (2n, 2N)
        local = torch.arange(n, device=z_i.device)
        self_index = torch.cat([local + offset, local + offset + total])  # (2n,) position of each anchor in keys
        targets = torch.cat([local + offset + total, local + offset])  # its other view
        # scatter, not a (2n, 2N) one-hot mask: that was 8 bytes per logit (2 GiB at N = 8192)
        logits = logits.scatter(1, self_index[:, None], float("-inf"))
        return logits, targets

    def forward(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        logits, targets = self.logits(z_i, z_j)
        return F.cross_entropy(logits, targets)

    def loss_and_accuracy(self, z_i: torch.Tensor, z_j: torch.Tensor, topk=(1, 5), negatives: int | None = None):
        """The loss and the contrastive top-k accuracy (%, tensors, no host sync): is the positive ranked first?

        `negatives`: the loss as if each anchor had that many negatives (the training batch's `2N - 2`) where
        this batch holds fewer, K, as a validation hold-out smaller than one training batch does. NT-Xent grows
        with the number of negatives (log(2N - 1) at chance), so a loss over fewer would not compare with the
        training loss. Each anchor's sum of exp(logit) over its K negatives is scaled by `negatives` / K (a
        log(negatives / K) added to every negative logit): in expectation, the sum over `negatives` negatives
        drawn like these. The accuracy stays among this batch's own candidates: a top-k among more cannot be
        estimated from fewer without assuming how the unseen negatives score. docs/PICTURES.md derives both.
        """
        logits, targets = self.logits(z_i, z_j)
        accuracy = contrastive_accuracy(logits.detach(), targets, topk)
        have = logits.shape[1] - 2  # every key but the anchor itself and its positive
        if negatives is not None and negatives != have:
            if negatives < have or have < 1:
                raise ValueError(f"negatives = {negatives}: must be at least this batch's {have} (and it must have "
                                 "one); it scales the loss up to a larger batch")
            positive = logits.gather(1, targets[:, None])  # (2n, 1)
            logits = (logits + math.log(negatives / have)).scatter(1, targets[:, None], positive)
        return F.cross_entropy(logits, targets), accuracy


def contrastive_accuracy(logits: torch.Tensor, targets: torch.Tensor, topk=(1, 5)) -> dict[str, torch.Tensor]:
    """Percentage of anchors whose positive is among the k most similar keys, for each k in `topk`."""
    k_max = min(max(topk), logits.shape[1] - 1)
    top = logits.topk(k_max, dim=1).indices  # (2n, k_max)
    hit = top == targets[:, None]
    return {f"top{k}": hit[:, :min(k, k_max)].any(dim=1).float().mean() * 100 for k in topk}

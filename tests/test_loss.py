import math

import pytest
import torch
import torch.nn.functional as F

from loss.nt_xent import NTXentLoss, contrastive_accuracy


def slow_nt_xent(z_i, z_j, temperature, cosine):
    """The paper's Algorithm 1, one anchor at a time: l(k, k+N) and l(k+N, k), averaged over 2N."""
    z = torch.cat([z_i, z_j]).double()
    n2 = z.shape[0]
    n = n2 // 2

    def sim(a, b):
        return (F.cosine_similarity(a, b, dim=0) if cosine else a @ b) / temperature

    total = 0.0
    for k in range(n2):
        positive = (k + n) % n2
        denominator = sum(math.exp(sim(z[k], z[m])) for m in range(n2) if m != k)
        total += -math.log(math.exp(sim(z[k], z[positive])) / denominator)
    return total / n2


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_slow_loop(cosine, n, temperature):
    torch.manual_seed(n)
    z_i, z_j = torch.randn(n, 5) * 0.3, torch.randn(n, 5) * 0.3
    loss = NTXentLoss(temperature, cosine)(z_i, z_j)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(slow_nt_xent(z_i, z_j, temperature, cosine), rel=1e-5, abs=1e-6)


def slow_nt_xent_torch(z_i, z_j, temperature, cosine):
    """Algorithm 1 in differentiable torch ops, anchor by anchor, for gradient checks."""
    z = torch.cat([z_i, z_j])
    n2, n = z.shape[0], z.shape[0] // 2
    if cosine:
        z = z / z.norm(dim=1, keepdim=True)
    terms = []
    for k in range(n2):
        others = torch.stack([z[k] @ z[m] / temperature for m in range(n2) if m != k])
        terms.append(torch.logsumexp(others, 0) - z[k] @ z[(k + n) % n2] / temperature)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("cosine", [True, False])
def test_gradient_matches_slow_loop(cosine):
    torch.manual_seed(0)
    a, b = torch.randn(5, 6) * 0.5, torch.randn(5, 6) * 0.5
    fast_i, fast_j = a.clone().requires_grad_(), b.clone().requires_grad_()
    slow_i, slow_j = a.double().requires_grad_(), b.double().requires_grad_()
    NTXentLoss(0.5, cosine)(fast_i, fast_j).backward()
    slow_nt_xent_torch(slow_i, slow_j, 0.5, cosine).backward()
    for fast, slow in ((fast_i, slow_i), (fast_j, slow_j)):
        assert torch.isfinite(fast.grad).all() and fast.grad.abs().sum() > 0
        torch.testing.assert_close(fast.grad, slow.grad.float(), rtol=1e-4, atol=1e-6)


def test_perfect_alignment_gives_full_accuracy_and_low_loss():
    z = torch.eye(8) * 10
    loss, acc = NTXentLoss(0.1).loss_and_accuracy(z, z.clone())
    assert acc["top1"].item() == 100 and acc["top5"].item() == 100
    assert loss.item() < 1e-3


def test_accuracy_by_hand():
    # 2 anchors' logits over 4 keys; targets 3 and 0
    logits = torch.tensor([[float("-inf"), 5.0, 1.0, 4.0], [3.0, float("-inf"), 6.0, 1.0]])
    acc = contrastive_accuracy(logits, torch.tensor([3, 0]), topk=(1, 2))
    assert acc["top1"].item() == 0 and acc["top2"].item() == 100


def test_large_batch_matches_chance_level():
    """N=2048, D=128 (a [2N, 2N, D] tensor would be 4 GiB; bench/loss_scaling.py measures the real peak):
    logits are [2N, 2N], and for independent random projections (cosine ~ 0) the loss is ~ log(2N - 1)."""
    torch.manual_seed(0)
    z_i, z_j = torch.randn(2048, 128), torch.randn(2048, 128)
    loss_fn = NTXentLoss(0.5)
    logits, targets = loss_fn.logits(z_i, z_j)
    assert logits.shape == (4096, 4096) and targets.shape == (4096,)
    assert loss_fn(z_i, z_j).item() == pytest.approx(math.log(4095), abs=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
    with pytest.raises(ValueError):
        NTXentLoss(0.5)(torch.randn(3, 4), torch.randn(2, 4))


def test_logits_stay_float32_under_autocast():
    """Under bf16 autocast the similarity matmul must not drop to bfloat16 (tau = 0.1: logits up to 10)."""
    g = torch.Generator().manual_seed(0)
    z_i, z_j = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    criterion = NTXentLoss(temperature=0.1)
    reference, _ = criterion.logits(z_i, z_j)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = criterion.logits(z_i.bfloat16(), z_j.bfloat16())
        loss = criterion(z_i, z_j)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    finite = torch.isfinite(reference)
    # only the inputs' rounding to bfloat16 remains (the matmul itself in bfloat16 was off by up to 0.035)
    z_ref, _ = criterion.logits(z_i.bfloat16().float(), z_j.bfloat16().float())
    assert torch.equal(logits[finite], z_ref[finite])
    assert loss.item() == pytest.approx(criterion(z_i, z_j).item(), abs=1e-6)

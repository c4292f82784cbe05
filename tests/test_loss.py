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


# ---------- the loss scaled to more negatives (validation on a hold-out smaller than one training batch) ----------

def slow_scaled_nt_xent(z_i, z_j, temperature, negatives):
    """Each anchor's loss with its negatives' sum of exp(similarity / temperature) times negatives / (2n - 2),
    one anchor at a time (cosine similarity)."""
    z = F.normalize(torch.cat([z_i, z_j]).double(), dim=1)
    n2, n = z.shape[0], z.shape[0] // 2
    total = 0.0
    for k in range(n2):
        positive = (k + n) % n2
        others = sum(math.exp(z[k] @ z[m] / temperature) for m in range(n2) if m not in (k, positive))
        pos = math.exp(z[k] @ z[positive] / temperature)
        total += -math.log(pos / (pos + others * negatives / (n2 - 2)))
    return total / n2


def test_the_scaled_loss_matches_the_slow_loop_and_keeps_the_accuracy():
    torch.manual_seed(0)
    z_i, z_j = torch.randn(6, 5), torch.randn(6, 5)
    criterion = NTXentLoss(0.3)
    plain_loss, plain_acc = criterion.loss_and_accuracy(z_i, z_j)
    loss, acc = criterion.loss_and_accuracy(z_i, z_j, negatives=40)
    assert loss.item() == pytest.approx(slow_scaled_nt_xent(z_i, z_j, 0.3, 40), rel=1e-5)
    assert loss > plain_loss and acc == plain_acc  # the accuracy stays among the batch's own 11 candidates
    same, _ = criterion.loss_and_accuracy(z_i, z_j, negatives=10)  # as many as the batch has: unchanged
    assert torch.equal(same, plain_loss)
    with pytest.raises(ValueError, match="negatives = 4"):
        criterion.loss_and_accuracy(z_i, z_j, negatives=4)


def test_a_loss_that_ignores_the_batch_reads_the_same_at_any_size_once_scaled():
    """Identical projections: every logit is the same, so NT-Xent is log(candidates), log(2N - 1) for a
    training batch of N; scaled to that batch's 2N - 2 negatives, a batch of 36 gives it too."""
    z = torch.ones(36, 8)
    loss, _ = NTXentLoss(0.2).loss_and_accuracy(z, z.clone(), negatives=2 * 128 - 2)
    assert loss.item() == pytest.approx(math.log(2 * 128 - 1), rel=1e-6)
    assert NTXentLoss(0.2)(z, z.clone()).item() == pytest.approx(math.log(2 * 36 - 1), rel=1e-6)  # unscaled: lower


def test_scaled_small_batches_estimate_the_large_batch_loss():
    """Projections of 256 images of 10 kinds (two noisy views each): the loss of the batch of 256 against the
    mean over its four batches of 64, plain (fewer negatives: lower) and scaled to 510 negatives."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 16, generator=generator)
    images = centres[torch.randint(0, 10, (256,), generator=generator)] + 0.7 * torch.randn(256, 16, generator=generator)
    z_i, z_j = (images + 0.4 * torch.randn(256, 16, generator=generator) for _ in range(2))
    criterion = NTXentLoss(0.2)
    full = criterion(z_i, z_j).item()
    parts = [slice(k, k + 64) for k in range(0, 256, 64)]
    plain = sum(criterion(z_i[p], z_j[p]).item() for p in parts) / 4
    scaled = sum(criterion.loss_and_accuracy(z_i[p], z_j[p], negatives=510)[0].item() for p in parts) / 4
    assert full - plain > 0.5  # what the small batch hides: about log(511 / 127) = 1.39 at chance
    assert abs(scaled - full) < 0.05 * (full - plain)

"""Evaluation protocols on frozen features: L-BFGS logistic regression, an Adam linear probe, and two KNNs.

Each is a function `(train_features [N, D], train_labels [N], test_features [M, D], test_labels [M] or None, ...)
-> ClassifierResult`. Test labels are read once, after the classifier is fixed, only to score it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knn.neighbours import nearest, weighted_knn_scores


@dataclass
class ClassifierResult:
    """One protocol's `scores` (float `[M, C]`, higher is more likely), `predictions` (int64 `[M]`), top-1/top-5 %
    (None without test labels) and `details`, JSON-able facts of the fit (chosen settings, convergence)."""

    scores: np.ndarray
    predictions: np.ndarray
    top1: float | None = None
    top5: float | None = None
    details: dict = field(default_factory=dict)


def ranked_classes(scores: np.ndarray) -> np.ndarray:
    """Classes from most to least likely, `[M, C]`; equal scores keep the lower class first (as sklearn's argmax)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def topk_accuracy(scores: np.ndarray, labels, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracy in percent of `scores` `[M, C]` against integer `labels` `[M]` for each k of `ks` (k capped at
    the number of classes)."""
    ranked = ranked_classes(scores)
    labels = np.asarray(labels).astype(np.int64).reshape(-1, 1)
    if len(labels) != len(ranked):
        raise ValueError(f"{len(labels)} labels for {len(ranked)} scored items")
    return [float(100.0 * (ranked[:, :min(k, ranked.shape[1])] == labels).any(axis=1).mean()) for k in ks]


def _finish(scores: np.ndarray, test_labels, details: dict) -> ClassifierResult:
    scores = np.asarray(scores, dtype=np.float64)
    result = ClassifierResult(scores, ranked_classes(scores)[:, 0], details=details)
    if test_labels is not None:  # the one place where test labels are read
        result.top1, result.top5 = topk_accuracy(scores, np.asarray(test_labels))
    return result


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _train_labels(train_labels, num_classes: int | None) -> tuple[np.ndarray, int]:
    """int64 training labels `[N]`, checked, and the number of classes."""
    labels = _numpy(train_labels, np.int64)
    if len(labels) == 0:
        raise ValueError("no training items")
    if labels.min() < 0:
        raise ValueError("training labels must be >= 0 (unlabelled items cannot train a classifier)")
    found = int(labels.max()) + 1
    if num_classes is not None and num_classes < found:
        raise ValueError(f"num_classes={num_classes} but training labels go up to {found - 1}")
    return labels, num_classes or found


def standardize(train_features, test_features) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn `StandardScaler` fitted on the training features, in float64: `([N, D], [M, D])`."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_numpy(train_features, np.float64))
    return scaler.transform(_numpy(train_features, np.float64)), scaler.transform(_numpy(test_features, np.float64))


def lbfgs_probe(train_features, train_labels, test_features, test_labels=None, *, num_classes: int | None = None,
                C: float = 1.0, max_iter: int = 1200, seed: int = 0) -> ClassifierResult:
    """The original repository's (sthalles/SimCLR) linear protocol, so its numbers compare: `StandardScaler`, then
    `LogisticRegression(solver="lbfgs", C, max_iter)`. Scores: decision values (-inf for classes absent from train)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y, classes = _train_labels(train_labels, num_classes)
    x_train, x_test = standardize(train_features, test_features)
    clf = LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x_train, y)
    decision = clf.decision_function(x_test)
    if decision.ndim == 1:  # two classes: sklearn predicts classes_[1] where decision > 0
        decision = np.stack([np.zeros_like(decision), decision], axis=1)
    scores = np.full((len(x_test), classes), -np.inf)
    scores[:, clf.classes_] = decision
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return _finish(scores, test_labels, {"C": C, "max_iter": max_iter, "iterations": int(np.max(clf.n_iter_)),
                                          "converged": converged})


MIN_HOLDOUT_ITEMS = 4  # two to fit, at least one to validate, and room to round


def holdout_split(labels: np.ndarray, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit, valid) index split of the training items, stratified by class where every class allows it."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if n < MIN_HOLDOUT_ITEMS:
        raise ValueError(f"{n} training items are too few to hold out a validation part (need {MIN_HOLDOUT_ITEMS})")
    n_valid = min(max(int(round(n * valid_fraction)), 1), n - 2)
    counts = np.unique(labels, return_counts=True)[1]  # of the classes present
    stratify = labels if counts.min() >= 2 and len(counts) <= n_valid and len(counts) <= n - n_valid else None
    fit, valid = train_test_split(np.arange(n), test_size=n_valid, random_state=seed, stratify=stratify)
    return np.sort(fit), np.sort(valid)


class _LinearStack:
    """G independent linear classifiers `[D] -> [C]` on standardised features, one per weight decay: side by side on
    the same mini-batches they cost about one, and each follows the trajectory it would alone (Adam is element-wise;
    the L2 term is per layer)."""

    def __init__(self, x: torch.Tensor, num_classes: int, weight_decays: tuple[float, ...]):
        self.mean, std = x.mean(0), x.std(0, unbiased=False)
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant feature: scale 1, as StandardScaler
        groups = len(weight_decays)
        # Zero start: the problem is convex, so the fit depends on the data and the batch order only.
        self.weight = torch.zeros(groups, x.shape[1], num_classes, device=x.device, requires_grad=True)  # (G, D, C)
        self.bias = torch.zeros(groups, num_classes, device=x.device, requires_grad=True)  # (G, C)
        self.decay = torch.tensor(weight_decays, dtype=x.dtype, device=x.device).view(groups, 1, 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """`[G, M, C]` logits of every layer for features `[M, D]`."""
        features = (features - self.mean) / self.std
        return torch.einsum("md,gdc->gmc", features, self.weight) + self.bias[:, None, :]


def _fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays: tuple[float, ...], epochs: int,
                lr: float, batch_size: int, seed: int):
    """Train one linear layer per weight decay (Adam's: an L2 term added to the gradient) on `x` `[N, D]`, `y` `[N]`
    with a seeded batch order; yields the layers (one `_LinearStack`, trained on) after each epoch."""
    model = _LinearStack(x, num_classes, weight_decays)
    optimizer = torch.optim.Adam([model.weight, model.bias], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            batch = batch.to(x.device)
            logits = model.logits(x[batch])  # (G, B, C)
            # Sum of each layer's mean loss: every layer gets exactly the gradient it would get alone.
            loss = F.cross_entropy(logits.flatten(0, 1), y[batch].repeat(len(logits)), reduction="sum") / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                model.weight.grad += model.decay * model.weight
                model.bias.grad += model.decay[:, :, 0] * model.bias
            optimizer.step()
        yield model


def adam_probe(train_features, train_labels, test_features, test_labels=None, *, num_classes: int | None = None,
               weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2), max_epochs: int = 100,
               eval_every: int = 10, lr: float = 1e-3, batch_size: int = 256, valid_fraction: float = 0.2,
               seed: int = 0, device: str | torch.device = "cpu") -> ClassifierResult:
    """A linear layer trained with Adam on standardised features, tuned without the test set: weight decay and epoch
    count (a multiple of `eval_every`) are chosen on a seeded, stratified `valid_fraction` of the training items,
    then refitted on all of them and applied once to test. Scores: logits; details: the grid and the choice."""
    device = torch.device(device)
    weight_decays = tuple(float(wd) for wd in weight_decays)
    x = torch.as_tensor(_numpy(train_features, np.float32), device=device)
    y_np, classes = _train_labels(train_labels, num_classes)
    y = torch.as_tensor(y_np, device=device)
    fit, valid = (torch.as_tensor(part, device=device) for part in holdout_split(y_np, valid_fraction, seed))
    checkpoints = tuple(range(eval_every, max_epochs + 1, eval_every)) or (max_epochs,)
    grid = {}  # (weight decay, epochs) -> validation top-1 %
    # One intra-op thread on the CPU: a linear layer on a few hundred rows costs less than the thread hand-offs
    # (10-40x slower per step with two threads on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    try:
        layers = _fit_linear(x[fit], y[fit], classes, weight_decays, max(checkpoints), lr, batch_size, seed)
        for epoch, model in enumerate(layers, 1):
            if epoch in checkpoints:
                with torch.no_grad():
                    top1 = (model.logits(x[valid]).argmax(2) == y[valid]).double().mean(1) * 100  # (G,)
                grid.update(((wd, epoch), acc) for wd, acc in zip(weight_decays, top1.tolist()))
        # Highest validation accuracy; ties go to the earlier weight decay of the list, then to fewer epochs.
        best_wd, best_epochs = max(grid, key=lambda c: (grid[c], -weight_decays.index(c[0]), -c[1]))
        *_, model = _fit_linear(x, y, classes, (best_wd,), best_epochs, lr, batch_size, seed)  # after the last epoch
        with torch.no_grad():
            test = torch.as_tensor(_numpy(test_features, np.float32), device=device)
            logits = model.logits(test)[0].cpu().numpy()  # (M, C)
    finally:
        torch.set_num_threads(threads)
    details = {"weight_decay": best_wd, "epochs": best_epochs, "valid_top1": grid[best_wd, best_epochs],
               "lr": lr, "batch_size": batch_size, "fit_items": len(fit), "valid_items": len(valid),
               "valid_top1_grid": {str(wd): {str(ep): grid[wd, ep] for ep in checkpoints} for wd in weight_decays}}
    return _finish(logits, test_labels, details)


def knn_classifier(train_features, train_labels, test_features, test_labels=None, *, num_classes: int | None = None,
                   k: int = 10, query_chunk: int = 256, key_chunk: int = 8192,
                   device: str | torch.device = "cpu") -> ClassifierResult:
    """The original repository's KNN: majority vote of the k nearest training items, Euclidean (float64, chunked) on
    standardised features, as `KNeighborsClassifier(n_neighbors=k)`; ties go to the lower class. Scores: votes."""
    (y_np, classes), device = _train_labels(train_labels, num_classes), torch.device(device)
    k = min(k, len(y_np))
    dtype = torch.float64 if device.type != "mps" else torch.float32
    keys, queries = (torch.as_tensor(x, dtype=dtype, device=device) for x in standardize(train_features, test_features))
    key_sq = (keys * keys).sum(1)

    def negative_sq_distance(q, start, stop):
        sq = (q * q).sum(1, keepdim=True) - 2 * q @ keys[start:stop].T + key_sq[start:stop]
        return -sq.clamp_min(0)

    _, index = nearest(queries, len(keys), k, negative_sq_distance, query_chunk, key_chunk, "knn")
    neighbour_labels = torch.as_tensor(y_np, device=device)[index]  # (M, k)
    votes = torch.zeros(len(queries), classes, dtype=torch.float64, device=device)
    votes.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels, dtype=torch.float64))
    return _finish(votes.cpu().numpy(), test_labels, {"k": k, "metric": "euclidean", "standardized": True})


def weighted_knn(train_features, train_labels, test_features, test_labels=None, *, num_classes: int | None = None,
                 k: int = 200, temperature: float = 0.1, query_chunk: int = 256, key_chunk: int = 8192,
                 device: str | torch.device = "cpu") -> ClassifierResult:
    """Weighted cosine KNN (Wu et al. 2018, Section 3.4), the trainer's kNN monitor's (`knn.weighted_knn_scores`):
    the k most cosine-similar training items vote with weight `exp(cosine / temperature)`. Scores: summed weights."""
    (y_np, classes), device = _train_labels(train_labels, num_classes), torch.device(device)
    k = min(k, len(y_np))
    keys, queries = (torch.as_tensor(_numpy(x, np.float32), device=device) for x in (train_features, test_features))
    scores = weighted_knn_scores(keys, torch.as_tensor(y_np, device=device), queries, classes, k, temperature,
                                 query_chunk, key_chunk)  # (M, C)
    return _finish(scores.cpu().numpy(), test_labels, {"k": k, "temperature": temperature, "metric": "cosine"})

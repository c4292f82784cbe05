"""Nearest neighbours of feature tensors, chunked, and the weighted cosine kNN vote (Wu et al. 2018).

Both the trainer's kNN monitor (`simclr.monitor`) and feature_eval's KNN rows call these, so the number a run
prints while it trains and the evaluation's weighted-KNN row come from one implementation. Torch only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

Similarity = Callable[[torch.Tensor, int, int], torch.Tensor]


def nearest(queries: torch.Tensor, num_keys: int, k: int, similarity: Similarity, query_chunk: int = 256,
            key_chunk: int = 8192, desc: str = "neighbours") -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys of largest `similarity(query_chunk, start, stop)` (against keys `start:stop`) for each query.

    Key chunks are merged into a running top-k, so memory stays at `query_chunk x (key_chunk + k)` whatever the
    number of queries or keys. A stable sort keeps the earlier key first among equals, so ties break the same
    way in every chunking.

    Args:
        queries: `[M, D]`; only split into chunks here, `similarity` reads them.
        num_keys: N, the number of keys `similarity` can compare with.
        k: neighbours per query (at most N).
    Returns:
        values and key indices, `[M, k]` each, most similar first.
    """
    values, indices = [], []
    chunks = queries.split(query_chunk)
    for q in tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=True if len(chunks) <= 1 else None):
        best_v = torch.empty(len(q), 0, dtype=q.dtype, device=q.device)
        best_i = torch.empty(len(q), 0, dtype=torch.int64, device=q.device)
        for start in range(0, num_keys, key_chunk):
            sim = similarity(q, start, min(start + key_chunk, num_keys))  # (chunk, key_chunk)
            cand_v = torch.cat([best_v, sim.to(q.dtype)], dim=1)
            cand_i = torch.cat([best_i, torch.arange(start, start + sim.shape[1], device=q.device).expand(len(q), -1)],
                               dim=1)
            order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cand_v.gather(1, order), cand_i.gather(1, order)
        values.append(best_v)
        indices.append(best_i)
    if not values:
        return torch.empty(0, k, dtype=queries.dtype), torch.empty(0, k, dtype=torch.int64)
    return torch.cat(values), torch.cat(indices)


def cosine_neighbours(keys: torch.Tensor, queries: torch.Tensor, k: int, query_chunk: int = 256,
                      key_chunk: int = 8192, desc: str = "neighbours") -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys most cosine-similar to each query (float32, features L2-normalised first).

    Args:
        keys: `[N, D]`; queries: `[M, D]`, on the same device.
    Returns:
        cosine similarities and key indices, `[M, min(k, N)]` each, most similar first.
    """
    keys = F.normalize(keys.float(), dim=1)  # (N, D)
    queries = F.normalize(queries.float(), dim=1)  # (M, D)
    return nearest(queries, len(keys), min(k, len(keys)), lambda q, start, stop: q @ keys[start:stop].T,
                   query_chunk, key_chunk, desc)


def weighted_knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                        num_classes: int, k: int = 200, temperature: float = 0.1, query_chunk: int = 256,
                        key_chunk: int = 8192, desc: str = "weighted knn") -> torch.Tensor:
    """Class scores of the weighted cosine kNN (Wu et al. 2018, Section 3.4; DINO's and solo-learn's monitor).

    Each of the k training items most cosine-similar to a test item votes for its class with weight
    `exp(cosine / temperature)`; the predicted class is the highest score (the lower class on a tie).

    Args:
        train_features: `[N, D]`; train_labels: int64 `[N]` in `[0, num_classes)`; test_features: `[M, D]`.
        k: neighbours (capped at N); temperature: the vote's sharpness (0.1 in Wu et al., DINO, solo-learn).
    Returns:
        float64 `[M, num_classes]` summed weights, on the features' device.
    """
    similarity, index = cosine_neighbours(train_features, test_features, k, query_chunk, key_chunk, desc)
    weights = (similarity.double() / temperature).exp()  # (M, k)
    scores = torch.zeros(len(test_features), num_classes, dtype=torch.float64, device=test_features.device)
    return scores.scatter_add_(1, train_labels.to(test_features.device)[index], weights)


def weighted_knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      test_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent of `weighted_knn_scores` on labelled test items `[M]`."""
    scores = weighted_knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    predictions = scores.argmax(1).cpu()  # the first maximum: the lower class on a tie
    return float(100.0 * (predictions == test_labels.cpu()).double().mean())

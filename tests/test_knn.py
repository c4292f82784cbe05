"""The one neighbour search (knn/): against scikit-learn's NearestNeighbors and a slow loop from the formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from knn.neighbours import cosine_neighbours, nearest, weighted_knn_scores, weighted_knn_top1


def _features(n: int, m: int, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 4, (n,), generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize("query_chunk, key_chunk", [(256, 8192), (3, 7), (1, 1)])
def test_cosine_neighbours_equal_sklearns(query_chunk, key_chunk):
    from sklearn.neighbors import NearestNeighbors

    keys, _, queries = _features(60, 9)
    similarity, index = cosine_neighbours(keys, queries, 5, query_chunk, key_chunk)
    distance, expected = NearestNeighbors(n_neighbors=5, metric="cosine").fit(keys.numpy()).kneighbors(queries.numpy())
    np.testing.assert_array_equal(index.numpy(), expected)
    np.testing.assert_allclose(similarity.numpy(), 1 - distance, atol=1e-5)


def test_euclidean_search_equals_sklearns():
    """`nearest` with another similarity (what feature_eval's Euclidean KNN passes) finds sklearn's neighbours."""
    from sklearn.neighbors import NearestNeighbors

    keys, _, queries = _features(40, 6)
    keys, queries = keys.double(), queries.double()

    def negative_sq_distance(q, start, stop):
        return -torch.cdist(q, keys[start:stop]) ** 2

    _, index = nearest(queries, len(keys), 4, negative_sq_distance, query_chunk=4, key_chunk=9)
    expected = NearestNeighbors(n_neighbors=4).fit(keys.numpy()).kneighbors(queries.numpy(), return_distance=False)
    np.testing.assert_array_equal(index.numpy(), expected)


def test_weighted_scores_equal_a_slow_loop_and_sklearns_prediction():
    from sklearn.neighbors import KNeighborsClassifier

    keys, labels, queries = _features(50, 7)
    k, temperature = 9, 0.1
    scores = weighted_knn_scores(keys, labels, queries, 4, k, temperature, query_chunk=2, key_chunk=11)
    unit_keys = keys / keys.norm(dim=1, keepdim=True)
    for row, q in enumerate(queries / queries.norm(dim=1, keepdim=True)):
        cosine = (unit_keys @ q).double()
        top = cosine.argsort(descending=True)[:k]
        expected = torch.zeros(4, dtype=torch.float64)
        for i in top:
            expected[labels[i]] += torch.exp(cosine[i] / temperature)
        torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=0)
    # scikit-learn's KNN with the same neighbours and weights exp(cosine / T) = exp((1 - distance) / T) predicts alike
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / temperature))
    predicted = sk.fit(keys.numpy(), labels.numpy()).predict(queries.numpy())
    np.testing.assert_array_equal(scores.argmax(1).numpy(), predicted)


def test_top1_on_ten_points_by_hand():
    """Two clusters on the unit circle: every query's neighbours share its class, so top-1 is 100 % (and 0 % with
    the labels swapped); k larger than the keys is capped."""
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 3.0, 3.1, 3.2, 3.3, 3.4])
    keys = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0] * 5 + [1] * 5)
    queries = torch.tensor([[1.0, 0.05], [-1.0, 0.1]])
    assert weighted_knn_top1(keys, labels, queries, torch.tensor([0, 1]), 2, k=3, temperature=0.1) == 100.0
    assert weighted_knn_top1(keys, labels, queries, torch.tensor([1, 0]), 2, k=3, temperature=0.1) == 0.0
    assert weighted_knn_top1(keys, labels, queries, torch.tensor([0, 1]), 2, k=200, temperature=0.1) == 100.0


def test_ties_go_to_the_earlier_key_and_the_lower_class():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    _, index = cosine_neighbours(keys, torch.tensor([[1.0, 0.0]]), 2, key_chunk=1)
    assert index.tolist() == [[0, 1]]
    scores = weighted_knn_scores(keys[:2], torch.tensor([1, 0]), torch.tensor([[1.0, 0.0]]), 2, k=2)
    assert scores[0, 0] == scores[0, 1] and scores.argmax(1).item() == 0

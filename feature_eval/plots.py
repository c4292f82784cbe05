"""Figures for the evaluation notebook: a 2-D t-SNE embedding of features and a confusion matrix."""
from __future__ import annotations

import numpy as np


def embed_2d(features, max_points: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE (scikit-learn) of at most `max_points` rows, drawn with a seeded permutation.

    Args:
        features: `[N, D]` array or tensor.
    Returns:
        the 2-D points `[n, 2]` and the indices `[n]` of the rows they embed.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).permutation(len(features))[:max_points])
    if len(rows) < 2:  # t-SNE needs two points; one point sits at the origin
        return np.zeros((len(rows), 2), dtype=np.float32), rows
    perplexity = float(min(30.0, max(1.0, (len(rows) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features[rows])
    return points, rows


def plot_embedding(features, labels, classes: list[str], max_points: int = 2000, seed: int = 0, ax=None,
                   title: str = "t-SNE of test features"):
    """Scatter the t-SNE embedding of `features` `[N, D]`, coloured by `labels` `[N]`; returns the axes."""
    import matplotlib.pyplot as plt

    points, rows = embed_2d(features, max_points, seed)
    labels = np.asarray(labels)[rows]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(index % colours.N), label=name)
    ax.set_title(f"{title} ({len(rows)} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize="small", loc="best", ncol=1 if len(classes) <= 10 else 2)
    return ax


def plot_confusion(labels, predictions, classes: list[str], ax=None, title: str = "Confusion matrix"):
    """Row-normalised confusion matrix of `predictions` `[M]` against `labels` `[M]`; returns the axes."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(np.asarray(labels), np.asarray(predictions), labels=range(len(classes)),
                                            display_labels=classes, normalize="true", values_format=".2f",
                                            xticks_rotation=45, ax=ax, colorbar=False)
    ax.set_title(title)
    return ax

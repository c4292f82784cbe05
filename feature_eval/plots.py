"""Figures of an evaluation: a t-SNE of features, confusion matrices and nearest neighbours, drawn on matplotlib's
Agg canvas (no display, no pyplot state) by `feature_eval.evaluate`, or inline by the notebook."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import numpy as np
import torch

TSNE_ITERATIONS = 500  # scikit-learn's 1000 barely changes a 2,000-point picture and takes twice as long


def embed_2d(features, max_points: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of at most `max_points` rows of `features` `[N, D]` (a seeded choice): points `[n, 2]`, their rows `[n]`.

    One thread: Barnes-Hut t-SNE's OpenMP threads spin while they wait, and on a shared 2-core machine one thread
    was 3-6x faster (2,000 points: 7 s against 20-40 s); it also gives the same picture on every machine."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).permutation(len(features))[:max_points])
    chosen = features[rows]
    if not np.isfinite(chosen).all():
        raise ValueError("the features hold NaN or Inf values: they have no t-SNE")
    if len(rows) < 2 or np.ptp(chosen, axis=0).max() == 0:
        # one point, or all alike (an untrained or collapsed encoder): all at the origin; scikit-learn's
        # PCA start would divide by a zero spread, and its Barnes-Hut tree then crashes the process
        return np.zeros((len(rows), 2), dtype=np.float32), rows
    perplexity = float(min(30.0, max(1.0, (len(rows) - 1) / 3)))
    iterations = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # before 1.5: n_iter
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                **{iterations: TSNE_ITERATIONS})
    with threadpool_limits(1):
        return tsne.fit_transform(chosen), rows


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 6))
    return ax


def plot_embedding(features, labels, classes: list[str], max_points: int = 2000, seed: int = 0, ax=None,
                   title: str = "t-SNE of test features"):
    """Scatter the t-SNE embedding of `features` `[N, D]`, coloured by `labels` `[N]`; returns the axes."""
    import matplotlib

    points, rows = embed_2d(features, max_points, seed)
    labels, ax = np.asarray(labels)[rows], _axes(ax)
    colours = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(index % colours.N), label=name)
    ax.set(title=f"{title} ({len(rows)} points)", xticks=[], yticks=[])
    if len(classes) <= 40:  # beyond that a legend hides the picture (colours repeat anyway)
        ax.legend(markerscale=3, fontsize="small", loc="best", ncol=1 if len(classes) <= 10 else 2)
    return ax


def confusion_counts(labels, predictions, num_classes: int) -> np.ndarray:
    """int64 `[C, C]`: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion(counts, classes: list[str], ax=None, title: str = "Confusion matrix"):
    """A `[C, C]` confusion count matrix (rows: true class), each row divided by its total; returns the axes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    ax, counts = _axes(ax), np.asarray(counts, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    many = len(classes) > 20  # 100 classes: values and names would cover the picture
    ConfusionMatrixDisplay(shares, display_labels=None if many else classes).plot(
        ax=ax, include_values=not many, values_format=".2f", xticks_rotation=45, colorbar=False)
    if many:
        ax.set(xticks=[], yticks=[])
    ax.set_title(title)
    return ax


def _figure(width: float, height: float, layout: str | None = None):  # inches at 100 dpi, on the Agg canvas
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def write_evaluation_plots(out_dir: Path, stem: str, test_features, test_labels, classes: list[str],
                           confusions: list[tuple[str, np.ndarray]], max_points: int = 2000,
                           seed: int = 0) -> dict[str, Path]:
    """Write `<stem>_tsne.png` (`plot_embedding`; none for NaN or Inf features) and `<stem>_confusion.png` (a panel
    per `(title, counts [C, C])`; none without confusions); returns `{"tsne": path, "confusion": path}`."""
    paths = {}
    if np.isfinite(np.asarray(test_features)).all():
        figure = _figure(*((8, 6.5) if len(classes) <= 10 else (10, 8)), layout="tight")
        plot_embedding(test_features, test_labels, classes, max_points, seed, ax=figure.subplots(),
                       title="t-SNE of the SimCLR test features")
        paths["tsne"] = out_dir / f"{stem}_tsne.png"
        figure.savefig(paths["tsne"])
    if confusions:
        side = 4.6 if len(classes) <= 10 else 6.0
        figure = _figure(side * len(confusions), side + 0.6, layout="tight")
        for ax, (title, counts) in zip(figure.subplots(1, len(confusions), squeeze=False)[0], confusions):
            plot_confusion(counts, classes, ax, title)
        figure.suptitle("Confusion matrices on the SimCLR features (rows: true class, each row sums to 1)")
        paths["confusion"] = out_dir / f"{stem}_confusion.png"
        figure.savefig(paths["confusion"])
    return paths


RIGHT, WRONG = (0, 160, 60), (220, 30, 30)  # frame colours: the neighbour's class is the test image's, or not


def draw_neighbours(queries, query_labels, panels: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str],
                    title: str) -> np.ndarray:
    """Each test image (a row) followed by its nearest train images under each feature extractor (a panel), framed
    green where the neighbour has the test image's class and red where not; `title` wrapped to the picture's width.

    Args: queries uint8 `[Q, 3, S, S]`, query_labels `[Q]`; panels: `(name, neighbours uint8 [Q, K, 3, S, S],
    their labels [Q, K])` per extractor. Returns the picture, uint8 `[H, W, 3]`."""
    from torchvision.utils import make_grid

    queries, query_labels = np.asarray(queries), np.asarray(query_labels)
    side = queries.shape[-1]
    scale = max(1, 64 // side)  # small images (digits, CIFAR) enlarged so that a digit can be read
    border, gap = max(2, side * scale // 24), max(2, side * scale // 32)
    cell = side * scale + 2 * border

    def grid(images, colours, columns: int) -> torch.Tensor:  # images framed in their colours, white gaps: [3, H, W]
        images = torch.as_tensor(images).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        cells = torch.as_tensor(np.asarray(colours, np.uint8))[:, :, None, None].repeat(1, 1, cell, cell)
        cells[:, :, border:-border, border:-border] = images  # one channel broadcasts: grey
        return make_grid(cells, nrow=columns, padding=gap, pad_value=255)

    groups, headers = [grid(queries, [(90, 90, 90)] * len(queries), 1)], ["test image"]
    for name, images, labels in panels:
        right = np.asarray(labels) == query_labels[:, None]  # (Q, K)
        groups.append(grid(np.asarray(images).reshape(-1, *images.shape[2:]),
                           np.where(right.reshape(-1, 1), RIGHT, WRONG), images.shape[1]))
        headers.append(f"{name}: {int(right.sum())} of {right.size} of the test image's class")
    space = torch.full((3, groups[0].shape[1], cell // 2), 255, dtype=torch.uint8)  # half a cell between groups
    canvas = torch.cat([part for group in groups for part in (space, group)][1:], dim=2).permute(1, 2, 0).numpy()
    starts = np.cumsum([gap] + [group.shape[2] + space.shape[2] for group in groups])  # each group's first cell
    left = 110  # pixels for the class names; at most 8 pixels a character at 9 or 10 points
    width = max(canvas.shape[1] + 130, left + starts[-2] + 8 * len(headers[-1]))
    lines = textwrap.wrap(title, width=max(30, width // 8))
    height = canvas.shape[0] + 56 + 14 * len(lines)  # the title, then the headers above the cells
    figure = _figure(width / 100, height / 100)
    ax = figure.add_axes([left / width, 10 / height, canvas.shape[1] / width, canvas.shape[0] / height])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for start, header in zip(starts, headers):
        ax.text(start, -4, header, ha="left", va="bottom", fontsize=9)
    for q, label in enumerate(query_labels.astype(int)):
        ax.text(-10, gap + q * (cell + gap) + cell / 2, classes[label] if label < len(classes) else str(label),
                ha="right", va="center", fontsize=9)
    figure.suptitle("\n".join(lines), fontsize=10, y=1 - 8 / height, va="top")
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()

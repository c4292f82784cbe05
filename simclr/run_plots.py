"""Pictures a run writes into its directory: `views.png` (what the views do to the data) and `curves.png`
(loss, contrastive top-1 and learning rate per step, and the kNN monitor, from metrics.jsonl), for readers
without TensorBoard."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_aug.view_grid import describe_views, draw_view_grid, pick_images, sample_views, save_png
from data_aug.views import ViewSettings
from simclr.config import DatasetConfig
from simclr.run_dir import read_records

VIEW_IMAGES = 8  # rows of views.png
VIEWS_PER_IMAGE = 6


def views_picture(images, dataset: DatasetConfig, seed: int) -> np.ndarray:
    """The views grid of a run: `VIEW_IMAGES` seeded picks from `images` (the training split, an indexable of
    images or (image, label) pairs), each next to `VIEWS_PER_IMAGE` views from the run's own pipeline.

    `python -m simclr.preview` and the trainer both call this, so the preview is the picture the run writes.
    """
    chosen = pick_images(images, min(VIEW_IMAGES, len(images)), seed)
    settings = ViewSettings.of(dataset)
    views = sample_views(chosen, VIEWS_PER_IMAGE, settings, augment_on=dataset.augment_on, seed=seed)
    return draw_view_grid(chosen, views, f"{dataset.name}: " + describe_views(settings, dataset.augment_on))


def write_views(path: Path, picture: np.ndarray, tensorboard=None, step: int = 0) -> None:
    """Save the views grid as a PNG and, given a SummaryWriter, as the TensorBoard image `views`."""
    save_png(picture, path)
    if tensorboard is not None:
        tensorboard.add_image("views", picture, step, dataformats="HWC")


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """The step and epoch records of a metrics.jsonl (a half-written last line is skipped)."""
    steps, epochs = [], []
    for _, record in read_records(path):
        if record.get("kind") == "step" and "global_step" in record:
            steps.append(record)
        elif record.get("kind") == "epoch":
            epochs.append(record)
    return steps, epochs


def read_knn_reference(path: Path) -> float | None:
    """The kNN monitor's top-1 before the first step (the `knn_reference` record), None where the run has none."""
    found = [r["knn_top1"] for _, r in read_records(path) if r.get("kind") == "knn_reference" and "knn_top1" in r]
    return found[-1] if found else None


def validation_labels(valid_batch: int, train_batch: int) -> dict[str, str]:
    """The legends of the validation points in curves.png, which say what they are measured among: batches of
    the training size, or (a hold-out smaller than one batch) the loss scaled to the training batch's negatives
    and the top-1 among the hold-out's own candidates."""
    if valid_batch >= train_batch:
        return dict.fromkeys(("valid_loss", "valid_top1"), f"validation (batches of {train_batch}, as training)")
    return {"valid_loss": f"validation: {valid_batch} images, scaled to batch {train_batch}",
            "valid_top1": f"validation: among {2 * valid_batch - 1} candidates (train: {2 * train_batch - 1})"}


def draw_curves(steps: list[dict], epochs: list[dict], title: str, knn_reference: float | None = None,
                valid_labels: dict[str, str] | None = None) -> np.ndarray:
    """Training loss, contrastive top-1 and learning rate against the global step; validation (when the run
    has it) as points at the end of its epoch, labelled by `valid_labels` (key -> legend, `validation_labels`);
    the kNN monitor's top-1 (when the run has it) in a fourth panel, with its value before training
    (`knn_reference`) as a dashed line. Returns a uint8 `[H, W, 3]` picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [r["global_step"] for r in steps]
    epoch_end = {}  # the last step of an epoch is always logged
    for r in steps:
        epoch_end[r.get("epoch")] = max(epoch_end.get(r.get("epoch"), 0), r["global_step"])
    marker = "o" if len(x) <= 30 else None  # a line through one or two points is hard to see
    knn = [(epoch_end[r["epoch"]], r["knn_top1"]) for r in epochs if "knn_top1" in r and r.get("epoch") in epoch_end]
    with_knn = bool(knn) or knn_reference is not None
    figure = Figure(figsize=(17 if with_knn else 13, 3.6), dpi=100)
    canvas = FigureCanvasAgg(figure)
    panels = (("loss", "valid_loss", "NT-Xent loss"), ("top1", "valid_top1", "contrastive top-1 %"),
              ("lr", None, "learning rate"))
    axes = figure.subplots(1, 4 if with_knn else 3)
    if with_knn:
        _draw_knn(axes[3], knn, knn_reference, sorted(epoch_end.values())[:-1])
    for ax, (key, valid_key, label) in zip(axes, panels):
        ax.plot(x, [r.get(key, np.nan) for r in steps], marker=marker, markersize=3, linewidth=1.2, label="train")
        valid = [(epoch_end[r["epoch"]], r[valid_key]) for r in epochs
                 if valid_key and valid_key in r and r.get("epoch") in epoch_end]
        if valid:
            ax.plot(*zip(*valid), "o--", color="tab:orange", markersize=5, linewidth=1,
                    label=(valid_labels or {}).get(valid_key, "validation"))
            ax.legend(fontsize=8)
        for end in sorted(epoch_end.values())[:-1]:
            ax.axvline(end, color="0.85", linewidth=0.8, zorder=0)  # epoch boundaries
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _draw_knn(ax, points: list[tuple], reference: float | None, boundaries: list[int]) -> None:
    """The kNN monitor's panel: top-1 at the end of each measured epoch, the value before training dashed."""
    if points:
        ax.plot(*zip(*points), "o-", color="tab:green", markersize=4, linewidth=1.2, label="after the epoch")
    if reference is not None:
        ax.axhline(reference, color="0.4", linestyle="--", linewidth=1, label=f"before training ({reference:.1f})")
        ax.plot([0], [reference], "s", color="0.4", markersize=4)  # measured at step 0
    for end in boundaries:
        ax.axvline(end, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("step")
    ax.set_title("kNN top-1 % (labelled train hold-out)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_curves(run_dir: Path, total_epochs: int, valid_labels: dict[str, str] | None = None) -> Path:
    """Draw `<run_dir>/curves.png` from `<run_dir>/metrics.jsonl` (`valid_labels` as `draw_curves`); returns its
    path."""
    steps, epochs = read_metrics(run_dir / "metrics.jsonl")
    done = len({r.get("epoch") for r in epochs})
    last = steps[-1]["global_step"] if steps else 0
    path = run_dir / "curves.png"
    save_png(draw_curves(steps, epochs, f"{run_dir.name}: {done} of {total_epochs} epochs, {last} steps "
                                        "(vertical lines: epoch ends)", read_knn_reference(run_dir / "metrics.jsonl"),
                         valid_labels=valid_labels), path)
    return path

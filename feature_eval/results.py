"""feature_eval's one results format: rows of (protocol, feature extractor) with top-1/top-5, written as a markdown
table (with a caption and notes) next to a JSON record of every number, the options and the machine."""
from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from feature_eval.context import EvalError

EXTRACTOR_NAMES = {"simclr": "SimCLR", "random": "Random init", "pca": "PCA"}
# The columns of the original repository's (sthalles/SimCLR) results table, which the linear/KNN table keeps.
COLUMNS = ("Classifier", "Feature extractor", "Architecture", "Feature dim", "Projection dim", "Epochs",
           "Top-1 %", "Top-5 %")

# What each column shows of a result row: (value, decimals or None).
CELLS = {"Classifier": lambda row: (row["classifier_name"],), "Feature extractor": lambda row: (row["extractor_name"],),
         "Architecture": lambda row: (row["architecture"],), "Feature dim": lambda row: (row["feature_dim"],),
         "Projection dim": lambda row: (row["projection_dim"],), "Epochs": lambda row: (row["epochs"],),
         "Pretrain epochs": lambda row: (row["epochs"],),
         "Fine-tune epochs": lambda row: ((row.get("details") or {}).get("finetune_epochs"),),
         "Top-1 %": lambda row: (row["top1"], 1), "Top-5 %": lambda row: (row["top5"], 1)}


def result_row(classifier: str, classifier_name: str, extractor: str, facts: dict, top1: float, top5: float,
               seconds: float, details: dict) -> dict:
    """One row of a results table and JSON: the protocol, the extractor and its `facts` (`architecture`,
    `feature_dim`, `projection_dim`, `epochs`), the scores, the time taken and the protocol's details."""
    return {"classifier": classifier, "classifier_name": classifier_name, "extractor": extractor,
            "extractor_name": EXTRACTOR_NAMES[extractor], **facts, "top1": top1, "top5": top5, "seconds": seconds,
            "details": details}


def log_row(log: Callable[[str], None], row: dict, note: str = "") -> None:
    """The progress line of a finished row: protocol, extractor, scores, then `note` and the seconds."""
    log(f"{row['classifier_name']:<34} {row['extractor_name']:<12} top-1 {row['top1']:6.2f}%  top-5 "
        f"{row['top5']:6.2f}%  ({note}{row['seconds']:.1f} s)")


def markdown_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """`COLUMNS` (classifier, feature extractor, architecture, feature dim, projection dim, epochs, top-1/5), or
    `columns` named in `CELLS` (fine-tuning shows pretraining and fine-tuning epochs apart)."""
    def cell(value, digits: int | None = None) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if digits is not None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(*CELLS[column](row)) for column in columns) + " |")
    return "\n".join(lines)


def finished_record(device: torch.device) -> dict:
    """The tail of every results JSON: the machine it ran on and when it finished."""
    return {"machine": {"host": platform.node(), "cpu_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def write_results(results: dict, table: str, out_dir: Path, stem: str, caption: str,
                  notes: list[str] = ()) -> dict[str, Path]:
    """Write `<out_dir>/<stem>.md` (the caption, the table, then each note as a paragraph) and `<out_dir>/<stem>.json`.

    Returns:
        `{"markdown": path, "json": path}`.
    Raises:
        EvalError: the folder cannot be written.
    """
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths["markdown"].write_text("\n\n".join([caption, table, *notes]) + "\n")
        text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
        # a list of numbers on one line: a confusion matrix reads as rows, not as one number a line
        text = re.sub(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]",
                      lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        paths["json"].write_text(text + "\n")
    except OSError as err:
        raise EvalError(f"cannot write results to {out_dir} ({err.strerror or err}): pass --out-dir DIR") from None
    return paths


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

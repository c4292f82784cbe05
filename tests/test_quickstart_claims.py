"""The quickstart's published numbers (README, docs/RECIPE.md, docs/BENCHMARKS.md) agree with each other and were
measured with the config that configs/quickstart.yaml gives today.

Training the quickstart takes minutes, so the numbers are not recomputed here. What is checked instead: the three
documents quote the same per-seed values and the same mean ± sd, and the training part of the resolved quickstart
config still has the digest recorded next to the measurement. A change of configs/quickstart.yaml (or of a
default in simclr/config.py) that could move the numbers fails here until they are measured again
(`for s in 0 1 2; do python run.py --config configs/quickstart.yaml seed=$s run_dir=runs/qs_seed$s; done`) and
the documents and the digest are updated.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

from simclr.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
# keys that name where a run goes and what it keeps or prints, not what it learns
NOT_TRAINING = ("run_dir", "resume", "keep_checkpoints", "final_eval", "log_every_n_steps")


def training_digest(config_path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of the resolved config, less the keys in NOT_TRAINING."""
    data = config_to_dict(load_config(config_path))
    for key in NOT_TRAINING:
        data.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _readme_rows() -> dict[str, tuple[list[float], str]]:
    """{'lbfgs' | 'knn': (per-seed top-1, 'mean ± sd')} from the README's quickstart table (its SimCLR rows)."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1] == "SimCLR" and cells[5] == "25":
            kind = "lbfgs" if cells[0].startswith("Logistic regression (L-BFGS)") else "knn"
            rows[kind] = ([float(v) for v in cells[6].split(",")], cells[7])
    return rows


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_quickstart_config_is_the_one_its_numbers_were_measured_with():
    section = _section((REPO / "docs" / "BENCHMARKS.md").read_text(), "## The quickstart's table")
    recorded = re.search(r"training digest `([0-9a-f]{12})`", section).group(1)
    assert training_digest(REPO / "configs" / "quickstart.yaml") == recorded, (
        "configs/quickstart.yaml (or a default it inherits) changed what the quickstart trains: measure seeds 0-2 "
        "again, update README, docs/RECIPE.md and docs/BENCHMARKS.md, and record the new digest there")


def test_the_digest_ignores_where_a_run_goes_and_sees_what_it_learns(tmp_path):
    base = (REPO / "configs" / "quickstart.yaml").read_text()
    same = base.replace("run_dir: runs/quickstart", "run_dir: elsewhere")
    variants = {"same": same.replace("keep_checkpoints: last", "keep_checkpoints: all"),
                "longer": base.replace("epochs: 25", "epochs: 26")}
    assert "run_dir: elsewhere" in variants["same"] and "keep_checkpoints: all" in variants["same"]
    digests = {}
    for name, text in variants.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        digests[name] = training_digest(tmp_path / f"{name}.yaml")
    reference = training_digest(REPO / "configs" / "quickstart.yaml")
    assert digests["same"] == reference != digests["longer"]


def test_readme_recipe_and_benchmarks_quote_the_same_quickstart_numbers():
    rows = _readme_rows()
    assert set(rows) == {"lbfgs", "knn"}
    section = _section((REPO / "docs" / "BENCHMARKS.md").read_text(), "## The quickstart's table")
    recipe = (REPO / "docs" / "RECIPE.md").read_text()
    for kind, label in (("lbfgs", "L-BFGS"), ("knn", "KNN")):
        seeds, summary = rows[kind]
        assert len(seeds) == 3
        assert summary == f"{statistics.mean(seeds):.1f} ± {statistics.stdev(seeds):.1f}"
        assert f"| {label} SimCLR | {seeds[0]} | {seeds[1]} | {seeds[2]} | {summary} |" in section
        assert f"{label} {summary}" in recipe

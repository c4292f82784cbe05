"""bench.learning: the recipe study's runs, scores, table and errors (tiny runs on digits at 8 px)."""
from __future__ import annotations

import pytest

from bench import learning
from data_aug.datasets import load_split
from simclr.trainer import Trainer

TINY = ["--set", "epochs=1", "batch_size=256", "dataset.input_shape=(8,8,3)", "model.out_dim=8", "device=cpu",
        "log_every_n_steps=100", "dataset.valid_size=0"]


def test_a_bad_variant_fails_in_one_line_before_any_training(tmp_path, capsys):
    class Never(Trainer):
        def __init__(self, *args, **kwargs):
            pytest.fail("trained before checking the variants")

    code = learning.main(["--variants", "loss.temperature=0.2", "loss.temprature=0.2", "--seeds", "0",
                          "--out-dir", str(tmp_path), *TINY], trainer_class=Never)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "variant 'loss.temprature=0.2'" in err and "temperature" in err


@pytest.mark.slow
def test_study_table_has_the_runs_and_both_baselines_with_their_spread(tmp_path, capsys, monkeypatch):
    benchmarks = tmp_path / "BENCHMARKS.md"
    read = []  # the splits the study scores with: the test split is never read, so never selected on
    monkeypatch.setattr(learning, "load_split", lambda *args, **kw: read.append(args[2]) or load_split(*args, **kw))
    code = learning.main(["--variants", "--seeds", "0", "1", "--out-dir", str(tmp_path / "runs"), "--output",
                          str(benchmarks), *TINY])
    out = capsys.readouterr().out
    assert code == 0 and set(read) == {"train"}
    table = benchmarks.read_text()
    assert "## Recipe study" in table and "python -m bench.learning --variants" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| SimCLR, base config", "| Random init (resnet18, 8px)",
                                                "| PCA (8 components, 8px)"]
    assert "scored on the other 20%" in table and "seeds 0, 1" in table
    for row in rows:  # mean ± sd over the two seeds, in [0, 100]
        top1, sd = map(float, row.split(" | ")[1].split(" ± "))
        assert 0 <= top1 <= 100 and sd >= 0
    # One run per seed, each with its own run dir and checkpoint.
    assert len(list((tmp_path / "runs").glob("*_seed*/checkpoints/last.pt"))) == 2
    assert len([line for line in out.splitlines() if line.startswith("[") and "pretraining" in line]) == 2
    # The margin is SimCLR minus the better baseline of the same seed.
    lines = [line for line in out.splitlines() if "] base seed 0:" in line]
    assert lines and "margin" in lines[0]

"""The kNN monitor under torchrun: two gloo processes on the CPU measure what one process measures, once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.resnet_simclr import create_model
from simclr.monitor import load_monitor
from tests.conftest import final_weights, tiny_args, write_stl10

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_measure_what_one_does_once_and_finish(tmp_path, one_thread):
    """Rank 0 measures while rank 1 waits (no deadlock with the stop vote or the epoch's barrier): the value
    before training equals one process's measurement of the same seeded weights, the last epoch's equals one
    process's measurement of the weights saved then, and every record is written once."""
    data_root, run_dir = tmp_path / "data", tmp_path / "two"
    write_stl10(data_root, n_train=40, n_test=2, n_unlabeled=2)  # 40 labelled: 32 neighbours, 8 scored
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py"),
           *tiny_args(data_root, run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("kNN monitor: knn_top1") == 1  # the line of the value before training, from rank 0 alone
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    monitor = load_monitor("stl10", data_root, False, 32, 5000, 0)
    torch.manual_seed(0)  # the run's seed, then its model: its weights before the first step
    model = create_model("resnet18", 8)
    reference = [r["knn_top1"] for r in records if r["kind"] == "knn_reference"]
    assert reference == [monitor.measure(model.encoder)]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all("knn_top1" in r for r in epochs)
    model.load_state_dict(final_weights(run_dir))
    assert epochs[-1]["knn_top1"] == monitor.measure(model.encoder)

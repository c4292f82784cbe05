"""bench/gpu_check.sh on the CPU: synthetic STL10, the `cuda` marker, nvidia-smi's samples, the run summary, and the
whole script's dry run."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from bench import run_summary, stl10_synth
from data_aug.stl10 import read_stl10

REPO = Path(__file__).resolve().parents[1]


# ---------- synthetic STL10 ----------

def test_synthetic_stl10_is_read_back_with_the_right_counts_shapes_and_labels(tmp_path):
    """Written in several chunks here; tests/test_stl10.py reads conftest's one-chunk files (this writer's too)."""
    folder = stl10_synth.write_synthetic_stl10(tmp_path, n_train=7, n_test=5, n_unlabeled=11, chunk=4)
    assert folder == tmp_path / "stl10_binary"
    for name, size in stl10_synth.expected_sizes(7, 5, 11).items():
        assert (folder / name).stat().st_size == size
    images, labels = read_stl10(tmp_path, "train+unlabeled")  # the reader refuses labels outside 1..10
    assert images.shape == (18, 3, 96, 96) and (labels[:7] >= 0).all() and (labels[7:] == -1).all()
    assert read_stl10(tmp_path, "test")[0].shape == (5, 3, 96, 96)
    assert not torch.equal(images[0], images[4])  # another chunk: another shift of the random block
    folds = (folder / "fold_indices.txt").read_text().splitlines()
    assert len(folds) == 10 and sorted(int(i) for line in folds for i in line.split()) == list(range(7))
    assert len((folder / "class_names.txt").read_text().split()) == 10


def test_synthetic_stl10_is_deterministic_reused_when_complete_and_rewritten_otherwise(tmp_path):
    a = stl10_synth.write_synthetic_stl10(tmp_path / "a", 3, 2, 4, seed=1)
    b = stl10_synth.write_synthetic_stl10(tmp_path / "b", 3, 2, 4, seed=1)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in stl10_synth.expected_sizes(3, 2, 4))
    stamp = (a / "unlabeled_X.bin").stat().st_mtime_ns
    stl10_synth.write_synthetic_stl10(tmp_path / "a", 3, 2, 4, seed=1)
    assert (a / "unlabeled_X.bin").stat().st_mtime_ns == stamp
    stl10_synth.write_synthetic_stl10(tmp_path / "a", 3, 2, 6, seed=1)  # other sizes: written again
    assert read_stl10(tmp_path / "a", "unlabeled")[0].shape[0] == 6


def test_synthetic_stl10_cli_refuses_an_empty_split_in_one_line(tmp_path, capsys):
    assert stl10_synth.main([str(tmp_path), "--train", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train=0" in err


# ---------- the CUDA-only tests ----------

def test_cuda_tests_carry_the_marker_not_a_skipif_of_their_own():
    """`pytest -m cuda tests` (bench/gpu_check.sh) finds a CUDA test only through its marker."""
    own_skip = re.compile(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)")
    for path in sorted((REPO / "tests").glob("test_*.py")):
        assert not own_skip.search(path.read_text()), path.name
    assert sum(line.startswith("@pytest.mark.cuda") for line in (REPO / "tests" / "test_batches.py").open()) == 3


CUDA_TESTS = ("test_cuda_batches_never_sync_with_the_host_and_match_the_cpu_ops",
              "test_cuda_training_step_never_syncs_with_the_host", "test_compiled_view_ops_match_eager_on_cuda")


# ---------- nvidia-smi's samples and the run summary ----------

def _smi_line(when: float, util: float, memory: float) -> str:
    """A line of `nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits`."""
    return f"{datetime.datetime.fromtimestamp(when).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, {util:g}, {memory:.0f}\n"


def test_nvidia_smi_samples_are_read_in_unix_time_and_summarised(tmp_path):
    now = time.time()
    util = [10.0, 20.0, 90.0, 40.0, 55.0]
    (tmp_path / "gpu.csv").write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n" + "".join(
        _smi_line(now + i, u, 100 * i) for i, u in enumerate(util)) + "2026/12/05 01:02:03.456, [N/A], [N/A]\n")
    samples = run_summary.read_gpu_samples(tmp_path / "gpu.csv")
    assert [u for _, u, _ in samples] == util and abs(samples[0][0] - now) < 0.01
    stats = run_summary.gpu_stats(samples)
    assert stats["samples"] == 5 and stats["seconds"] == pytest.approx(4, abs=0.01)
    assert stats["memory_used_max_mib"] == 400 and stats["util_mean"] == pytest.approx(np.mean(util))
    for q in (10, 50, 90):
        assert stats[f"util_p{q}"] == pytest.approx(np.percentile(util, q))
    assert run_summary.read_gpu_samples(tmp_path / "absent.csv") == [] and run_summary.gpu_stats([]) == {"samples": 0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 2-epoch run.py run on 16 tiny STL10 images at 16 px, without validation: a few seconds."""
    import run
    from threadpoolctl import threadpool_limits

    from tests.conftest import tiny_args, write_stl10

    root = tmp_path_factory.mktemp("stl")
    write_stl10(root, n_train=6, n_test=2, n_unlabeled=10)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a loaded 2-core machine two spin-waiting ones take 5x longer
    try:
        with threadpool_limits(1):
            assert run.main(tiny_args(root, run_dir, "dataset.valid_size=0", "dataset.input_shape=(16,16,3)")) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_run_summary_of_a_real_run_places_gpu_samples_in_each_epoch(tiny_run, tmp_path):
    _, steps, epochs, _ = run_summary.read_run(tiny_run)
    assert len(epochs) == 2
    steps_per_epoch = max(r["step"] for r in steps if r["epoch"] == 0) + 1
    second_end = datetime.datetime.fromisoformat(epochs[1]["ended"]).timestamp()  # the trainer's wall clock
    assert abs(second_end - time.time()) < 600 and second_end > datetime.datetime.fromisoformat(
        epochs[0]["ended"]).timestamp()
    second_start = second_end - epochs[1]["seconds"]
    samples = [(second_start - 50 + t, 0.0, 100.0) for t in range(0, 50, 5)]  # before it: idle
    samples += [(second_start + f * (second_end - second_start), 80.0, 500.0) for f in (0.1, 0.5, 0.9)]
    samples += [(second_end + 5, 0.0, 100.0)]
    (tmp_path / "gpu.csv").write_text("".join(_smi_line(*s) for s in samples))
    summary = run_summary.summarize_run(tiny_run, tmp_path / "gpu.csv")
    first, second = summary["epochs"]
    assert second["images"] == steps_per_epoch * summary["batch_size"]
    assert second["images_per_s"] == pytest.approx(second["images"] / epochs[1]["seconds"])
    assert second["gpu_busy_percent"] == 80 and second["gpu_samples"] == 3 and second["gpu_memory_max_mib"] == 500
    assert summary["steady"]["epochs"] == [2] and summary["steady"]["gpu_busy_percent"] == 80
    assert summary["steady"]["stl10_epoch_seconds"] == pytest.approx(105_000 / second["images_per_s"])
    assert summary["gpu"]["samples"] == len(samples) and summary["gpu"]["memory_used_max_mib"] == 500
    text = run_summary.format_summary(summary, target_seconds=10, target_busy=90)
    assert "epoch 2:" in text and "GPU busy 80.0%" in text and "target: GPU busy >= 90%: MISSED (80.0%)" in text


def _write_run(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("batch_size: 512\nfp16_precision: true\namp_dtype: bfloat16\ndevice: cuda\n"
                                         "model: {base_model: resnet18}\n"
                                         "dataset: {input_shape: [96, 96, 3], augment_on: device}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')


def test_run_summary_of_a_run_cut_short_uses_its_step_records(tmp_path, capsys):
    records = [{"kind": "step", "epoch": 0, "step": s - 1, "global_step": s, "loss": 5.0, "lr": 3e-4, "top1": 0.1,
                "top5": 0.3, "images_per_s": rate} for s, rate in ((50, 1000.0), (100, 9000.0), (150, 11000.0))]
    _write_run(tmp_path / "run", records)
    (tmp_path / "gpu.csv").write_text(_smi_line(1.0, 50, 10) + _smi_line(2.0, 70, 20))
    assert run_summary.main([str(tmp_path / "run"), "--gpu-csv", str(tmp_path / "gpu.csv"), "--json",
                             str(tmp_path / "s.json"), "--target-epoch-seconds", "10"]) == 0
    out = capsys.readouterr().out
    steady = json.loads((tmp_path / "s.json").read_text())["steady"]
    assert steady["images_per_s"] == 10_000 and steady["gpu_busy_percent"] == 60  # the first record left out
    assert "no epoch finished" in out and "target: an STL10 epoch <= 10 s: MISSED (10.5 s)" in out
    assert "kNN monitor" not in out and json.loads((tmp_path / "s.json").read_text())["knn_monitor"] is None


def test_run_summary_gives_the_knn_monitors_share_of_the_training_seconds(tmp_path, capsys):
    """The epochs' seconds (their own calls inside) and the reference call's, made before epoch 1's clock starts."""
    _write_run(tmp_path / "run", [
        {"kind": "knn_reference", "epoch": 0, "global_step": 0, "knn_top1": 50.0, "knn_seconds": 1.0},
        {"kind": "step", "epoch": 0, "step": 0, "global_step": 1, "loss": 5.0, "images_per_s": 100.0},
        {"kind": "epoch", "epoch": 0, "train_loss": 5.0, "seconds": 10.0},
        {"kind": "epoch", "epoch": 1, "train_loss": 4.0, "knn_top1": 60.0, "knn_seconds": 1.5, "seconds": 9.0}])
    assert run_summary.main([str(tmp_path / "run"), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["knn_monitor"] == {
        "calls": 2, "seconds": 2.5, "seconds_per_call": 1.25, "training_seconds": 20.0, "percent": 12.5}
    assert ("kNN monitor: 2 calls, 2.5 s (1.25 s a call), 12.5 % of the training seconds (epochs + reference: 20.0 s)"
            in capsys.readouterr().out)


def test_run_summary_without_samples_says_why_and_names_a_missing_file_in_one_line(tmp_path, capsys):
    _write_run(tmp_path / "run", [{"kind": "epoch", "epoch": 0, "train_loss": 5.0, "seconds": 3.0}])
    (tmp_path / "gpu.csv").write_text("")  # what gpu_check.sh leaves where there is no nvidia-smi
    summary = run_summary.summarize_run(tmp_path / "run", tmp_path / "gpu.csv")
    assert summary["gpu_note"] == f"no GPU samples in {tmp_path / 'gpu.csv'}"
    assert "GPU busy n/a (no GPU samples in" in run_summary.format_summary(summary, target_busy=90)
    (tmp_path / "gpu.csv").write_text(_smi_line(1.0, 50, 10))  # samples, but a record without its end time
    summary = run_summary.summarize_run(tmp_path / "run", tmp_path / "gpu.csv")
    assert summary["gpu_note"] == "no 'ended' time in the epoch records to place the epochs in time"
    assert run_summary.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is missing" in err


# ---------- the script ----------

def test_gpu_check_script_parses_and_refuses_a_bad_option():
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "BUDGET_S" in shown.stdout
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--fast" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.slow
def test_gpu_check_without_a_gpu_stops_at_once_unless_dry_run(tmp_path):
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, env={**os.environ, "DATA_DIR": str(tmp_path / "data")}, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr and done.stderr.count("\n") == 1


FAKE_NVIDIA_SMI = """#!/bin/sh
# a stand-in for nvidia-smi: with -lms, a sample every 0.1 s as the real one prints them; else one line
case "$*" in
  *-lms*) while true; do echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 87, 1024"; sleep 0.1; done ;;
  *) echo "fake nvidia-smi $*" ;;
esac
"""
PARTS = ("env", "synth", "cuda_tests", "run_device", "run_device_summary", "run_cpu", "run_cpu_summary", "throughput",
         "loss_scaling", "throughput_compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_part(tmp_path):
    """`bash bench/gpu_check.sh --dry-run` end to end, with a stand-in nvidia-smi on PATH so that each run's GPU
    sampling and summary are exercised too; its cuda_tests part shows that `pytest -m cuda tests` selects exactly the
    marked tests and skips them without a GPU. The first run on a machine compiles ResNet-18 cold (minutes on 2
    cores); later ones find inductor's cache."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    outcomes = dict(line.split("\t")[:2] for line in (out / "parts.tsv").read_text().splitlines())
    assert outcomes == {part: "passed" for part in PARTS}
    summary = (out / "summary.txt").read_text()
    assert "3 skipped" in summary  # the cuda-marked tests, collected and skipped here
    cases = ElementTree.parse(out / "cuda_tests.xml").getroot().iter("testcase")
    assert {(case.get("classname"), case.get("name"), case.find("skipped").get("message")) for case in cases} == \
        {("tests.test_batches", name, "needs CUDA (marked cuda)") for name in CUDA_TESTS}
    device_run = (out / "run_device_summary.log").read_text()
    assert "epoch 2:" in device_run and "GPU busy 87.0%" in device_run and "MISSED (87.0%)" in device_run
    assert "kNN monitor: 3 calls" in device_run  # before training and after each of the 2 epochs
    assert json.loads((out / "run_cpu_summary.json").read_text())["gpu"]["util_mean"] == 87
    assert "| model alone on pre-made views (ceiling) |" in (out / "throughput_compile.md").read_text()
    assert "<!-- bench/loss_scaling.py cpu: start -->" in (out / "loss_scaling.md").read_text()
    assert "| 64 (128) |" in summary and f"wrote {out / 'loss_scaling.md'}" in (out / "loss_scaling.log").read_text()

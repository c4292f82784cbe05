"""The pieces of bench/gpu_check.sh on the CPU: synthetic STL10, the CUDA-test lister, the GPU monitor, the run summary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import cuda_tests, gpu_monitor, loss_scaling, run_summary, stl10_synth
from data_aug.stl10 import read_stl10

REPO = Path(__file__).resolve().parents[1]


# ---------- synthetic STL10 ----------

def test_synthetic_stl10_is_read_back_with_the_right_counts_shapes_and_labels(tmp_path):
    folder = stl10_synth.write_synthetic_stl10(tmp_path, n_train=7, n_test=5, n_unlabeled=11, chunk=4)
    assert folder == tmp_path / "stl10_binary"
    for name, size in stl10_synth.expected_sizes(7, 5, 11).items():
        assert (folder / name).stat().st_size == size
    for split, count in (("train", 7), ("test", 5), ("unlabeled", 11), ("train+unlabeled", 18)):
        images, labels = read_stl10(tmp_path, split)
        assert images.shape == (count, 3, 96, 96) and images.dtype == torch.uint8
        assert labels.shape == (count,) and labels.dtype == torch.int64
    _, labels = read_stl10(tmp_path, "train")
    assert labels.min() >= 0 and labels.max() <= 9
    assert (read_stl10(tmp_path, "unlabeled")[1] == -1).all()
    images, _ = read_stl10(tmp_path, "train")
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

def test_cuda_test_lister_finds_functions_methods_and_marked_modules(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\n"
        "def test_on_gpu(): pass\n"
        "@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')\n"
        "def test_without_gpu(): pass\n"
        "def test_anywhere(): pass\n"
        "class TestGroup:\n"
        "    @pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\n"
        "    def test_method(self): pass\n"
        "    def test_other(self): pass\n")
    (tmp_path / "test_b.py").write_text(
        "import pytest, torch\n"
        "pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]\n"
        "def test_all(): pass\n")
    name = tmp_path.name
    assert cuda_tests.cuda_only_tests(tmp_path) == [f"{name}/test_a.py::test_on_gpu",
                                                    f"{name}/test_a.py::TestGroup::test_method",
                                                    f"{name}/test_b.py::test_all"]


def test_cuda_test_lister_on_this_repo():
    found = cuda_tests.cuda_only_tests()
    assert "tests/test_batches.py::test_compiled_view_ops_match_eager_on_cuda" in found
    assert not any("test_config.py" in node for node in found)  # those skip *with* CUDA
    assert all((REPO / node.split("::")[0]).is_file() for node in found)


# ---------- the GPU monitor ----------

@pytest.fixture
def no_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError


def test_monitor_without_a_gpu_records_why_instead_of_failing(tmp_path, monkeypatch, no_pynvml):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with gpu_monitor.GpuMonitor(tmp_path / "gpu.csv", interval=0.01) as monitor:
        time.sleep(0.05)
    stats = json.loads((tmp_path / "gpu.json").read_text())
    assert monitor.source == stats["source"] == "none" and stats["samples"] == 0
    assert stats["note"].startswith("no GPU:") and "nvidia-smi" in stats["note"]
    assert (tmp_path / "gpu.csv").read_text().splitlines() == ["time,util_percent,memory_used_mib"]


def test_monitor_reads_a_streaming_nvidia_smi(tmp_path, monkeypatch, no_pynvml):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nwhile true; do echo \"$(date '+%Y/%m/%d %H:%M:%S.%3N'), 87, 1024\"; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    start = time.time()
    monitor = gpu_monitor.GpuMonitor(tmp_path / "gpu.csv", interval=0.02).start()
    time.sleep(0.4)
    stats = monitor.stop()
    assert stats["source"] == "nvidia-smi" and stats["samples"] >= 2, stats
    assert stats["util_mean"] == stats["util_p50"] == 87 and stats["memory_used_max_mib"] == 1024
    assert all(start - 2 < t < time.time() + 2 for t, _, _ in monitor.samples)  # nvidia-smi's clock, as Unix time


def test_monitor_polls_pynvml(tmp_path, monkeypatch):
    from types import SimpleNamespace

    readings = iter(range(10, 1000, 10))
    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: index,
                           nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=next(readings)),
                           nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=3 * 2**30))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with gpu_monitor.GpuMonitor(tmp_path / "gpu.csv", interval=0.01) as monitor:
        time.sleep(0.1)
    stats = json.loads((tmp_path / "gpu.json").read_text())
    assert stats["source"] == "pynvml" and stats["samples"] >= 2 and stats["memory_used_max_mib"] == 3072
    util = [u for _, u, _ in monitor.samples]
    assert util[:2] == [10, 20] and stats["util_mean"] == pytest.approx(np.mean(util))
    assert stats["util_p50"] == pytest.approx(np.percentile(util, 50))


def test_monitor_cli_stops_on_sigterm_and_writes_its_summary(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.modules['pynvml'] = None\n"
                                "from bench.gpu_monitor import main; sys.exit(main())", "--csv", str(tmp_path / "g.csv")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "sampling with none" in process.stdout.readline()  # started, handlers installed
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert json.loads((tmp_path / "g.json").read_text())["note"].startswith("no GPU")


# ---------- the run summary ----------

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
    steps, epochs = run_summary.read_records(tiny_run)
    ends = run_summary.epoch_end_times(tiny_run)
    assert len(epochs) == 2 and len(ends) == 2
    steps_per_epoch = max(r["step"] for r in steps if r["epoch"] == 0) + 1
    second_end = ends[2 * steps_per_epoch]
    second_start = second_end - epochs[1]["seconds"]
    samples = [(second_start - 50 + t, 0.0, 100.0) for t in range(0, 50, 5)]  # before it: idle
    samples += [(second_start + f * (second_end - second_start), 80.0, 500.0) for f in (0.1, 0.5, 0.9)]
    samples += [(second_end + 5, 0.0, 100.0)]
    (tmp_path / "gpu.csv").write_text("time,util_percent,memory_used_mib\n"
                                      + "".join(f"{t:.3f},{u:g},{m:.0f}\n" for t, u, m in samples))
    summary = run_summary.summarize_run(tiny_run, tmp_path / "gpu.csv")
    first, second = summary["epochs"]
    assert second["images"] == steps_per_epoch * summary["batch_size"]
    assert second["images_per_s"] == pytest.approx(second["images"] / epochs[1]["seconds"])
    assert second["gpu_busy_percent"] == 80 and second["gpu_samples"] == 3 and second["gpu_memory_max_mib"] == 500
    assert summary["steady"]["epochs"] == [2] and summary["steady"]["gpu_busy_percent"] == 80
    assert summary["steady"]["stl10_epoch_seconds"] == pytest.approx(105_000 / second["images_per_s"])
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
    (tmp_path / "gpu.csv").write_text("time,util_percent,memory_used_mib\n1.0,50,10\n2.0,70,20\n")
    assert run_summary.main([str(tmp_path / "run"), "--gpu-csv", str(tmp_path / "gpu.csv"), "--json",
                             str(tmp_path / "s.json"), "--target-epoch-seconds", "10"]) == 0
    out = capsys.readouterr().out
    steady = json.loads((tmp_path / "s.json").read_text())["steady"]
    assert steady["images_per_s"] == 10_000 and steady["gpu_busy_percent"] == 60  # the first record left out
    assert "no epoch finished" in out and "target: an STL10 epoch <= 10 s: MISSED (10.5 s)" in out


def test_run_summary_names_a_missing_file_in_one_line(tmp_path, capsys):
    assert run_summary.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is missing" in err


# ---------- loss_scaling --output and the script ----------

@pytest.mark.slow
def test_loss_scaling_writes_its_section_to_the_given_file(tmp_path, capsys):
    out = tmp_path / "loss.md"
    assert loss_scaling.main(["--sizes", "8", "--seed-up-to", "0", "--repeats", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "<!-- bench/loss_scaling.py cpu: start -->" in text and "| 8 (16) |" in text
    assert f"wrote {out}" in capsys.readouterr().out


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

"""Shared fixtures: tiny data sets in real on-disk formats and tiny training configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP, as run.py does (startup.py, docs/CPU.md): on a shared machine spinning OpenMP
# threads made CPU training several times slower. Only the wait policy: subprocess tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import startup  # noqa: E402
from bench.stl10_synth import write_synthetic_stl10  # noqa: E402

# e.g. a mismatched torch/torchvision pair: said in one line (pytest_configure), not as an error per test file
INSTALL_PROBLEM = startup.torch_install_problem()

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    if INSTALL_PROBLEM:
        pytest.exit(f"error: {INSTALL_PROBLEM}", returncode=startup.EXIT_ERROR)
    config.addinivalue_line("markers", "slow: an end-to-end run of several seconds (subprocesses, whole trainings); "
                                       "`pytest -m 'not slow'` is the quick inner loop")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped where torch sees none; `pytest -m cuda "
                                       "tests` runs just these (bench/gpu_check.sh does)")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (marked cuda)")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4, n_unlabeled: int = 10) -> Path:
    """Tiny STL10 files in the real binary layout, by the project's one writer of it; their folder."""
    return write_synthetic_stl10(root, n_train, n_test, n_unlabeled, reuse=False)


@pytest.fixture(autouse=True)
def _baseline_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Baseline features are cached under runs/ of the working directory: keep tests out of the checkout's."""
    import feature_eval.baselines

    monkeypatch.setattr(feature_eval.baselines, "BASELINE_CACHE", tmp_path_factory.getbasetemp() / "baselines")


@pytest.fixture
def stl10_root(tmp_path):
    """Tiny STL10 files, and each split's images and 0-based labels (None: unlabeled) decoded here from the format
    (uint8, each channel column-major, labels 1..10), oriented as torchvision's: what the reader must return."""
    folder, data = write_stl10(tmp_path), {}
    for split in ("train", "test", "unlabeled"):
        images = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        labels = None if split == "unlabeled" else np.fromfile(folder / f"{split}_y.bin", np.uint8).astype(np.int64)
        data[split] = (images, None if labels is None else labels - 1)
    return tmp_path, data


SEED_CONFIG = Path(__file__).parent / "data" / "seed_config.yaml"


def tiny_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """run.py arguments for a seconds-long CPU run on tiny STL10 files (`SEED_CONFIG`, the original repository's
    config.yaml, overridden)."""
    return ["--config", str(SEED_CONFIG), "fine_tune_from=None", f"dataset.root={root}", "dataset.name=stl10",
            "dataset.download=false", "dataset.input_shape=(32,32,3)", "batch_size=4", "epochs=2",
            "model.out_dim=8", "dataset.valid_size=0.2", "log_every_n_steps=1", "device=cpu",
            f"run_dir={run_dir}", "seed=0", *extra]


def final_weights(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Tiny STL10 files shared by the training tests (6 train, 4 test, 10 unlabeled images)."""
    root = tmp_path_factory.mktemp("stl")
    write_stl10(root, n_train=6, n_test=4, n_unlabeled=10)
    return root


@pytest.fixture(scope="session")
def straight_run(data_root, tmp_path_factory):
    """An uninterrupted 2-epoch run on `data_root`: the reference for every resume test."""
    import run

    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    assert run.main(tiny_args(data_root, run_dir)) == 0
    return run_dir


@pytest.fixture
def one_thread():
    """Run a test on one torch and one BLAS thread: tiny problems are faster so, and far faster when other
    processes share the two cores (OpenMP threads spin while they wait)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)

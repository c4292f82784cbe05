"""startup.py: the CPU policy each command sets before torch loads, and one-line warnings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import run
import startup
from simclr.trainer import Trainer, TrainingError
from tests.conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
POLICY = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter (torch not yet imported), with the OpenMP variables only as given."""
    clean = {k: v for k, v in os.environ.items() if k not in POLICY}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_policy_is_set_before_torch_and_only_where_the_user_left_it_unset():
    code = ("import os, startup\nrecord = startup.prepare_cpu({device!r}, owner='test')\n"
            "import torch\nprint(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), "
            "torch.get_num_threads(), record['set_by'], sep='|')")
    cpus = startup.available_cpus()
    out = _fresh_python(code.format(device="cpu")).stdout.strip()
    assert out == f"PASSIVE|{cpus}|{cpus}|test (OMP_WAIT_POLICY, OMP_NUM_THREADS)"
    out = _fresh_python(code.format(device="cpu"), OMP_WAIT_POLICY="ACTIVE").stdout.strip()
    assert out == f"ACTIVE|{cpus}|{cpus}|test (OMP_NUM_THREADS)"  # the user's choice stays
    out = _fresh_python(code.format(device="cpu"), OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").stdout.strip()
    assert out == "ACTIVE|1|1|you"
    assert _fresh_python(code.format(device="cuda:0")).stdout.strip().startswith("None|None|")  # the GPU computes


def test_nothing_is_set_once_torch_is_loaded(monkeypatch):
    for name in POLICY:
        monkeypatch.delenv(name, raising=False)
    assert "torch" in sys.modules  # as in this test process
    record = startup.prepare_cpu("cpu", owner="test")
    assert record["set_by"] == "nobody: torch was already imported" and not any(name in os.environ for name in POLICY)


@pytest.mark.parametrize("text, expected", [("150000 100000", 2), ("50000 100000", 1), ("max 100000", None),
                                            ("garbage", None)])
def test_available_cpus_follows_a_cgroup_quota(tmp_path, text, expected):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert startup.available_cpus(cpu_max) == (min(affinity, expected) if expected else affinity)
    assert startup.available_cpus(tmp_path / "absent") == affinity


@pytest.mark.parametrize("argv, device", [(["--checkpoint", "x"], "auto"), (["--device", "cpu"], "cpu"),
                                          (["--device=cuda:1", "--seed", "2"], "cuda:1")])
def test_device_from_argv(argv, device):
    assert startup.device_from_argv(argv) == device


def test_may_use_cpu():
    assert startup.may_use_cpu("cpu") and not startup.may_use_cpu("cuda") and not startup.may_use_cpu("mps")


def test_a_warning_is_one_line_and_the_hook_is_removed_afterwards(capsys):
    before = warnings.showwarning
    with startup.one_line_warnings():
        warnings.warn("first part\n  second part", stacklevel=1)
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    assert warnings.showwarning is before
    assert capsys.readouterr().err.splitlines() == ["warning: first part second part",
                                                    "warning: deprecated thing [DeprecationWarning]"]


def test_run_prints_warnings_on_one_line(tmp_path, capsys):
    class WarnThenFail(Trainer):
        def __init__(self, *args, **kwargs):
            warnings.warn("a thing to know\nacross two lines", stacklevel=1)
            raise TrainingError("stop here")

    argv = ["device=cpu", f"run_dir={tmp_path / 'r'}", "--config", str(ROOT / "config.yaml")]
    assert run.main(argv, trainer_class=WarnThenFail) == 1
    assert capsys.readouterr().err.splitlines() == ["warning: a thing to know across two lines", "error: stop here"]


@pytest.mark.slow
def test_a_cpu_run_records_and_logs_its_policy(data_root, tmp_path):
    """The real entry point in a fresh process: the policy is in force in torch, in meta.jsonl and in the log."""
    run_dir = tmp_path / "r"
    code = f"import sys, run\nsys.exit(run.main({tiny_args(data_root, run_dir, 'epochs=1')!r}))"
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    cpus = startup.available_cpus()
    meta = json.loads((run_dir / "meta.jsonl").read_text().splitlines()[0])
    assert meta["cpu"] == {"torch_threads": cpus, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cpus)}
    assert (f"CPU: {cpus} torch thread(s), OMP_WAIT_POLICY=PASSIVE (set by run.py (OMP_WAIT_POLICY, "
            "OMP_NUM_THREADS)") in done.stdout

"""Fault injection: SIGKILL at any moment, SIGTERM/SIGINT preemption, damaged checkpoints, full disk, locks."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
import startup
from models.loading import CheckpointLoadError
from simclr import checkpoint as ckpt
from simclr.checkpoint import CheckpointWriteError, find_resume_state, save_checkpoint
from simclr.run_dir import RunDirBusy, RunLock
from simclr.trainer import Trainer
from tests.conftest import assert_same_weights, final_weights, tiny_args
from tests.fault_runner import on_nth, signal_self

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(straight_run):
    return final_weights(straight_run)


def all_checkpoints_readable(run_dir: Path) -> None:
    for path in (run_dir / "checkpoints").glob("*.pt"):
        ckpt.read_resume_state(path)  # raises if any file on disk is damaged


def kill_at(args: list[str], marker: str, count: int) -> None:
    """Start the marked runner and SIGKILL it when `marker` has been printed `count` times."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_runner.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = 0
    try:
        for line in proc.stdout:
            if line.strip() == f"@@{marker}":
                seen += 1
                if seen == count:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.wait(timeout=60)
    assert seen == count, f"the run ended before {marker} #{count}"


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_the_same_weights(data_root, reference, straight_run, tmp_path):
    run_dir = tmp_path / "killed"
    # 3 steps per epoch; each kill lands at another moment, and each restart resumes from what is on disk.
    kill_at(tiny_args(data_root, run_dir), "step", 2)  # during epoch 1, before any checkpoint
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    kill_at(tiny_args(data_root, run_dir, "resume=auto"), "validate", 1)  # during validation of epoch 1
    kill_at(tiny_args(data_root, run_dir, "resume=auto"), "saving:last", 1)  # half-way through the first last.pt
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    kill_at(tiny_args(data_root, run_dir, "resume=auto"), "saving:last", 2)  # epoch 1 saved; killed saving epoch 2
    all_checkpoints_readable(run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["next_epoch"] == 1
    assert run.main([f"resume={run_dir}"]) == 0
    all_checkpoints_readable(run_dir)
    assert_same_weights(final_weights(run_dir), reference)
    # the killed attempts' records past each checkpoint are gone: the log reads as the uninterrupted run's
    assert metric_positions(run_dir) == metric_positions(straight_run)


def metric_positions(run_dir: Path) -> list[tuple]:
    return [(r["kind"], r.get("global_step"), r["epoch"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_position_and_resumes_mid_epoch(data_root, reference, tmp_path, capsys, signum):
    run_dir = tmp_path / "preempted"
    signal_on_fifth_step = on_nth("step", 5, signal_self(signum))  # epoch 2, step 2 of 3
    assert run.main(tiny_args(data_root, run_dir), on_event=signal_on_fifth_step) == startup.EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert f"resume={run_dir}" in out and f"stopped by {signal.Signals(signum).name} at epoch 2, step 2;" in out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 1 and state["step_in_epoch"] == 2
    steps = []
    assert run.main([f"resume={run_dir}"], on_event=lambda name: name == "step" and steps.append(name)) == 0
    assert len(steps) == 1  # only the last step of epoch 2 was left
    assert_same_weights(final_weights(run_dir), reference)
    # the same 1-based position in both messages
    resumed = capsys.readouterr().out
    assert f"resuming from {run_dir / 'checkpoints' / 'last.pt'} at epoch 2, step 2 (epochs=2)" in resumed


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_resumes(data_root, tmp_path, capsys):
    run_dir = tmp_path / "auto"
    assert run.main(tiny_args(data_root, run_dir, "resume=auto", "epochs=1")) == 0
    assert "starting fresh" in capsys.readouterr().out
    assert run.main(tiny_args(data_root, run_dir, "resume=auto", "epochs=2")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["next_epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "pickle"])
def test_damaged_checkpoint(data_root, tmp_path, capsys, damage):
    run_dir = tmp_path / "damaged"
    assert run.main(tiny_args(data_root, run_dir)) == 0
    last = run_dir / "checkpoints" / "last.pt"
    prev = run_dir / "checkpoints" / "last.prev.pt"
    assert prev.is_file()
    data = last.read_bytes()
    last.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(5000),
                      "pickle": b"\x80\x02j\x01\x00\x00\x00."}[damage])  # a memo miss: KeyError in the unpickler
    capsys.readouterr()
    assert run.main([f"resume={run_dir}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(last) in err[0] and str(prev) in err[0]
    path, state = find_resume_state(run_dir, auto=True, log=lambda m: capsys.readouterr() or print(m))
    assert path == prev and state["next_epoch"] == 1


def test_code_running_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": {}, "next_epoch": 1, "optimizer": Evil(), "config": {}}, path)
    with pytest.raises(CheckpointLoadError, match="could run code"):
        find_resume_state(tmp_path / "run", auto=False)
    assert not (tmp_path / "pwned").exists()


def test_full_disk_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "next_epoch": 1})

    def no_space(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left.*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "next_epoch": 2}, keep_previous=True, write=no_space)
    assert torch.load(path, weights_only=True)["next_epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path):
    import socket

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(RunDirBusy, match="in use"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # its owner is dead now
    assert (tmp_path / ".lock").read_text().endswith(str(os.getpid()))
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_second_run_into_a_busy_run_dir_refuses(data_root, tmp_path, capsys):
    import socket

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        run_dir = tmp_path / "busy"
        run_dir.mkdir()
        (run_dir / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        assert run.main(tiny_args(data_root, run_dir)) == 1
        assert "in use" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path):
    from simclr.run_dir import STALE_SECONDS

    lock_file = tmp_path / ".lock"
    lock_file.write_text("some-other-node 4242")  # a job on another machine: its pid cannot be checked
    with pytest.raises(RunDirBusy, match="some-other-node"):
        RunLock(tmp_path).acquire()  # refreshed just now: alive
    old = lock_file.stat().st_mtime - STALE_SECONDS - 60
    os.utime(lock_file, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()  # its owner stopped refreshing it: a requeued job takes over
    lock.release()


def test_fresh_run_never_writes_over_another_run(straight_run, data_root, capsys):
    before = (straight_run / "checkpoints" / "last.pt").read_bytes()
    assert run.main(tiny_args(data_root, straight_run)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"resume={straight_run}" in err
    assert (straight_run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_another_optimiser_is_refused(straight_run, capsys):
    assert run.main([f"resume={straight_run}", "optimizer.name=lars", "epochs=3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'adam'" in err[0] and "optimizer.name=adam" in err[0]


@pytest.mark.slow
def test_preemption_on_the_last_step_keeps_the_epoch_loss(data_root, tmp_path):
    run_dir = tmp_path / "last_step"
    signal_on_third_step = on_nth("step", 3, signal_self(signal.SIGTERM))  # the last of epoch 1's three steps
    assert run.main(tiny_args(data_root, run_dir), on_event=signal_on_third_step) == startup.EXIT_PREEMPTED
    assert run.main([f"resume={run_dir}"]) == 0
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[0]["train_loss"] > 0.5


def test_cuda_index_under_torchrun_is_refused(monkeypatch):
    from simclr.dist import DeviceError, init_distributed

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DeviceError, match="device: cuda"):
        init_distributed("cuda:0")


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_dataloader_workers_is_a_clean_stop(data_root, tmp_path):
    """SLURM and a terminal's Ctrl-C signal every process of the job, DataLoader workers included: the workers
    must leave the signal to the main process, which finishes the step, saves and exits EXIT_PREEMPTED (75)."""
    run_dir = tmp_path / "group"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_runner.py"),
                             *tiny_args(data_root, run_dir, "dataset.num_workers=2", "epochs=3")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.strip() == "@@step":  # the first step is done: the workers are up
                os.killpg(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == startup.EXIT_PREEMPTED, err[-1500:]
    assert "Continue with" in out and "Traceback" not in err
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step_in_epoch"] >= 1


def test_a_bad_image_met_by_a_worker_and_a_second_signal_end_in_one_line(tmp_path, capsys):
    from data_aug.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\ndata_aug.errors.DataError: cannot decode image "
                        "/d/a b.jpg (truncated): remove or replace the file")
    assert startup.error_text(wrapped) == "cannot decode image /d/a b.jpg (truncated): remove or replace the file"

    for error, code, expected in ((wrapped, 1, "error: cannot decode image"), (KeyboardInterrupt(), 130,
                                                                                "interrupted: stopped at once")):
        class Failing(Trainer):
            def __init__(self, *args, **kwargs):  # nothing is built: the run ends as fit() raises
                pass

            def fit(self, error=error):
                raise error

        assert run.main(["device=cpu", f"run_dir={tmp_path}"], trainer_class=Failing) == code
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1


def test_a_second_signal_during_training_names_the_run_to_resume(data_root, tmp_path, capsys):
    """Stopped at once (exit 130), the line says which run dir to resume, as the first signal's message does."""
    run_dir = tmp_path / "second signal"

    def second_signal():
        raise KeyboardInterrupt  # what the guard raises on a second SIGTERM/SIGINT

    assert run.main(tiny_args(data_root, run_dir), on_event=on_nth("step", 2, second_signal)) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"continue with python run.py 'resume={run_dir}'" in err


@pytest.mark.slow
def test_a_signal_during_validation_stops_at_the_epoch_boundary(data_root, reference, tmp_path, capsys):
    run_dir = tmp_path / "boundary"
    assert run.main(tiny_args(data_root, run_dir),
                    on_event=on_nth("validate", 1, signal_self(signal.SIGTERM))) == startup.EXIT_PREEMPTED
    assert "stopped by SIGTERM after epoch 1; checkpoint saved" in capsys.readouterr().out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 1 and state["step_in_epoch"] == 0  # no step of epoch 2 was spent
    assert run.main([f"resume={run_dir}"]) == 0
    assert_same_weights(final_weights(run_dir), reference)


def test_mid_epoch_resume_by_another_number_of_processes_warns(straight_run, tmp_path, capsys):
    from simclr.config import load_config
    from simclr.dist import init_distributed

    path = straight_run / "checkpoints" / "last.pt"
    state = {**torch.load(path, weights_only=True), "next_epoch": 1, "step_in_epoch": 1, "world_size": 2}
    config = load_config(None, [f"run_dir={tmp_path / 'r'}"], base=state["config"])
    Trainer(config, init_distributed("cpu"), (path, state))
    assert "saved in the middle of epoch 2 by 2 process(es), and 1 continue it" in capsys.readouterr().out

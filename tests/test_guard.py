"""RunGuard on its own, in one process: the lock and stale temp files, the signal handlers, the stop vote, events."""
import os
import signal

import pytest
import torch

from simclr.dist import DistInfo
from simclr.guard import Preempted, RunGuard

ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cpu"))


def test_outside_its_block_a_guard_holds_nothing_and_never_stops(tmp_path):
    guard = RunGuard(tmp_path / "run", ONE_PROCESS)
    handler = signal.getsignal(signal.SIGTERM)
    assert not guard.should_stop() and not guard.agree_to_stop() and guard.signal is None
    assert list(guard.watch([1, 2], "validate")) == [1, 2]
    assert not (tmp_path / "run").exists() and signal.getsignal(signal.SIGTERM) is handler


def test_the_block_holds_the_lock_clears_stale_temp_files_and_restores_the_handlers(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / "last.pt.1a2b3c4d.tmp"  # left by a process killed while saving
    stale.write_bytes(b"half")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with RunGuard(run_dir, ONE_PROCESS) as guard:
        assert (run_dir / ".lock").read_text().endswith(str(os.getpid()))
        assert not stale.exists()
        assert all(signal.getsignal(s) == guard._on_signal for s in before)
    assert not (run_dir / ".lock").exists()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_stops_after_the_step_and_a_second_one_at_once(tmp_path):
    messages, events = [], []
    with RunGuard(tmp_path, ONE_PROCESS, log=messages.append, on_event=events.append) as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal == "SIGTERM" and guard.should_stop()  # one process: at once
        assert messages == ["SIGTERM received: finishing this step, then saving a checkpoint"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert events == ["step", "step"] and guard.signal == "SIGTERM"  # kept for the caller after the block


def test_the_preemption_message_says_how_to_continue(tmp_path):
    guard = RunGuard(tmp_path / "my run", ONE_PROCESS)
    stop = guard.preempted("after epoch 3")
    assert isinstance(stop, Preempted)
    assert str(stop) == (f"stopped by a signal to another process after epoch 3; checkpoint saved. "
                         f"Continue with: python run.py 'resume={tmp_path / 'my run'}'")


def test_watch_tells_its_event_once_and_yields_every_batch(tmp_path):
    events = []
    guard = RunGuard(tmp_path, ONE_PROCESS, on_event=events.append)
    assert list(guard.watch(iter("abc"), "validate")) == ["a", "b", "c"] and events == ["validate"]

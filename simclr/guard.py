"""What makes a run safe to stop and to restart, kept out of the training loop.

`RunGuard` owns the run dir's lock and its heartbeat, SIGTERM/SIGINT handling, the processes' agreement on
when to stop, and the message that says how to continue; the loop only asks `guard.should_stop()`.

    with RunGuard(run_dir, info) as guard:
        for step, batch in ...:
            ...
            if guard.should_stop():
                save, then raise guard.preempted("at epoch 2, step 5")
"""
from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Callable, Iterable, Iterator

from simclr.checkpoint import remove_stale_temp_files
from simclr.dist import DistInfo, StopVote
from simclr.run_dir import RunLock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ANOTHER_PROCESS = "a signal to another process"


class Preempted(Exception):
    """The run stopped on a signal after saving a resumable checkpoint."""


class RunGuard:
    """The lock, the signal handlers and the stop vote of one run, as a context manager.

    Inside `with guard:` the main process holds `<run_dir>/.lock` (taken over from a crashed owner, refreshed
    as the run goes, so a requeued job on another machine knows it is alive) and the first SIGTERM/SIGINT only
    asks the run to stop after the step it is in; a second one raises KeyboardInterrupt (stop now). Outside it
    (a Trainer's `train_epoch` or `validate` called by hand) nothing is held and nothing asks to stop.

    Args:
        run_dir: the run directory (made by the main process on entering).
        info: this process's rank and world size; every process must create its guard (the vote's
            process group is created collectively).
        log: where the main process reports a signal.
        on_event: called with `"step"` after every training step (before the stop vote), `"validate"` as
            validation starts and `"monitor"` as the kNN monitor starts: the place where tests inject faults (a
            signal, a crash) at a chosen moment.
    """

    def __init__(self, run_dir: Path, info: DistInfo, log: Callable[[str], None] = print,
                 on_event: Callable[[str], None] | None = None):
        self.run_dir, self.info, self.log = Path(run_dir), info, log
        self.on_event = on_event or (lambda name: None)
        self.lock = RunLock(self.run_dir)
        self.vote = StopVote(info)
        self.signal: str | None = None  # the first stop signal's name, kept after the run for the caller
        self._previous_handlers: dict = {}

    def __enter__(self) -> "RunGuard":
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            remove_stale_temp_files(self.run_dir / "checkpoints")  # left by a process killed mid-write
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}
        self.lock.release()

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signal = signal.Signals(signum).name
        agreed = " (under torchrun: after the next step, when all processes agree)" if self.info.distributed else ""
        self.log(f"{self.signal} received: finishing this step, then saving a checkpoint{agreed}")

    def should_stop(self) -> bool:
        """After each training step: mark the run alive, then whether to stop here (True on every process at the
        same step). Processes agree one step late: the vote travels while the next step runs, so the step loop
        never waits for it (`StopVote`); when it says stop, no exchange is left in flight."""
        self.on_event("step")
        self.lock.refresh()
        if not self.vote.ask(self.signal is not None):
            return False
        self.vote.collect()
        return True

    def agree_to_stop(self) -> bool:
        """Whether any process was asked to stop, agreed now (a blocking exchange: between epochs only)."""
        earlier = self.vote.ask(self.signal is not None)
        if not (self.vote.collect() or earlier):
            return False
        self.signal = self.signal or ANOTHER_PROCESS
        return True

    def watch(self, batches: Iterable, event: str) -> Iterator:
        """Yield from `batches`, marking the run alive at each one (for work between steps, such as validation)."""
        self.on_event(event)
        for batch in batches:
            self.lock.refresh()
            yield batch

    def preempted(self, where: str) -> Preempted:
        """The exception that ends a run stopped `where` (e.g. "after epoch 3") once its checkpoint is saved."""
        self.signal = self.signal or ANOTHER_PROCESS
        return Preempted(f"stopped by {self.signal} {where}; checkpoint saved. {self.continue_with()}")

    def continue_with(self) -> str:
        """The command that resumes this run."""
        resume = shlex.quote(f"resume={self.run_dir}")
        if self.info.distributed:
            return (f"Continue with the same torchrun command plus {resume} (e.g. torchrun "
                    f"--nproc_per_node={self.info.world_size} run.py {resume})")
        return f"Continue with: python run.py {resume}"

"""Fault injection for the tests, through the run guard's events (`run.main(argv, on_event=...)`).

Run as a script, it is run.py with a marker line on stdout (and a short pause: FAULT_PAUSE seconds, at the
events FAULT_PAUSE_ON lists, default all) at chosen moments, so a test can kill it there. Markers: `@@step` after
each optimiser step, `@@validate` when validation starts, `@@monitor` when the kNN monitor starts, `@@saving:last`
(or `:best`) half-way through writing that checkpoint's bytes (`SlowSaveTrainer`, run.py's `trainer_class`).
Imported, `on_nth` and `signal_self` build the `on_event` of an in-process run.
"""
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import run  # noqa: E402
from simclr.trainer import Trainer  # noqa: E402

PAUSE = float(os.environ.get("FAULT_PAUSE", "0.5"))
PAUSE_ON = os.environ.get("FAULT_PAUSE_ON")  # comma-separated events to pause at (default: all)


def mark(name: str) -> None:
    print(f"@@{name}", flush=True)
    if PAUSE_ON is None or name in PAUSE_ON.split(","):
        time.sleep(PAUSE)


def on_nth(event: str, n: int, action):
    """An `on_event` that calls `action()` when `event` (`"step"`, `"validate"`, `"monitor"`) happens the n-th time."""
    seen = []

    def on_event(name: str) -> None:
        if name == event:
            seen.append(name)
            if len(seen) == n:
                action()

    return on_event


def signal_self(signum: int):
    """An action sending `signum` to this process, as SLURM's SIGTERM or a terminal's Ctrl-C would."""
    return lambda: os.kill(os.getpid(), signum)


def slow_save(obj, f) -> None:
    """torch.save that marks `saving:<name>` (and pauses) half-way through the bytes of checkpoints/<name>.pt."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    mark("saving:" + Path(f.name).name.split(".")[0])
    f.write(data[len(data) // 2:])


class SlowSaveTrainer(Trainer):
    write_checkpoint = staticmethod(slow_save)


def main() -> int:
    # the guard's events: "step", "validate", "monitor"; the trainer's checkpoint writes: "saving:<name>"
    return run.main(sys.argv[1:], on_event=mark, trainer_class=SlowSaveTrainer)


if __name__ == "__main__":
    sys.exit(main())

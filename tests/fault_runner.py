"""run.py with a marker line on stdout (and a short pause) at chosen moments, so a test can kill it there.

Markers: `@@step` after each optimiser step, `@@validate` when validation starts, `@@saving:last` (or
`:best`) half-way through writing that checkpoint's bytes. Used only by tests/test_faults.py.
"""
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import run  # noqa: E402
from simclr import checkpoint, trainer  # noqa: E402

PAUSE = float(os.environ.get("FAULT_PAUSE", "0.5"))


def mark(name: str) -> None:
    print(f"@@{name}", flush=True)
    time.sleep(PAUSE)


def main() -> int:
    step, validate, save = trainer.Trainer.train_step, trainer.Trainer.validate, torch.save

    def marked_step(self, x1, x2):
        out = step(self, x1, x2)
        mark("step")
        return out

    def marked_validate(self):
        mark("validate")
        return validate(self)

    def slow_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        mark("saving:" + Path(f.name).name.split(".")[0])
        f.write(data[len(data) // 2:])

    trainer.Trainer.train_step, trainer.Trainer.validate = marked_step, marked_validate
    checkpoint.torch.save = slow_save
    return run.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

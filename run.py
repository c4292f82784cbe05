"""SimCLR pretraining from a YAML config.

    python run.py                                   # ./config.yaml
    python run.py --config my.yaml epochs=80 model.base_model=resnet50 loss.temperature=0.2
    python run.py resume=runs/<name>                # continue an interrupted run
    torchrun --nproc_per_node=8 run.py batch_size=4096 optimizer.name=lars
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import startup
from simclr.config import Config, ConfigError, load_config  # no torch: a config error is printed in a blink

# torch and the trainer are imported in train(), after the config is valid and startup.prepare_cpu has set the
# OpenMP environment that torch reads once, as it loads.


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SimCLR pretraining", epilog="overrides: key=value or "
                                     "section.key=value, e.g. epochs=80 dataset.name=cifar10 resume=runs/<name>")
    parser.add_argument("--config", help="YAML config file (default: ./config.yaml); with resume, the run's own "
                        "config.yaml is used instead and only key=value overrides apply")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, checked like the YAML keys")
    return parser.parse_intermixed_args(argv)  # --config may come before or after the overrides


def one_line(err: Exception) -> str:
    """A user error's message; one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: list[str] | None = None, on_event=None) -> int:
    """Train as the command line says; the exit status. `on_event(name)` is called by the run's guard after every
    step (`"step"`), as validation starts (`"validate"`) and as the kNN monitor starts (`"monitor"`): the tests' way to
    inject a fault at a chosen moment."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's process rank (0 without torchrun)
    with startup.one_line_warnings():
        try:
            config = load_config(args.config or "config.yaml", args.overrides)
        except ConfigError as err:
            if rank == 0:  # every process reads the same config: under torchrun, say it once
                print(f"config error: {err}", file=sys.stderr)
            return startup.EXIT_USAGE
        cpu = startup.prepare_cpu(config.device, owner="run.py")
        problem = startup.torch_install_problem()  # a mismatched torch/torchvision pair: one line, not a traceback
        if problem:
            if rank == 0:
                print(f"error: {problem}", file=sys.stderr)
            return startup.EXIT_ERROR
        return train(args, config, rank, cpu, on_event)


def train(args: argparse.Namespace, config: Config, rank: int, cpu: dict, on_event=None) -> int:
    """Resume or start the run of a valid `config`, then evaluate it (`final_eval`); the exit status
    (`startup.EXIT_*`, docs/EXIT_CODES.md)."""
    import torch

    from data_aug.stl10 import DataError
    from models.loading import CheckpointLoadError
    from simclr.checkpoint import CheckpointWriteError
    from simclr.dist import DeviceError, StartError, init_distributed, shutdown
    from simclr.run_dir import RunDirBusy
    from simclr.guard import Preempted
    from simclr.trainer import Trainer, TrainingError, describe_resume, find_resume

    user_errors = (DataError, CheckpointLoadError, CheckpointWriteError, TrainingError, RunDirBusy, StartError)
    trainer = None
    try:
        info = init_distributed(config.device)
        log = print if info.is_main else (lambda *_: None)
        resume = find_resume(config, log) if config.resume else None
        if resume is not None:
            config = resumed_config(args, config, resume[1], log)
            unfinished, message = describe_resume(*resume, config.epochs)
            log(message)
            if not unfinished:
                return startup.EXIT_OK
        # said once the run has started (its lock held), so that it never comes before an error that stops it
        banner = startup.describe_cpu(cpu, torch.get_num_threads()) if info.device.type == "cpu" else None
        trainer = Trainer(config, info, resume, on_event, start_note=banner)
        run_dir = trainer.fit()
    except ConfigError as err:
        if rank == 0:  # every process reads the same config: under torchrun, say it once
            print(f"config error: {err}", file=sys.stderr)
        elif isinstance(err, DeviceError):  # but each finds its own device
            print(f"config error (rank {rank}): {err}", file=sys.stderr)
        return startup.EXIT_USAGE
    except user_errors as err:
        print(f"error: {one_line(err)}" if rank == 0 else f"error (rank {rank}): {one_line(err)}", file=sys.stderr)
        return startup.EXIT_ERROR
    except OSError as err:  # a file or folder the run cannot make, read or write (a run_dir it may not create, ...)
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where} (check run_dir, dataset.root and the free disk space)",
              file=sys.stderr)
        return startup.EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while the first was handled
        known = getattr(trainer, "run_dir", None)  # None: stopped before the run dir was chosen
        where = shlex.quote(f"resume={known}") if known is not None else "resume=<run dir>"
        print(("interrupted: " if rank == 0 else f"interrupted (rank {rank}): ") + "stopped at once, without saving; "
              f"checkpoints already written are kept (continue with python run.py {where})", file=sys.stderr)
        return startup.EXIT_INTERRUPTED
    except Preempted as stop:
        if info.is_main:  # under torchrun every rank stops; one message is enough
            print(str(stop))
        # Not under torchrun: it takes any other status for a failed worker and kills the others, perhaps before
        # rank 0 has said how to continue (docs/EXIT_CODES.md); its own status then comes from the launcher.
        return startup.EXIT_OK if info.distributed else startup.EXIT_PREEMPTED
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: lower batch_size, use grad_cache_chunks, or set "
              "fp16_precision: true", file=sys.stderr)
        return startup.EXIT_ERROR
    finally:
        shutdown()
    return finish(config, Path(run_dir), trainer.stop_requested) if info.is_main else startup.EXIT_OK


def finish(config: Config, run_dir: Path, stop_requested: str | None) -> int:
    """What follows a finished training: the final evaluation (`final_eval`), then the closing line; the exit status.

    Whatever fails here (the evaluation, its pictures) leaves the checkpoints as they are, and ends with
    `EXIT_ERROR` (`EXIT_INTERRUPTED` for Ctrl-C) and one line that says so and gives the command that redoes it;
    the traceback of an unexpected error goes to `<run_dir>/final_eval_error.txt`.
    """
    checkpoints = run_dir / "checkpoints"
    if config.final_eval:
        from feature_eval.evaluate import USER_ERRORS, evaluate_run, rerun_command

        again = rerun_command(run_dir)
        safe = f"training finished and its checkpoints are safe in {checkpoints}; evaluate with: {again}"
        if stop_requested:
            print(f"final_eval skipped: {stop_requested} arrived as training finished; {safe}")
        else:
            try:
                evaluate_run(run_dir)
            except KeyboardInterrupt:
                print(f"interrupted: final_eval stopped; {safe}", file=sys.stderr)
                return startup.EXIT_INTERRUPTED
            except Exception as err:  # noqa: BLE001 - none is worth the checkpoints' being doubted: see above
                detail = (one_line(err).splitlines() or [""])[0][:300]
                detail = detail if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {detail}"
                saved = "" if isinstance(err, USER_ERRORS) else _save_traceback(run_dir / "final_eval_error.txt")
                print(f"error: final_eval failed ({detail}){saved}; {safe}", file=sys.stderr)
                return startup.EXIT_ERROR
    print(f"done: run dir {run_dir} (checkpoints in {checkpoints}); "
          f"view with: tensorboard --logdir {shlex.quote(str(tensorboard_dir(run_dir)))}")
    return startup.EXIT_OK


def _save_traceback(path: Path) -> str:
    """Write the exception being handled to `path`; the note that says where it is ("" if it could not be)."""
    import traceback

    try:
        path.write_text(traceback.format_exc())
    except OSError:
        return ""
    return f" (traceback in {path})"


def tensorboard_dir(run_dir: Path) -> Path:
    """The folder to point TensorBoard at: `runs/` for a run in a folder named `runs` (the run beside the others,
    to compare), else the run dir itself (its parent may be a home folder or /tmp, full of other things)."""
    return run_dir.parent if run_dir.parent.name == "runs" else run_dir


def resumed_config(args: argparse.Namespace, config: Config, state: dict, log) -> Config:
    """The config a resumed run goes on with: the run's own, with this command's key=value overrides on top."""
    if args.config:
        log(f"note: resuming with the run's own config; --config {args.config} is not applied "
            "(key=value overrides are)")
    # it continues in the folder it was resumed from (None: the checkpoint's run dir), even if copied or moved
    here = config.run_dir if config.resume == "auto" else None
    return load_config(None, args.overrides, base={**state["config"], "resume": config.resume, "run_dir": here})


if __name__ == "__main__":
    sys.exit(main())

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
    step (`"step"`) and as validation starts (`"validate"`): the tests' way to inject a fault at a chosen moment."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's process rank (0 without torchrun)
    with startup.one_line_warnings():
        try:
            config = load_config(args.config or "config.yaml", args.overrides)
        except ConfigError as err:
            if rank == 0:  # every process reads the same config: under torchrun, say it once
                print(f"config error: {err}", file=sys.stderr)
            return 2
        cpu = startup.prepare_cpu(config.device, owner="run.py")
        return train(args, config, rank, cpu, on_event)


def train(args: argparse.Namespace, config: Config, rank: int, cpu: dict, on_event=None) -> int:
    """Resume or start the run of a valid `config`, then evaluate it (`final_eval`); the exit status."""
    import torch

    from data_aug.stl10 import DataError
    from models.loading import CheckpointLoadError
    from simclr.checkpoint import CheckpointWriteError
    from simclr.dist import DeviceError, init_distributed, shutdown
    from simclr.run_dir import RunDirBusy
    from simclr.guard import Preempted
    from simclr.trainer import Trainer, TrainingError, describe_resume, find_resume

    user_errors = (DataError, CheckpointLoadError, CheckpointWriteError, TrainingError, RunDirBusy)
    try:
        info = init_distributed(config.device)
        log = print if info.is_main else (lambda *_: None)
        resume = find_resume(config, log) if config.resume else None
        if resume is not None:
            config = resumed_config(args, config, resume[1], log)
            unfinished, message = describe_resume(*resume, config.epochs)
            log(message)
            if not unfinished:
                return 0
        if info.device.type == "cpu":
            log(startup.describe_cpu(cpu, torch.get_num_threads()))
        trainer = Trainer(config, info, resume, on_event)
        run_dir = trainer.fit()
    except ConfigError as err:
        if rank == 0:  # every process reads the same config: under torchrun, say it once
            print(f"config error: {err}", file=sys.stderr)
        elif isinstance(err, DeviceError):  # but each finds its own device
            print(f"config error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except user_errors as err:
        print(f"error: {one_line(err)}" if rank == 0 else f"error (rank {rank}): {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while the first was handled
        print(("interrupted: " if rank == 0 else f"interrupted (rank {rank}): ") + "stopped at once, without saving; "
              "checkpoints already written are kept (continue with python run.py resume=<run dir>)", file=sys.stderr)
        return 130
    except Preempted as stop:
        if info.is_main:  # under torchrun every rank stops; one message is enough
            print(str(stop))
        return 0
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: lower batch_size, use grad_cache_chunks, or set "
              "fp16_precision: true", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if info.is_main:
        if config.final_eval and trainer.stop_requested:
            print(f"final_eval skipped: {trainer.stop_requested} arrived as training finished; run it with python -m "
                  f"feature_eval.evaluate --checkpoint {shlex.quote(str(run_dir))}")
        elif config.final_eval:
            from feature_eval.evaluate import evaluate_run

            evaluate_run(run_dir)
        print(f"done: run dir {run_dir} (checkpoints in {Path(run_dir) / 'checkpoints'}); "
              f"view with: tensorboard --logdir {shlex.quote(str(Path(run_dir).parent))}")
    return 0


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

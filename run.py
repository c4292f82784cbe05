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


def main(argv: list[str] | None = None, on_event=None, trainer_class=None) -> int:
    """Train as the command line says; the exit status. `on_event(name)` is called by the run's guard after every
    step (`"step"`), as validation starts (`"validate"`) and as the kNN monitor starts (`"monitor"`): the tests' way to
    inject a fault at a chosen moment. `trainer_class` (default `simclr.trainer.Trainer`) is what the run is built
    with: the tests pass a subclass that fails, or writes checkpoints slowly, where they need it."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's process rank (0 without torchrun)
    with startup.one_line_warnings():
        try:
            config = load_config(args.config or "config.yaml", args.overrides)
        except ConfigError as err:
            return startup.report_error(err, rank)
        cpu = startup.prepare_cpu(config.device, owner="run.py")
        problem = startup.torch_install_problem()  # a mismatched torch/torchvision pair: one line, not a traceback
        if problem:
            if rank == 0:
                print(f"error: {problem}", file=sys.stderr)
            return startup.EXIT_ERROR
        return train(args, config, rank, cpu, on_event, trainer_class)


def train(args: argparse.Namespace, config: Config, rank: int, cpu: dict, on_event=None, trainer_class=None) -> int:
    """Resume or start the run of a valid `config`, then evaluate it (`final_eval`); the exit status
    (`startup.EXIT_*`, docs/EXIT_CODES.md). The user's errors end in one line each, as `startup.ERROR_POLICY` says."""
    import torch

    from simclr.dist import barrier, init_distributed, shutdown
    from simclr.guard import Preempted
    from simclr.trainer import Trainer, describe_resume, find_resume

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
        trainer = (trainer_class or Trainer)(config, info, resume, on_event, start_note=banner)
        run_dir = trainer.fit()
        barrier()  # leave together: a gloo peer that closes while the other still reads can abort it (SIGABRT)
    except Preempted as stop:
        if info.is_main:  # under torchrun every rank stops; one message is enough
            print(str(stop))
        # Not under torchrun: it takes any other status for a failed worker and kills the others, perhaps before
        # rank 0 has said how to continue (docs/EXIT_CODES.md); its own status then comes from the launcher.
        return startup.EXIT_OK if info.distributed else startup.EXIT_PREEMPTED
    except BaseException as err:  # one line for the user's errors; a bug is raised again, with its traceback
        return startup.report_error(err, rank, run_words(err, getattr(trainer, "run_dir", None)))
    finally:
        shutdown()
    return finish(config, Path(run_dir), trainer.stop_requested) if info.is_main else startup.EXIT_OK


def run_words(err: BaseException, run_dir: Path | None) -> str | None:
    """run.py's own words for the errors whose fix lies in its config or command; None: the error's message.

    `run_dir`: the run's folder, None where it stopped before one was chosen."""
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C before training started, or a second while the first was handled
        where = shlex.quote(f"resume={run_dir}") if run_dir is not None else "resume=<run dir>"
        return ("stopped at once, without saving; checkpoints already written are kept "
                f"(continue with python run.py {where})")
    if isinstance(err, OSError):  # a file or folder the run cannot make, read or write (a run_dir it may not create)
        return f"{startup.error_text(err)} (check run_dir, dataset.root and the free disk space)"
    import torch  # already loaded by train()

    if isinstance(err, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError
        return "the GPU ran out of memory: lower batch_size, use grad_cache_chunks, or set fp16_precision: true"
    return None


def finish(config: Config, run_dir: Path, stop_requested: str | None) -> int:
    """What follows a finished training: the final evaluation (`final_eval`), then the closing line; the exit status.

    Whatever fails here (the evaluation, its pictures) leaves the checkpoints as they are, and ends with
    `EXIT_ERROR` (`EXIT_INTERRUPTED` for Ctrl-C) and one line that says so and gives the command that redoes it;
    the traceback of an unexpected error goes to `<run_dir>/final_eval_error.txt`.
    """
    checkpoints = run_dir / "checkpoints"
    if config.final_eval:
        from feature_eval.evaluate import evaluate_run, rerun_command

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
                users = startup.error_rule(err) is not None  # the user's to fix (startup.ERROR_POLICY), not a bug
                detail = (startup.error_text(err).splitlines() or [""])[0][:300]
                detail = detail if users else f"{type(err).__name__}: {detail}"
                saved = "" if users else _save_traceback(run_dir / "final_eval_error.txt")
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

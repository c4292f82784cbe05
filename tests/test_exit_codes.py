"""One exit-status table for every command (docs/EXIT_CODES.md, `startup.EXIT_*`), and what each command prints first.

Pinned here: the table itself, run.py's status for each way a run ends (finished, config error, runtime error,
preempted, interrupted, a failure after training), the evaluation commands' (option, checkpoint or data, Ctrl-C),
a mismatched torch/torchvision pair at every command's start, `dataset.skip_bad_images` through the final
evaluation and the evaluation commands, and the checkpoints `keep_checkpoints` leaves.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run
import startup
from data_aug.datasets import load_split
from data_aug.errors import DataError
from feature_eval import evaluate as evaluate_module
from feature_eval import finetune as finetune_module
from simclr.config import ConfigError, load_config
from simclr.guard import Preempted
from simclr.trainer import Trainer
from tests.conftest import SEED_CONFIG, assert_same_weights, final_weights, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_table_is_the_code_s():
    text = (ROOT / "docs" / "EXIT_CODES.md").read_text()
    documented = {int(code): name for code, name in re.findall(r"^\| (\d+) \| `(EXIT_[A-Z]+)` \|", text, re.M)}
    in_code = {value: name for name, value in vars(startup).items() if name.startswith("EXIT_")}
    assert documented == in_code and len(in_code) == 5
    assert "docs/EXIT_CODES.md" in (ROOT / "README.md").read_text()


# ---- the one error policy: startup.ERROR_POLICY, for run.py, the evaluation commands and export -----------------

class _NewUserError(RuntimeError):
    """A kind of error with no row in the table until a test gives it one."""


def test_every_row_of_the_error_policy_names_an_error_class():
    assert "startup.ERROR_POLICY" in (ROOT / "docs" / "EXIT_CODES.md").read_text()
    for key in startup.ERROR_POLICY:
        module, name = key.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, BaseException) and f"{cls.__module__}.{cls.__qualname__}" == key, key


def test_an_error_is_said_once_or_by_each_rank_as_its_row_says_and_a_bug_is_raised_again(capsys):
    from simclr.dist import DeviceError

    assert startup.report_error(ConfigError("batch_size = 9: too big"), rank=1) == startup.EXIT_USAGE
    assert capsys.readouterr().err == ""  # every rank reads the same config: rank 0 says it
    assert startup.report_error(DeviceError("device: cuda is missing"), rank=1) == startup.EXIT_USAGE  # its own row
    assert capsys.readouterr().err == "config error (rank 1): device: cuda is missing\n"

    class DamagedLabels(DataError):  # no row of its own: its base class's
        pass

    assert startup.report_error(DamagedLabels("labels.bin is short"), rank=2) == startup.EXIT_ERROR
    assert startup.report_error(PermissionError(13, "Permission denied", "/x"), text="said here") == startup.EXIT_ERROR
    assert capsys.readouterr().err.splitlines() == ["error (rank 2): labels.bin is short", "error: said here"]
    bug = ValueError("a bug")
    with pytest.raises(ValueError) as raised:
        startup.report_error(bug)
    assert raised.value is bug and capsys.readouterr().err == ""


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("command", ["run.py", "evaluate", "export"])
def test_every_command_follows_the_one_table(command, monkeypatch, tmp_path, capsys):
    from pretrained_models import export as export_module

    def invoke(error) -> int:
        if command == "run.py":
            class Failing(Trainer):
                __init__ = _raise(error)

            argv = ["--config", str(ROOT / "config.yaml"), "device=cpu", f"run_dir={tmp_path / 'r'}"]
            return run.main(argv, trainer_class=Failing)
        if command == "evaluate":
            monkeypatch.setattr(evaluate_module, "evaluate", _raise(error))
            return evaluate_module.main(["--checkpoint", "x"])
        monkeypatch.setattr(export_module, "export_package", _raise(error))
        return export_module.main(["x", "--packages-dir", str(tmp_path / "p")])

    key = f"{__name__}._NewUserError"  # a row added to the table reaches every command
    monkeypatch.setitem(startup.ERROR_POLICY, key, startup.ErrorRule(startup.EXIT_USAGE, "new error"))
    for error, code, first in ((_NewUserError("fix this"), startup.EXIT_USAGE, "new error: fix this"),
                               (PermissionError(13, "Permission denied", "/x/out"), startup.EXIT_ERROR,
                                "error: Permission denied: /x/out")):
        status = invoke(error)
        lines = capsys.readouterr().err.splitlines()
        assert status == code and len(lines) == 1 and lines[0].startswith(first), (command, lines)
    monkeypatch.delitem(startup.ERROR_POLICY, key)  # without its row it is a bug: raised, with its traceback
    with pytest.raises(_NewUserError):
        invoke(_NewUserError("fix this"))


def test_run_py_words_the_gpu_s_memory_and_a_full_disk_in_its_own_keys(tmp_path, capsys):
    for error, said in ((torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                         "error: the GPU ran out of memory: lower batch_size, use grad_cache_chunks, or set "
                         "fp16_precision: true"),
                        (OSError(28, "No space left on device", "/r/x.pt"),
                         "error: No space left on device: /r/x.pt (check run_dir, dataset.root and the free disk "
                         "space)")):
        class Failing(Trainer):
            __init__ = _raise(error)

        argv = ["--config", str(ROOT / "config.yaml"), "device=cpu", f"run_dir={tmp_path / 'r'}"]
        assert run.main(argv, trainer_class=Failing) == startup.EXIT_ERROR
        assert capsys.readouterr().err.splitlines() == [said]


# ---- run.py: each way a run ends -------------------------------------------------------------------------------

@pytest.mark.parametrize("raised, code, first", [
    (None, startup.EXIT_OK, "done: run dir"),
    (ConfigError("batch_size = 9: too big"), startup.EXIT_USAGE, "config error: batch_size"),
    (DataError("cannot decode image x.png"), startup.EXIT_ERROR, "error: cannot decode image"),
    (PermissionError(13, "Permission denied", "/x/run"), startup.EXIT_ERROR, "error: Permission denied: /x/run"),
    (Preempted("stopped by SIGTERM at epoch 1, step 2; checkpoint saved."), startup.EXIT_PREEMPTED, "stopped by"),
    (KeyboardInterrupt(), startup.EXIT_INTERRUPTED, "interrupted: stopped at once"),
])
def test_run_py_keeps_to_the_table(tmp_path, capsys, raised, code, first):
    class Ends(Trainer):  # builds nothing; its fit ends as the row says
        stop_requested = None

        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            if raised is not None:
                raise raised
            return tmp_path / "r"

    argv = ["--config", str(ROOT / "config.yaml"), "device=cpu", f"run_dir={tmp_path / 'r'}"]
    assert run.main(argv, trainer_class=Ends) == code
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(first), lines  # nothing before the message: no CPU line


def test_a_config_error_is_2_before_torch_would_matter(capsys):
    assert run.main(["--config", str(ROOT / "config.yaml"), "batch_sise=4"]) == startup.EXIT_USAGE
    assert capsys.readouterr().err.startswith("config error: unknown key batch_sise")  # typed now: no file named


def test_a_mistake_in_the_yaml_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("batch_size: 8\nbogus_key: 3\n")
    for overrides in ([], ["epochs=2"]):  # a valid override does not hide which file holds the mistake
        assert run.main(["--config", str(config), *overrides]) == startup.EXIT_USAGE
        assert capsys.readouterr().err.startswith(f"config error: in {config}: unknown key bogus_key")


@pytest.mark.parametrize("error, reason", [(DataError("cannot decode image /d/x.png (truncated)"), "cannot decode"),
                                           (RuntimeError("sklearn broke\nsecond line"), "RuntimeError: sklearn")])
def test_a_failure_after_training_is_one_line_with_the_command_and_not_0(monkeypatch, tmp_path, capsys, error,
                                                                         reason):
    def fail(run_dir, log=print):
        raise error

    monkeypatch.setattr(evaluate_module, "evaluate_run", fail)
    config = load_config(ROOT / "config.yaml", ["final_eval=true"])
    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    assert run.finish(config, run_dir, stop_requested=None) == startup.EXIT_ERROR
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and "done:" not in printed.out
    assert lines[0].startswith(f"error: final_eval failed ({reason}") and "checkpoints are safe" in lines[0]
    assert lines[0].endswith(evaluate_module.rerun_command(run_dir)) and f"'{run_dir}'" in lines[0]
    if isinstance(error, DataError):
        assert not (run_dir / "final_eval_error.txt").exists()
    else:  # an unexpected error: its traceback is kept for a bug report, off the screen
        assert f"traceback in {run_dir / 'final_eval_error.txt'}" in lines[0]
        assert "RuntimeError: sklearn broke" in (run_dir / "final_eval_error.txt").read_text()


def test_ctrl_c_during_the_final_evaluation_is_130_and_says_the_checkpoints_are_safe(monkeypatch, tmp_path, capsys):
    def interrupted(run_dir, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate_run", interrupted)
    config = load_config(ROOT / "config.yaml", ["final_eval=true"])
    assert run.finish(config, tmp_path, stop_requested=None) == startup.EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoints are safe" in err and "feature_eval.evaluate" in err


@pytest.mark.parametrize("run_dir, logdir", [("runs/quickstart", "runs"), ("/tmp/somewhere/my_run", None),
                                             ("experiments/a", None)])
def test_tensorboard_is_pointed_at_runs_or_at_the_run_itself(tmp_path, capsys, run_dir, logdir):
    config = load_config(ROOT / "config.yaml")
    assert run.finish(config, Path(run_dir), stop_requested=None) == startup.EXIT_OK
    assert capsys.readouterr().out.strip().endswith(f"tensorboard --logdir {logdir or run_dir}")


def test_evaluate_cli_keeps_to_the_table(monkeypatch, tmp_path, capsys):
    assert evaluate_module.main(["--checkpoint", str(tmp_path / "none.pt")]) == startup.EXIT_ERROR
    assert evaluate_module.main(["--checkpoint", "x", "--classifiers", "svm"]) == startup.EXIT_USAGE
    with pytest.raises(SystemExit) as stop:
        evaluate_module.main(["--checkpoint", "x", "--batch-size", "0"])
    assert stop.value.code == startup.EXIT_USAGE

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    capsys.readouterr()
    assert evaluate_module.main(["--checkpoint", "x"]) == startup.EXIT_INTERRUPTED
    assert capsys.readouterr().err.startswith("interrupted: feature_eval.evaluate stopped")


def test_finetune_cli_and_preview_keep_to_the_table(tmp_path, capsys):
    assert finetune_module.main(["--checkpoint", str(tmp_path / "none.pt")]) == startup.EXIT_ERROR
    from simclr import preview

    base = ["--config", str(SEED_CONFIG), "--out", str(tmp_path / "p.png"), "fine_tune_from=None"]
    assert preview.main(base + ["batch_sise=4"]) == startup.EXIT_USAGE
    assert preview.main(base + ["dataset.name=imagefolder", f"dataset.root={tmp_path / 'none'}"]) == startup.EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err


# ---- what is printed first ----------------------------------------------------------------------------------------

def test_a_missing_image_folder_root_is_named_as_missing(tmp_path):
    with pytest.raises(DataError, match=r"ImageFolder root \S*nowhere does not exist .*set dataset.root"):
        load_split("imagefolder", tmp_path / "nowhere", "train")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_split("imagefolder", tmp_path / "file", "train")


def test_the_cpu_line_comes_after_an_error_that_stops_the_run_never_before(tmp_path, capsys):
    class NoData(Trainer):
        def __init__(self, *args, **kwargs):
            raise DataError("ImageFolder root /x does not exist")

    argv = ["--config", str(ROOT / "config.yaml"), "device=cpu", f"run_dir={tmp_path}"]
    assert run.main(argv, trainer_class=NoData) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith("error: ImageFolder root")


def _shim(tmp_path: Path) -> dict:
    """An environment whose torchvision fails as one built for another torch does (a package on PYTHONPATH that
    raises torchvision's own error, with the metadata of torchvision 0.20.1): nothing installed is touched."""
    shim = tmp_path / "shim"
    (shim / "torchvision").mkdir(parents=True)
    (shim / "torchvision" / "__init__.py").write_text(
        "import torch\nraise RuntimeError('operator torchvision::nms does not exist')\n")
    (shim / "torchvision-0.20.1.dist-info").mkdir()
    (shim / "torchvision-0.20.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.20.1\n")
    return {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_mismatched_torchvision_is_one_line_at_every_command_start(tmp_path):
    env = _shim(tmp_path)
    wanted = startup.matching_pair_command(torch.__version__, "0.20.1")
    commands = [["run.py", "--config", "configs/quickstart.yaml", f"run_dir={tmp_path / 'r'}"],
                ["-m", "feature_eval.evaluate", "--checkpoint", "x"],
                ["-m", "feature_eval.finetune", "--checkpoint", "x"],
                ["-m", "pretrained_models.export", "x"],
                ["-m", "simclr.preview", "--out", str(tmp_path / "p.png")],
                ["-m", "bench.throughput", "--help"],
                ["-m", "bench.learning", "--help"],
                ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_loss.py"]]
    for command in commands:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == startup.EXIT_ERROR, (command, said)
        assert len(said) == 1 and "Traceback" not in said[0], (command, said)
        assert f"torch {torch.__version__} and torchvision 0.20.1 do not work together" in said[0], said
        assert "operator torchvision::nms does not exist" in said[0] and said[0].endswith(wanted), said


@pytest.mark.parametrize("torch_version, torchvision, command", [
    ("2.14.1+cpu", "0.20.1", "pip install torch==2.14.1 torchvision==0.29.1 --index-url "
                             "https://download.pytorch.org/whl/cpu"),
    ("2.5.1", "0.19.0+cpu", "pip install torch==2.5.1 torchvision==0.20.1"),
    ("2.5.1+cu124", "0.20.1+cpu", "pip install --force-reinstall torch==2.5.1 torchvision==0.20.1 --index-url "
                                  "https://download.pytorch.org/whl/cu124"),  # the same numbers, other builds
    ("2.0.1", "0.16.0", "pip install torch==2.0.1 torchvision==0.15.2"),
    ("1.13.1", "0.15.0", "pip install --force-reinstall torch torchvision (both from the same index)"),
])
def test_the_pair_that_matches_comes_from_pytorch_s_table(torch_version, torchvision, command):
    assert startup.matching_pair_command(torch_version, torchvision) == command


# ---- dataset.skip_bad_images, end to end -------------------------------------------------------------------------

@pytest.fixture
def folder_with_a_truncated_png(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 7), ("test", 3)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    for split in ("train", "test"):  # one damaged file where pretraining reads and one where only evaluation does
        whole = (root / split / "a" / "0.png").read_bytes()
        (root / split / "a" / "0.png").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.mark.slow
def test_skip_bad_images_reaches_the_final_evaluation_and_the_evaluation_commands(folder_with_a_truncated_png,
                                                                                  tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "RUN_CLASSIFIERS", ("knn",))  # seconds; the classifiers are not the point
    monkeypatch.setattr(evaluate_module, "RUN_BASELINES", ())
    run_dir = tmp_path / "run"
    args = ["--config", str(SEED_CONFIG), "fine_tune_from=None", "dataset.name=imagefolder",
            f"dataset.root={folder_with_a_truncated_png}", "dataset.input_shape=(16,16,3)", "batch_size=4",
            "epochs=1", "model.out_dim=8", "dataset.valid_size=0.2", "device=cpu", f"run_dir={run_dir}",
            "final_eval=true", "dataset.skip_bad_images=true"]
    assert run.main(args) == startup.EXIT_OK, capsys.readouterr().err
    assert (run_dir / "eval" / "last_imagefolder.json").is_file()
    capsys.readouterr()
    # the commands read the run's setting; --no-skip-bad-images overrides it and the advice names the option
    common = ["--checkpoint", str(run_dir), "--device", "cpu", "--no-plots", "--classifiers", "knn"]
    assert evaluate_module.main(common) == startup.EXIT_OK
    assert evaluate_module.main(common + ["--no-skip-bad-images"]) == startup.EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and "pass --skip-bad-images" in err and "dataset.skip_bad_images" not in err
    tune = ["--checkpoint", str(run_dir), "--device", "cpu", "--label-fraction", "1.0", "--epochs", "1", "--lrs", "0.1"]
    assert finetune_module.main(tune + ["--no-skip-bad-images"]) == startup.EXIT_ERROR
    assert finetune_module.main(tune + ["--skip-bad-images"]) == startup.EXIT_OK


# ---- keep_checkpoints ----------------------------------------------------------------------------------------------

def test_keep_checkpoints_is_checked_and_the_quickstart_keeps_last_pt_alone():
    with pytest.raises(ConfigError, match="keep_checkpoints = 'best': allowed: all, last_and_best, last"):
        load_config(ROOT / "config.yaml", ["keep_checkpoints=best"])
    assert load_config(ROOT / "configs" / "quickstart.yaml").keep_checkpoints == "last"
    assert load_config(ROOT / "config.yaml").keep_checkpoints == "all"


@pytest.mark.slow
def test_keep_checkpoints_last_still_resumes_to_the_same_weights(data_root, straight_run, tmp_path):
    files = lambda run_dir: sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # noqa: E731
    assert files(straight_run) == ["best.pt", "last.prev.pt", "last.pt"]
    both = tmp_path / "both"
    assert run.main(tiny_args(data_root, both, "keep_checkpoints=last_and_best")) == 0
    assert files(both) == ["best.pt", "last.pt"]
    # last.pt alone is what resume needs: one epoch, then a second, ends where two epochs in one go do
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run.main(tiny_args(data_root, straight, "keep_checkpoints=last", "optimizer.cosine=false")) == 0
    assert run.main(tiny_args(data_root, split, "keep_checkpoints=last", "optimizer.cosine=false", "epochs=1")) == 0
    assert files(split) == ["last.pt"]
    assert run.main([f"resume={split}", "epochs=2"]) == 0
    assert files(split) == files(straight) == ["last.pt"]
    assert_same_weights(final_weights(split), final_weights(straight))

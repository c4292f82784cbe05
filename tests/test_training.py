"""End-to-end training on tiny STL10 files: smoke run, run directory, resume equality, fine-tuning, errors."""
import json
import shutil

import pytest
import torch
import yaml

import run
from loss.nt_xent import NTXentLoss
from models.loading import load_weights_only
from models.resnet_simclr import create_model
from simclr.checkpoint import save_checkpoint
from simclr.config import config_to_dict, load_config
from simclr.dist import init_distributed
from simclr.optim import warmup_cosine
from simclr.trainer import Trainer, find_resume
from tests.conftest import assert_same_weights, final_weights, tiny_args
from tests.fault_runner import on_nth, signal_self


def test_run_directory_contents(straight_run, capsys):
    files = {p.name for p in straight_run.iterdir()}
    assert {"config.yaml", "meta.jsonl", "metrics.jsonl", "checkpoints"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files)
    config = yaml.safe_load((straight_run / "config.yaml").read_text())
    assert config["batch_size"] == 4 and config["dataset"]["input_shape"] == [32, 32, 3]
    meta = json.loads((straight_run / "meta.jsonl").read_text().splitlines()[0])
    assert meta["git_commit"] and meta["torch"] == torch.__version__
    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all("valid_loss" in r and "valid_top1" in r for r in epochs)
    assert steps and all({"loss", "lr", "top1", "top5", "images_per_s"} <= set(r) for r in steps)
    state = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 2 and state["version"] == 1
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert {"optimizer", "scheduler", "scaler", "config", "rng_cpu"} <= set(state)
    assert (straight_run / "checkpoints" / "best.pt").is_file()
    assert not (straight_run / ".lock").exists()


def test_learning_rate_follows_cosine_per_step(straight_run):
    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "step"]  # each step's own rate, logged every step here
    assert lrs == pytest.approx([3e-4 * warmup_cosine(t, 6, 0) for t in range(6)], rel=1e-12)  # 2 epochs x 3 steps
    assert lrs[0] == pytest.approx(3e-4) and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(data_root, straight_run, tmp_path):
    run_dir = tmp_path / "interrupted"

    def crash():
        raise KeyboardInterrupt

    crash_in_second_epoch = on_nth("step", 4, crash)  # 3 steps per epoch: the first step of epoch 2
    assert run.main(tiny_args(data_root, run_dir), on_event=crash_in_second_epoch) == 130  # as a second Ctrl-C
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["next_epoch"] == 1
    assert run.main(["resume=" + str(run_dir)]) == 0
    assert_same_weights(final_weights(run_dir), final_weights(straight_run))


def test_resuming_a_finished_run_says_so_and_neither_trains_nor_evaluates(straight_run, tmp_path, capsys):
    finished = tmp_path / "finished"
    shutil.copytree(straight_run, finished)
    before = {name: (finished / name).read_bytes() for name in ("meta.jsonl", "metrics.jsonl", "checkpoints/last.pt")}
    assert run.main([f"resume={finished}", "final_eval=true"]) == 0
    out = capsys.readouterr().out
    assert "nothing to resume" in out and "has already trained 2 epoch(s) (epochs=2)" in out
    assert f"python -m feature_eval.evaluate --checkpoint {finished}" in out and "resuming from" not in out
    assert "final_eval" not in out and not (finished / "eval").exists()
    assert {name: (finished / name).read_bytes() for name in before} == before  # no new start recorded, no training


@pytest.mark.slow
def test_a_log_that_is_not_a_terminal_gets_no_progress_bars(data_root, tmp_path, capsys):
    assert run.main(tiny_args(data_root, tmp_path / "r", "epochs=1")) == 0
    captured = capsys.readouterr()  # pytest's capture is not a TTY, as a log file or a notebook's output
    assert "it/s" not in captured.err + captured.out and "epoch 1/1:" in captured.out
    assert "\r" not in captured.err + captured.out


@pytest.mark.slow
def test_one_epoch_then_resume_to_two_with_constant_lr(data_root, tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    assert run.main(tiny_args(data_root, straight, "optimizer.cosine=false")) == 0
    assert run.main(tiny_args(data_root, split, "optimizer.cosine=false", "epochs=1")) == 0
    assert run.main([f"resume={split / 'checkpoints' / 'last.pt'}", "epochs=2"]) == 0
    assert_same_weights(final_weights(split), final_weights(straight))


def test_fine_tune_from_initialises_weights_only(data_root, straight_run, tmp_path):
    config = load_config(None, tiny_args(data_root, tmp_path / "ft")[2:] + [f"fine_tune_from={straight_run}"])
    trainer = Trainer(config, init_distributed("cpu"))
    assert_same_weights(trainer.model.state_dict(), final_weights(straight_run))
    assert trainer.next_epoch == 0 and not trainer.optimizer.state


@pytest.mark.parametrize("head_layers, head_bn", [(2, True), (3, False)])
def test_fine_tune_from_another_head_layout_keeps_the_whole_head_fresh(tmp_path, head_layers, head_bn):
    # The default head's first Linear has the shape of this head's first Linear: loading it alone would make a
    # head that is half one model's, half fresh. The encoder loads; the head is the fresh one, whole.
    torch.manual_seed(0)
    source = create_model("resnet18", 16)
    save_checkpoint(tmp_path / "src.pt", {"model": source.state_dict(), "config": {}, "next_epoch": 1})
    torch.manual_seed(1)
    model = create_model("resnet18", 16, head_layers=head_layers, head_bn=head_bn)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    load_weights_only(model, str(tmp_path / "src.pt"), lines.append)
    state = model.state_dict()
    assert all(torch.equal(state[k], source.state_dict()[k]) for k in state if k.startswith("encoder."))
    assert all(torch.equal(state[k], fresh[k]) for k in state if k.startswith("head."))
    assert lines == [f"initialised weights from {tmp_path / 'src.pt'} (projection head kept fresh: other shape)"]


def test_fine_tune_from_unknown_name_is_a_clear_error(data_root, tmp_path, capsys):
    assert run.main(tiny_args(data_root, tmp_path / "x", "fine_tune_from=resnet-18_8O-epochs")) == 1  # a typo
    err = capsys.readouterr().err
    assert "resnet-18_8O-epochs" in err and "Traceback" not in err and err.count("\n") == 1


def test_the_seed_config_with_its_missing_pretrained_model_trains_from_scratch_with_a_warning(data_root, tmp_path,
                                                                                               capsys):
    """The original repository's (sthalles/SimCLR) config.yaml says fine_tune_from: 'resnet-18_80-epochs', a model
    it shipped and this repository does not."""
    args = [a for a in tiny_args(data_root, tmp_path / "seed", "epochs=1") if a != "fine_tune_from=None"]
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert "'resnet-18_80-epochs' is one of the original repository's pretrained models" in out
    assert "training from scratch" in out


def test_a_seed_model_name_that_exists_here_is_never_replaced_by_training_from_scratch(data_root, tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "resnet-18_80-epochs").mkdir(parents=True)  # a run of that name, not finished
    args = [a for a in tiny_args(data_root, tmp_path / "seed", "epochs=1") if a != "fine_tune_from=None"]
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert "fine_tune_from = 'resnet-18_80-epochs'" in err and "no checkpoints/last.pt" in err


@pytest.mark.slow
def test_a_stop_signal_as_training_finishes_skips_the_final_evaluation(data_root, tmp_path, capsys):
    import signal

    # during the last epoch's validation: training is already done
    late = on_nth("validate", 1, signal_self(signal.SIGTERM))
    assert run.main(tiny_args(data_root, tmp_path / "late", "epochs=1", "final_eval=true"), on_event=late) == 0
    out = capsys.readouterr().out
    assert "final_eval skipped: SIGTERM" in out and "done: run dir" in out
    assert not (tmp_path / "late" / "eval").exists()


def test_non_finite_loss_stops_with_a_hint(data_root, tmp_path, monkeypatch, capsys):
    def nan_loss(self, z_i, z_j, topk=(1, 5), negatives=None):
        loss = (z_i.sum() + z_j.sum()) * float("nan")
        return loss, {"top1": loss.detach(), "top5": loss.detach()}

    monkeypatch.setattr(NTXentLoss, "loss_and_accuracy", nan_loss)
    assert run.main(tiny_args(data_root, tmp_path / "nan")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) found at epoch 1, step 1 " in err and "lr" in err  # 1-based, as the progress bar
    assert "no checkpoint was written" in err
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def test_a_validation_hold_out_of_one_image_is_a_config_error(tmp_path, capsys):
    from tests.conftest import write_stl10

    write_stl10(tmp_path / "three", n_train=1, n_test=2, n_unlabeled=2)  # 3 images: 2 to train leave 1 to validate
    assert run.main(tiny_args(tmp_path / "three", tmp_path / "v", "batch_size=2")) == 2
    err = capsys.readouterr().err
    assert "dataset.valid_size" in err and "1 of 3" in err


def test_batch_larger_than_data_is_a_config_error(data_root, tmp_path, capsys):
    assert run.main(tiny_args(data_root, tmp_path / "big", "batch_size=64")) == 2
    assert "batch_size" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert run.main(tiny_args(tmp_path / "empty", tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "train_X.bin" in err and "dataset.download" in err


def test_resume_of_a_copied_run_stays_in_the_copy_and_ignores_another_config_file(data_root, straight_run, tmp_path, capsys):
    finished = shutil.copytree(straight_run, tmp_path / "finished")
    other = tmp_path / "other.yaml"
    other.write_text("epochs: 7\n")
    meta_lines = len((straight_run / "meta.jsonl").read_text().splitlines())
    # one more epoch than it has (a finished run has nothing to resume and writes nothing)
    assert run.main(["--config", str(other), "resume=" + str(finished), "epochs=3"]) == 0
    assert f"--config {other} is not applied" in capsys.readouterr().out
    # a copied run continues in the copy, not in the folder named by its saved config
    assert len((finished / "meta.jsonl").read_text().splitlines()) == meta_lines + 1
    assert len((straight_run / "meta.jsonl").read_text().splitlines()) == meta_lines
    assert torch.load(finished / "checkpoints" / "last.pt", weights_only=True)["config"]["epochs"] == 3  # not 7


def test_float16_resume_of_a_run_saved_without_a_scaler_starts_a_fresh_scale(data_root, straight_run, tmp_path):
    """A CPU or bfloat16 run saves an empty scaler state; resuming it under float16 (CUDA) must not fail."""
    state = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"] == {}
    config = load_config(None, tiny_args(data_root, tmp_path / "fp16")[2:])
    trainer = Trainer(config, init_distributed("cpu"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # enabled, as float16 on CUDA makes it
    trainer.restore(state)
    assert trainer.scaler.get_scale() == 2.0**10 and trainer.next_epoch == 2


@pytest.mark.slow
def test_mixed_precision_on_cpu_uses_bfloat16(data_root, tmp_path, capsys):
    assert run.main(tiny_args(data_root, tmp_path / "amp", "fp16_precision=true", "epochs=1")) == 0
    assert "bfloat16" in capsys.readouterr().out


@pytest.mark.slow
def test_float16_overflow_steps_are_skipped_counted_and_logged(data_root, tmp_path, monkeypatch):
    """With a GradScaler, an overflowing step is skipped (weights unchanged), counted, and the run goes on."""
    original = NTXentLoss.loss_and_accuracy
    calls, before, compared = [], {}, []

    def overflow_once(self, z_i, z_j, topk=(1, 5), negatives=None):
        loss, acc = original(self, z_i, z_j, topk, negatives)
        calls.append(1)
        return (loss * float("inf"), acc) if len(calls) == 2 else (loss, acc)

    def after_step(name):
        weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        if name == "step" and len(calls) == 1:
            before.update(weights)  # after the first step: the weights the second one starts from
        elif name == "step" and len(calls) == 2:
            # the overflowing step changed no weight (BatchNorm's running statistics move in any forward)
            assert_same_weights(weights, before)
            compared.append(name)

    config = load_config(None, tiny_args(data_root, tmp_path / "fp16")[2:] + ["epochs=1"])
    trainer = Trainer(config, init_distributed("cpu"), on_event=after_step)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what float16 on CUDA uses
    monkeypatch.setattr(NTXentLoss, "loss_and_accuracy", overflow_once)
    trainer.fit()
    assert compared  # the overflowing step was checked
    assert trainer.skipped_steps.item() == 1
    records = [json.loads(line) for line in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["kind"] == "step"][-1] == 1
    assert torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", weights_only=True)["skipped_steps"] == 1
    resumed = load_config(None, ["epochs=2"], base={**config_to_dict(config), "resume": str(tmp_path / "fp16")})
    assert Trainer(resumed, init_distributed("cpu"), find_resume(resumed)).skipped_steps.item() == 1  # whole-run count


@pytest.mark.slow
def test_training_flushes_denormals_and_gives_ieee_floats_back(data_root, tmp_path):
    """Denormal floats made CPU steps 5-10x slower; they are flushed during fit() only."""
    seen = []

    def after_step(name):
        seen.append(torch.tensor(1e-40).item())  # 0.0 while denormals are flushed

    assert run.main(tiny_args(data_root, tmp_path / "run", "epochs=1"), on_event=after_step) == 0
    assert seen and all(value == 0.0 for value in seen)
    assert torch.tensor(1e-40).item() != 0.0


def test_a_trainer_is_freed_with_its_last_reference_not_at_the_next_garbage_collection(tmp_path):
    """No reference cycle (the guard once held the bound `Trainer.log`): a process that trains one model after
    another (bench.learning, a notebook, this suite) holds one at a time, not every one until a collection."""
    import gc
    import weakref

    config = load_config(None, ["dataset.name=digits", "model.out_dim=8", "batch_size=2", "device=cpu",
                                "dataset.input_shape=(16,16,3)", f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, init_distributed("cpu"))
    trainer.train_step(*next(iter(trainer.train_batches.batches(0))))
    freed = [weakref.ref(trainer), weakref.ref(trainer.model), weakref.ref(trainer.optimizer)]
    gc.disable()
    try:
        del trainer
        assert [ref() for ref in freed] == [None, None, None]
    finally:
        gc.enable()

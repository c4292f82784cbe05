"""fp16_precision: auto (simclr.precision): the CPU flags it reads, what it picks where, the config key's values and
errors, and a training step under it; the original repository's keys keep their meaning."""
from __future__ import annotations

import math

import pytest
import torch

from simclr.config import ConfigError, config_from_dict, config_to_dict, load_config
from simclr.precision import choose_precision, native_bf16_flags

pytestmark = pytest.mark.usefixtures("one_thread")

ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu avx2 avx512f avx512bw\nbugs\t\t: amx_bf16_not_a_flag avx512_bf16\n"


@pytest.mark.parametrize("cpuinfo, flags", [(ZEN4, ["avx512_bf16"]), (SAPPHIRE_RAPIDS, ["amx_bf16", "avx512_bf16"]),
                                            (SKYLAKE, []), ("", [])])
def test_native_bf16_flags_are_read_from_the_flags_line_only(cpuinfo, flags):
    assert native_bf16_flags(cpuinfo) == flags


def test_auto_picks_bfloat16_and_channels_last_on_a_cpu_that_computes_it():
    chosen = choose_precision("auto", "float16", "cpu", ZEN4)
    assert chosen.amp_dtype == torch.bfloat16 and chosen.channels_last
    assert chosen.describe() == ("precision: bfloat16 autocast, channels-last (fp16_precision: auto; this CPU computes "
                                 "bfloat16 natively (avx512_bf16))")


def test_auto_keeps_float32_on_a_cpu_that_would_emulate_bfloat16():
    chosen = choose_precision("auto", "bfloat16", "cpu", SKYLAKE)
    assert chosen.amp_dtype is None and chosen.channels_last
    assert "neither amx_bf16 nor avx512_bf16" in chosen.describe()


@pytest.mark.parametrize("cuda_bf16, dtype", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cuda_follows_the_gpu_and_keeps_channels_last(cuda_bf16, dtype):
    chosen = choose_precision("auto", "float16", "cuda", "", cuda_bf16=cuda_bf16)
    assert chosen.amp_dtype == dtype and chosen.channels_last


@pytest.mark.parametrize("setting, amp_dtype, device, dtype, channels_last", [
    (False, "float16", "cpu", None, True),  # the default: float32, channels-last (faster on the CPU too)
    (False, "bfloat16", "cuda", None, True),
    (True, "float16", "cuda", torch.float16, True),
    (True, "bfloat16", "cuda", torch.bfloat16, True),
    (True, "float16", "cpu", torch.bfloat16, True),  # float16 autocast needs CUDA
    (True, "bfloat16", "cpu", torch.bfloat16, True),
])
def test_true_and_false_keep_their_meaning(setting, amp_dtype, device, dtype, channels_last):
    chosen = choose_precision(setting, amp_dtype, device, ZEN4, cuda_bf16=True)  # flags are read by auto only
    assert (chosen.amp_dtype, chosen.channels_last) == (dtype, channels_last)


def test_the_key_takes_true_false_and_auto_and_the_default_is_false(tmp_path):
    assert load_config().fp16_precision is False
    assert load_config(None, ["fp16_precision=auto"]).fp16_precision == "auto"
    assert load_config(None, ["fp16_precision=True"]).fp16_precision is True
    path = tmp_path / "config.yaml"
    path.write_text("fp16_precision: auto\n")
    config = load_config(path)
    assert config.fp16_precision == "auto" and config_from_dict(config_to_dict(config)).fp16_precision == "auto"


@pytest.mark.parametrize("value", ["maybe", "Auto", "1", "bfloat16"])
def test_a_bad_value_names_the_key_and_the_choices(value):
    with pytest.raises(ConfigError, match=r"fp16_precision = .*expected true, false or auto"):
        load_config(None, [f"fp16_precision={value}"])


def test_a_training_step_under_auto_with_native_bfloat16_is_finite(tmp_path, monkeypatch):
    import simclr.trainer
    from simclr.dist import init_distributed
    from simclr.trainer import Trainer

    monkeypatch.setattr(simclr.trainer, "read_cpuinfo", lambda: ZEN4)  # the same on any machine
    config = load_config(None, ["batch_size=4", "dataset.name=digits", "dataset.input_shape=(32,32,3)",
                                "dataset.valid_size=0", "knn_monitor.enabled=false", "device=cpu",
                                f"run_dir={tmp_path / 'run'}", "fp16_precision=auto"])
    trainer = Trainer(config, init_distributed("cpu"))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    conv = trainer.model.encoder.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    before = conv.detach().clone()
    x1, x2 = next(iter(trainer.train_batches.batches(0)))
    loss, acc = trainer.train_step(trainer.to_device(x1), trainer.to_device(x2))
    assert math.isfinite(loss.item()) and math.isfinite(acc["top1"].item())
    assert not torch.equal(before, conv) and all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("cpuinfo, line", [
    (ZEN4, "precision: bfloat16 autocast, channels-last (fp16_precision: auto; this CPU computes bfloat16 natively "
           "(avx512_bf16))"),
    (SKYLAKE, "precision: float32, channels-last (fp16_precision: auto; this CPU reports neither amx_bf16 nor avx512_bf16"),
])
def test_a_run_under_auto_says_what_it_chose_and_resumes(data_root, tmp_path, monkeypatch, capsys, cpuinfo, line):
    import run
    import simclr.trainer
    from tests.conftest import final_weights, tiny_args

    monkeypatch.setattr(simclr.trainer, "read_cpuinfo", lambda: cpuinfo)
    args = tiny_args(data_root, tmp_path / "run", "fp16_precision=auto", "knn_monitor.enabled=false")
    assert run.main([*args, "epochs=1"]) == 0
    assert line in capsys.readouterr().out
    # a checkpoint resumes in the other precision (auto -> false: bfloat16 -> float32 where auto chose bfloat16)
    assert run.main([*args, f"resume={tmp_path / 'run'}", "fp16_precision=false"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_the_default_trains_float32_in_channels_last_on_the_cpu(tmp_path, capsys):
    from simclr.dist import init_distributed
    from simclr.trainer import Trainer

    config = load_config(None, ["batch_size=4", "dataset.name=digits", "dataset.input_shape=(32,32,3)",
                                "dataset.valid_size=0", "knn_monitor.enabled=false", "device=cpu",
                                f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, init_distributed("cpu"))
    assert trainer.amp_dtype is None
    assert trainer.model.encoder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.to_device(torch.rand(2, 3, 32, 32)).is_contiguous(memory_format=torch.channels_last)


def test_evaluation_features_in_channels_last_match_nchw():
    """feature_eval extracts in the trainer's layout; the features are NCHW's up to float32 rounding."""
    import torchvision

    from data_aug.datasets import TensorImages
    from feature_eval.features import extract_features, image_batches

    torch.manual_seed(0)
    encoder = torchvision.models.resnet18(num_classes=16).eval()
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    dataset = TensorImages(images, torch.arange(6), [str(i) for i in range(6)])
    views = torch.cat([batch for batch, _ in image_batches(dataset, 32, 4)])
    with torch.inference_mode():
        nchw = encoder(views)
    assert not encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    split = extract_features(encoder, dataset, 32, batch_size=4, device="cpu")
    assert encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(split.features, nchw, atol=1e-4, rtol=1e-4)
    assert split.labels.tolist() == list(range(6))

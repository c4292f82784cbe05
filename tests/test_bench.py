"""The benchmarks' command lines: the throughput benchmark end to end on the CPU, its section of
docs/BENCHMARKS.md, a default run that leaves docs/ alone (recording takes --record), and a bad --device refused
in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")



def test_benchmark_appends_runs_to_its_own_section(tmp_path):
    from bench import throughput, write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- other: start -->\nother table\n<!-- other: end -->\n")
    for block in ("### run one", "### run two"):
        write_section(path, throughput.START, throughput.END, block, throughput.SECTION_HEAD)
    text = path.read_text()
    assert text.count(throughput.START) == 1 and text.count("## Training throughput") == 1
    assert "other table" in text and text.index("### run one") < text.index("### run two") < text.index(throughput.END)


def test_a_replacing_benchmark_keeps_one_table_and_every_other_section(tmp_path):
    """bench.loss_scaling's way: its device's section holds the latest table only."""
    from bench import write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- a: start -->\nold\n<!-- a: end -->\n\n<!-- b: start -->\nb\n<!-- b: end -->\n")
    write_section(path, "<!-- a: start -->", "<!-- a: end -->", "new", replace=True)
    write_section(path, "<!-- c: start -->", "<!-- c: end -->", "c table", replace=True)
    assert path.read_text() == ("# Benchmarks\n\n<!-- a: start -->\nnew\n<!-- a: end -->\n\n<!-- b: start -->\nb\n"
                                "<!-- b: end -->\n\n<!-- c: start -->\nc table\n<!-- c: end -->\n")


def test_one_helper_describes_the_machine_for_every_benchmark(monkeypatch):
    """The CPU's model through simclr.precision's /proc/cpuinfo reader, the cores as run.py counts them; no
    benchmark reads /proc/cpuinfo or counts cores itself."""
    import startup
    import simclr.precision
    from bench import describe_machine

    monkeypatch.setattr(simclr.precision, "read_cpuinfo", lambda: "processor\t: 0\nmodel name\t: Test CPU 9000\n")
    monkeypatch.setattr(startup, "available_cpus", lambda: 3)
    text = describe_machine("cpu")
    assert text.startswith("Test CPU 9000, 3 cores;") and f"torch {torch.__version__}" in text
    for path in [*(REPO / "bench").glob("*.py"), REPO / "bench" / "gpu_check.sh"]:
        source = path.read_text()
        assert path.name == "__init__.py" or ("cpuinfo" not in source and "sched_getaffinity" not in source), path


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    from bench import throughput

    out = tmp_path / "BENCHMARKS.md"
    assert throughput.main(["--device", "cpu", "--crop", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                            "--workers", "0", "--output", str(out)]) == 0
    text = out.read_text()
    for row in ("model alone on pre-made views", "full step, CPU pipeline", "full step, device pipeline",
                "CPU pipeline alone (PIL, 0 workers)", "device pipeline alone", "torch " + torch.__version__):
        assert row in text
    assert "appended to" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["gpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_benchmarks_refuse_a_bad_device_in_one_line(device, capsys):
    from bench import loss_scaling, throughput

    for bench in (throughput, loss_scaling):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--device", device])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"--device: {device!r}" in err and "Traceback" not in err


TINY_THROUGHPUT = ["--device", "cpu", "--crop", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                   "--workers", "0"]
TINY_LOSS = ["--sizes", "8", "--seed-up-to", "0", "--repeats", "1"]


def _fake_docs(tmp_path, monkeypatch):
    """docs/BENCHMARKS.md as a temporary copy, so that a benchmark recording by default is caught without
    touching the tracked file."""
    import bench

    path = tmp_path / "docs" / "BENCHMARKS.md"
    path.parent.mkdir()
    path.write_text(bench.BENCHMARKS.read_text())
    monkeypatch.setattr(bench, "BENCHMARKS", path)
    return path


@pytest.mark.parametrize("name, argv", [("throughput", TINY_THROUGHPUT),
                                        pytest.param("loss_scaling", TINY_LOSS, marks=pytest.mark.slow)])
def test_a_benchmark_prints_by_default_and_records_only_with_record(name, argv, tmp_path, monkeypatch, capsys):
    import importlib

    import bench

    module = importlib.import_module(f"bench.{name}")
    real = bench.BENCHMARKS.read_bytes()
    docs = _fake_docs(tmp_path, monkeypatch)
    before = docs.read_bytes()
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert docs.read_bytes() == before and bench.BENCHMARKS.is_relative_to(tmp_path) and "--record" in out
    assert "| " in out  # the table itself, printed
    assert f"`python -m bench.{name} {' '.join(argv)}" in out  # the command that made it, with its options
    assert module.main([*argv, "--record"]) == 0
    assert docs.read_bytes() != before and str(docs) in capsys.readouterr().out
    assert Path(module.__file__).parents[1].joinpath("docs", "BENCHMARKS.md").read_bytes() == real


def test_the_recipe_study_records_only_with_record(tmp_path, monkeypatch, capsys):
    import sklearn

    from bench import learning

    docs = _fake_docs(tmp_path, monkeypatch)
    before = docs.read_bytes()
    monkeypatch.setattr(learning, "study", lambda args, trainer_class: "| study | table |")
    monkeypatch.setattr(learning, "describe_machine", lambda device: f"a test machine ({device})")
    assert learning.main(["--seeds", "0"]) == 0
    assert docs.read_bytes() == before and "| study | table |" in capsys.readouterr().out
    assert learning.main(["--seeds", "0", "--record"]) == 0
    machine = "a test machine (cuda)" if torch.cuda.is_available() else "no GPU; a test machine (cpu)"
    assert docs.read_text().endswith(f"Machine: {machine}, scikit-learn {sklearn.__version__}.\n\n| study | table |\n"
                                     f"{learning.END}\n")
    out = tmp_path / "elsewhere.md"
    assert learning.main(["--seeds", "0", "--output", str(out)]) == 0 and "## Recipe study" in out.read_text()


def test_no_benchmark_keeps_the_old_writing_flags():
    from bench import learning, loss_scaling, throughput

    for module in (learning, loss_scaling, throughput):
        text = Path(module.__file__).read_text()
        assert "--no-write" not in text and "--no-append" not in text and "add_record_args(parser" in text


def test_throughput_times_the_trainers_own_step(capsys):
    """Every timed step of bench.throughput goes through `simclr.trainer.Trainer.train_step`: a change to the
    trainer's step shows up in the benchmark (there is no copy of the step in bench/)."""
    from bench import throughput
    from simclr.trainer import Trainer

    calls = []

    class Counted(Trainer):
        def train_step(self, x1, x2):
            flushed = (torch.tensor([1e-39]) * 1.0).item() == 0.0  # a denormal reads as 0 under the trainer's flush
            calls.append((x1.shape, flushed))
            return super().train_step(x1, x2)

    assert throughput.main(TINY_THROUGHPUT, trainer_class=Counted) == 0
    assert len(calls) == 3 * 2  # three step rows (pre-made, CPU pipeline, device pipeline), 1 warm-up + 1 timed each
    assert all(shape == (4, 3, 32, 32) and flushed for shape, flushed in calls)
    assert "precision: float32, channels-last (fp16_precision: false)" in capsys.readouterr().out


@pytest.mark.parametrize("amp, layout, dtype, channels_last", [("none", "trainer", None, True),
                                                              ("none", "nchw", None, False),
                                                              ("bf16", "trainer", torch.bfloat16, True),
                                                              ("bf16", "nchw", torch.bfloat16, False)])
def test_throughput_builds_the_trainer_for_its_settings(tmp_path, amp, layout, dtype, channels_last):
    from bench.throughput import create_trainer

    trainer = create_trainer(tmp_path, "resnet18", 32, 4, "cpu", amp, layout)
    conv = trainer.model.encoder.backbone.conv1.weight
    assert trainer.amp_dtype == dtype and trainer.precision.channels_last == channels_last
    assert conv.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert trainer.to_device(torch.rand(2, 3, 32, 32)).is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert not any(tmp_path.iterdir())  # nothing written


def test_original_step_says_where_the_original_code_should_be(tmp_path, capsys):
    from bench import original_step

    assert original_step.main(["--seed-code", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--seed-code" in err and "e8a690a" in err and "CODE.md" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.skipif(not (REPO.parent / "shared" / "seed" / "code" / "models").is_dir(),
                    reason="the original repository's code (../shared/seed/code) is not next to this checkout")
def test_original_step_times_the_original_next_to_the_trainer(tmp_path, capsys):
    from bench import original_step

    out = tmp_path / "BENCHMARKS.md"
    assert original_step.main(["--crops", "32", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--repeats",
                               "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert original_step.START in text and "original (sthalles/SimCLR e8a690a)" in text
    for row in ("float32, NCHW (fp16_precision: false, NCHW forced", "float32, channels-last (fp16_precision: "
                "false, the default)", "(fp16_precision: auto)"):
        assert row in text


def test_timed_calls_the_work_for_warmup_then_steps_on_successive_batches():
    from bench import timed

    calls = []
    seconds = timed(iter([(i, -i) for i in range(5)]), 2, 3, "cpu", lambda x1, x2: calls.append((x1, x2)))
    assert calls == [(i, -i) for i in range(5)] and seconds >= 0


def test_throughput_refuses_bad_numbers_before_building_anything(capsys):
    from bench import throughput

    with pytest.raises(SystemExit) as stop:
        throughput.main(["--device", "cpu", "--steps", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--batch-size must be >= 2, --steps >= 1" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # the error alone, no usage block first


FAKE_MODEL = '''import torch


class ResNetSimCLR(torch.nn.Module):
    def __init__(self, base_model, out_dim):
        super().__init__()
        self.head = torch.nn.Linear(3, out_dim)

    def forward(self, x):
        with open({log!r}, "a") as log:  # a denormal reads as 0 under the trainer's flush
            log.write(f"{{(torch.tensor([1e-39]) * 1.0).item() == 0.0}}\\n")
        h = x.float().mean((2, 3))
        return h, self.head(h)
'''
FAKE_LOSS = '''import torch


class NTXentLoss(torch.nn.Module):
    def __init__(self, device, batch_size, temperature, use_cosine_similarity):
        super().__init__()

    def forward(self, zis, zjs):
        return (zis * zjs).sum()
'''


def test_original_step_loads_the_originals_files_here_and_steps_them_without_the_trainers_flush(tmp_path):
    """The original's model and loss come from the files under --seed-code, loaded in this process without
    shadowing our `models` and `loss` packages; its steps run without the denormal flush of the trainer's."""
    import sys

    import models.resnet_simclr
    from bench import original_step

    code, log = tmp_path / "seed", tmp_path / "flushed.log"
    (code / "models").mkdir(parents=True)
    (code / "loss").mkdir()
    (code / "models" / "resnet_simclr.py").write_text(FAKE_MODEL.format(log=str(log)))
    (code / "loss" / "nt_xent.py").write_text(FAKE_LOSS)
    out = tmp_path / "BENCHMARKS.md"
    assert original_step.main(["--crops", "8", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats",
                               "1", "--seed-code", str(code), "--output", str(out)]) == 0
    assert log.read_text().split() == ["False"] * 4  # warm-up and timed step, two views each
    text = out.read_text()
    assert "| 8 px | original (sthalles/SimCLR e8a690a) |" in text and text.count("| 8 px | Trainer.train_step") == 3
    assert sys.modules["models.resnet_simclr"] is models.resnet_simclr and hasattr(models.resnet_simclr, "FEATURE_DIMS")

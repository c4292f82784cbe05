"""The benchmarks' command lines: the throughput benchmark end to end on the CPU, its section of
docs/BENCHMARKS.md, and a bad --device refused in one line."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")



def test_benchmark_appends_runs_to_its_own_section(tmp_path):
    from bench import throughput

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- other: start -->\nother table\n<!-- other: end -->\n")
    throughput.append_run("### run one", path)
    throughput.append_run("### run two", path)
    text = path.read_text()
    assert text.count(throughput.START) == 1 and text.count("## Training throughput") == 1
    assert "other table" in text and text.index("### run one") < text.index("### run two") < text.index(throughput.END)


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    from bench import throughput

    out = tmp_path / "BENCHMARKS.md"
    assert throughput.main(["--device", "cpu", "--crop", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                            "--workers", "0", "--per-core-views", "16", "--output", str(out)]) == 0
    text = out.read_text()
    for row in ("model alone on pre-made views", "full step, CPU pipeline", "full step, device pipeline",
                "CPU pipeline alone", "device pipeline alone", "per core", "torch " + torch.__version__):
        assert row in text
    assert "appended to" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["gpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_benchmarks_refuse_a_bad_device_in_one_line(device, capsys):
    from bench import loss_scaling, throughput

    for bench in (throughput, loss_scaling):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--device", device, "--no-write"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"--device: {device!r}" in err and "Traceback" not in err

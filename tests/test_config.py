import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from simclr.config import BASE_MODELS, ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
SEED_CONFIG = Path(__file__).parent / "data" / "seed_config.yaml"


def test_seed_block_loads_unchanged():
    c = load_config(SEED_CONFIG)
    assert c.batch_size == 512 and c.epochs == 40 and c.eval_every_n_epochs == 1
    assert c.weight_decay == float("10e-6") and isinstance(c.weight_decay, float)
    assert c.dataset.input_shape == (96, 96, 3) and c.dataset.crop_size == 96
    assert c.fine_tune_from == "resnet-18_80-epochs"
    assert c.model.out_dim == 256 and c.model.base_model == "resnet18"
    assert c.dataset.s == 1.0 and c.dataset.num_workers == 0 and c.dataset.valid_size == 0.05
    assert c.loss.temperature == 0.5 and c.loss.use_cosine_similarity is True
    assert c.fp16_precision is False


def test_repo_config_has_every_seed_key():
    import yaml

    seed = yaml.safe_load(SEED_CONFIG.read_text())
    ours = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in seed.items():
        assert key in ours
        if isinstance(value, dict):
            assert set(value) <= set(ours[key])
    load_config(ROOT / "config.yaml")


@pytest.mark.parametrize("text", ["None", "'None'", "null", "~", "''"])
def test_fine_tune_from_none_spellings(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"fine_tune_from: {text}\n")
    assert load_config(path).fine_tune_from is None


def test_overrides_are_typed():
    c = load_config(None, ["epochs=80", "model.base_model=resnet50", "loss.temperature=0.2",
                           "weight_decay=10e-6", "dataset.input_shape=(32,32,3)", "fp16_precision=true",
                           "run_dir=runs/x", "resume=auto"])
    assert c.epochs == 80 and c.model.base_model == "resnet50" and c.loss.temperature == 0.2
    assert c.weight_decay == 1e-5 and c.dataset.input_shape == (32, 32, 3) and c.fp16_precision is True
    assert c.run_dir == "runs/x" and c.resume == "auto"


def test_input_shape_as_list():
    assert load_config(None, ["dataset.input_shape=[64, 64, 3]"]).dataset.crop_size == 64


@pytest.mark.parametrize("override, key", [
    ("loss.temperature=0", "loss.temperature"), ("loss.temperature=-1", "loss.temperature"),
    ("batch_size=1", "batch_size"), ("dataset.valid_size=1", "dataset.valid_size"),
    ("dataset.valid_size=-0.1", "dataset.valid_size"), ("dataset.input_shape=(96,96)", "dataset.input_shape"),
    ("dataset.input_shape=(96,96,1)", "dataset.input_shape"), ("model.base_model=vgg16", "model.base_model"),
    ("epochs=ten", "epochs"), ("epochs=1.5", "epochs"), ("weight_decay=abc", "weight_decay"),
    ("fp16_precision=maybe", "fp16_precision"), ("bogus=1", "bogus"), ("model.bogus=1", "model.bogus"),
    ("dataset.name=mnist", "dataset.name"), ("device=tpu", "device"), ("loss.temperature=nan", "loss.temperature"),
    ("model=3", "model"), ("batch_size=true", "batch_size"), ("dataset.s=3", "dataset.s"),
    ("dataset.hflip=1.5", "dataset.hflip"), ("dataset.hflip=-0.1", "dataset.hflip"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("value, hint", [("resnet05", "did you mean resnet50?"), ("ResNet34", "did you mean resnet34?"),
                                         ("resnext50", "did you mean resnext50_32x4d?"), ("vgg16", None)])
def test_unknown_base_model_lists_the_choices_and_the_nearest(value, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.base_model={value}"])
    message = str(err.value)
    assert message.startswith(f"model.base_model = {value!r}: ") and "\n" not in message
    assert message.endswith("allowed: " + ", ".join(BASE_MODELS)) and "wide_resnet101_2" in message
    assert (hint in message) if hint else "did you mean" not in message


def test_every_resnet_family_name_is_accepted():
    for name in BASE_MODELS:
        assert load_config(None, [f"model.base_model={name}"]).model.base_model == name


@pytest.mark.parametrize("text, message", [
    ("epochs: 3\ndataset:\n  name: digits\nepochs: 4\n", "key epochs appears twice (lines 1 and 4)"),
    # a second section would replace the whole first one (name, input_shape, ...), not add its keys
    ("dataset:\n  name: digits\nbatch_size: 8\ndataset:\n  hflip: 0.5\n", "key dataset appears twice (lines 1 and 4)"),
    ("dataset:\n  hflip: 0\n  hflip: 0.5\n", "key hflip appears twice (lines 2 and 3)"),
])
def test_a_key_given_twice_in_yaml_is_an_error_not_the_last_one_silently(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: {message}: keep one")):
        load_config(path)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  base_model: resnet18\n  widht: 2\n")
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(path)


@pytest.mark.parametrize("override, suggestion", [
    ("batch_sise=3", "did you mean batch_size?"), ("dataset.nmae=x", "did you mean dataset.name?"),
    ("epoch=3", "did you mean epochs?"), ("temperature=0.2", "did you mean loss.temperature?"),
    ("lr=0.1", "did you mean optimizer.lr?")])
def test_a_misspelt_or_misplaced_key_gets_a_suggestion(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert suggestion in str(err.value) and "allowed keys here are" in str(err.value)


def test_a_yaml_key_typo_gets_a_suggestion_and_a_distant_one_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  base_modle: resnet18\n")
    with pytest.raises(ConfigError, match=r"unknown key model.base_modle: did you mean model.base_model\?"):
        load_config(path)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["xyzzy=1"])
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("text, where", [
    ("batch_size: 4\ndataset: {name: stl10\nepochs: 3\n", "at line 3, column 7: expected ',' or '}'"),
    ("batch_size: 4\nrun_dir: runs/a: b\n", "at line 2, column 16: mapping values are not allowed here"),
    ("epochs: 1\n\tseed: 2\n", "at line 2, column 1: found character '\\t'"),
    ('epochs: 1\nrun_dir: "a\x01"\n', "at line 2, column 12: special characters are not allowed (found U+0001)")])
def test_a_yaml_syntax_error_names_line_and_column(tmp_path, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path} is not valid YAML {where}") and "\n" not in message, message


@pytest.mark.parametrize("key", ["\n", "a\nb", "tab\there", None, 3])
def test_an_unknown_key_is_named_on_one_line_whatever_it_holds(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: None}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and "unknown key" in str(err.value)


def test_python_tags_are_never_constructed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not Path("pwned.txt").exists()


def test_roundtrip_through_dict():
    c = load_config(None, ["dataset.input_shape=(32,32,3)", "model.sync_bn=true"])
    assert config_from_dict(config_to_dict(c)) == c


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_user_error_exits_2_with_one_line():
    result = _run("loss.temperature=0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss.temperature" in lines[0] and "Traceback" not in result.stderr


def test_a_config_error_is_reported_before_torch_is_imported():
    """Importing torch and the trainer takes seconds: a typo must be answered without them."""
    code = ("import sys, run\nrc = run.main(['batch_sise=3'])\n"
            "assert rc == 2 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == done.stderr.strip().splitlines()[0] and "did you mean batch_size?" in done.stderr


@pytest.mark.parametrize("args, key", [
    (["batch_size=1"], "batch_size"), (["dataset.valid_size=1.5"], "dataset.valid_size"),
    (["dataset.input_shape=(96,96)"], "dataset.input_shape"), (["model.base_model=resnet05"], "did you mean resnet50?"),
    (["nonsense=1"], "nonsense"), (["--config", "missing.yaml"], "missing.yaml"), (["epochs"], "epochs"),
    (["--config", "configs"], "is a directory"), (["model.out_dim=2147483647"], "model.out_dim"),
])
def test_main_user_errors_return_2_with_one_line(args, key, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    import run

    assert run.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_is_a_config_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    import run

    assert run.main(["device=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: device: cuda") and "device: cpu" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_under_torchrun_every_rank_reports_its_own_device_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    import run

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.main(["device=cuda"]) == 2
    assert capsys.readouterr().err.startswith("config error (rank 1): device: cuda")


def test_under_torchrun_only_rank_0_prints_a_config_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    import run

    monkeypatch.setenv("RANK", "1")
    assert run.main(["loss.temperature=0"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run.main(["loss.temperature=0"]) == 2
    assert "loss.temperature" in capsys.readouterr().err


def test_saved_config_reads_a_checkpoints_config_strictly():
    from simclr.config import saved_config

    config = load_config(None, ["model.head_layers=3", "dataset.name=digits"])
    assert saved_config({"config": config_to_dict(config), "model": {}}) == config
    with pytest.raises(ConfigError, match="unknown key model.hedd_layers"):
        saved_config({"config": {"model": {"hedd_layers": 3}}})


def test_hflip_defaults_to_the_papers_half_and_the_quickstart_turns_it_off():
    assert load_config(None, []).dataset.hflip == 0.5
    assert load_config(None, ["dataset.hflip=0"]).dataset.hflip == 0
    assert load_config(ROOT / "configs" / "quickstart.yaml").dataset.hflip == 0

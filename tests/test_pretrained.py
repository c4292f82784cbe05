"""pretrained_models: the package format, every loader path (name, package dir, weights file, run dir,
checkpoint) and every error, plain torchvision weights, and `fine_tune_from=<package>` end to end."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models.packages as packages
import run
from feature_eval.evaluate import evaluate
from feature_eval.results import Results
from models import CheckpointLoadError, load_encoder
from models.loading import resolve_checkpoint
from models.resnet_simclr import create_model
from pretrained_models import export as export_module
from pretrained_models.export import export_package, refresh_package
from simclr.checkpoint import save_checkpoint
from simclr.config import config_to_dict, load_config
from simclr.dist import init_distributed
from simclr.trainer import Trainer
from tests.conftest import SEED_CONFIG, assert_same_weights, tiny_args, write_stl10

README = "# Packages\n\nThe format, described by hand; export must never rewrite it.\n"
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(run_dir, cifar_stem=False, out_dim=8, seed=1):
    """A run dir with an untrained (seeded) checkpoint as the trainer saves it, for tiny STL10 at 32px."""
    config = load_config(SEED_CONFIG, ["fine_tune_from=None", "dataset.name=stl10", f"model.out_dim={out_dim}",
                                       f"model.cifar_stem={str(cifar_stem).lower()}", "dataset.input_shape=(32,32,3)",
                                       "epochs=5", "batch_size=4"])
    torch.manual_seed(seed)
    model = create_model("resnet18", out_dim, cifar_stem)
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so that they are checked too
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    path = run_dir / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(config), "next_epoch": 3,
                           "optimizer": {}})
    (run_dir / "meta.jsonl").write_text(json.dumps({"git_commit": "abc123", "command": "run.py epochs=5"}) + "\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 2, "train_loss": 1.5}) + "\n")
    return model, path


def write_eval(run_dir, sha256, name, top1):
    """An evaluation JSON as feature_eval writes it, with a linear and a KNN row."""
    rows = [{"classifier": c, "classifier_name": n, "extractor": "simclr", "extractor_name": "SimCLR",
             "top1": top1 + i, "top5": 99.0} for i, (c, n) in enumerate([("lbfgs", "Logistic regression (L-BFGS)"),
                                                                      ("knn", "KNN (k=10, Euclidean)")])]
    results = {"checkpoint": "runs/x/checkpoints/last.pt", "checkpoint_sha256": sha256,
               "dataset": {"name": "stl10", "root": "data", "input_size": 32}, "splits": {"fit": "train", "test": 4},
               "options": {"classifiers": ["lbfgs", "knn"], "baselines": []}, "seed": 0, "rows": rows}
    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results))
    (folder / f"{name}.md").write_text("| table |\n")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run with a matching and a stale evaluation, exported into a packages folder with a README of its own."""
    tmp = tmp_path_factory.mktemp("pkg")
    run_dir, root = tmp / "runs" / "r1", tmp / "packages"
    model, checkpoint = make_run(run_dir)
    write_eval(run_dir, packages.file_sha256(checkpoint), "last_stl10", 41.5)
    write_eval(run_dir, "0" * 64, "old_stl10", 10.0)
    root.mkdir()
    (root / "README.md").write_text(README)
    logs = []
    folder = export_package(run_dir, "resnet-18_3-epochs", root=root, log=logs.append)
    return {"model": model, "checkpoint": checkpoint, "run_dir": run_dir, "root": root, "folder": folder,
            "logs": logs}


@pytest.fixture
def packages_root(exported, monkeypatch):
    """Make the exported packages folder the one that names are looked up in."""
    monkeypatch.setattr(packages, "PACKAGES_DIR", exported["root"])
    return exported["root"]


def test_package_holds_safetensors_config_results_and_card(exported):
    folder, model = exported["folder"], exported["model"]
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "torchvision_resnet18.safetensors",
                                                  "config.yaml", "package.json", "eval", "README.md"}
    for name in ("model.safetensors", "torchvision_resnet18.safetensors"):  # safetensors: a JSON header, no pickle
        raw = (folder / name).read_bytes()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        assert "__metadata__" in header and b"\x80\x04" not in raw[:2]
    weights = load_file(folder / "model.safetensors")
    assert_same_weights(weights, model.state_dict(), atol=0)
    assert any(k.startswith("head.net.") for k in weights) and any(k.startswith("encoder.backbone.") for k in weights)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata()["base_model"] == "resnet18" and f.metadata()["out_dim"] == "8"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == torch.load(exported["checkpoint"], weights_only=True)["config"]
    manifest = json.loads((folder / "package.json").read_text())
    for name, info in manifest["files"].items():
        assert info["sha256"] == packages.file_sha256(folder / name)
        assert info["bytes"] == (folder / name).stat().st_size
    assert manifest["epochs"] == 3 and manifest["source"]["git_commit"] == "abc123"
    # Only the evaluation of these exact weights is copied; the stale one is named in the log.
    assert sorted(p.name for p in (folder / "eval").iterdir()) == ["last_stl10.json", "last_stl10.md"]
    assert any("old_stl10.json" in line and "other weights" in line for line in exported["logs"])


def test_model_card_has_data_recipe_numbers_commands_sha_and_download_place(exported):
    card = (exported["folder"] / "README.md").read_text()
    sha = packages.file_sha256(exported["folder"] / "model.safetensors")
    for expected in ("stl10", "32x32", "| Epochs | 3 (of 5 configured) |", "| Batch | 4 (global) |",
                     "NT-Xent temperature 0.5", "weight decay 1e-05", "41.5", "42.5",  # linear and KNN top-1
                     "python -m feature_eval.evaluate --checkpoint runs/x/checkpoints/last.pt --dataset stl10",
                     "--checkpoint resnet-18_3-epochs", sha, "put `model.safetensors`",
                     "pretrained_models/resnet-18_3-epochs/",
                     "| Training command (as run on the training machine) | `run.py epochs=5` |"):
        assert expected in card, expected
    assert "10.0" not in card  # the stale evaluation's numbers


def test_list_prints_the_packages_as_a_table_and_export_leaves_the_folder_alone(exported, capsys):
    assert export_module.main(["--list", "--packages-dir", str(exported["root"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| Package | Architecture | Data | Epochs | Batch | Linear top-1 % | KNN top-1 % | "
                        "Weights here |")
    assert lines[2:] == ["| resnet-18_3-epochs | ResNet-18 | stl10 | 3 | 4 | 41.5 | 42.5 | yes |"]
    assert (exported["root"] / "README.md").read_text() == README
    assert sorted(p.name for p in exported["root"].iterdir()) == ["README.md", "resnet-18_3-epochs"]  # no index file
    assert export_module.main(["--list", "--packages-dir", str(exported["root"] / "none")]) == 0
    assert capsys.readouterr().out == f"no packages in {exported['root'] / 'none'}\n"


def test_torchvision_resnet18_loads_the_exported_trunk_with_only_fc_missing(exported):
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(load_file(exported["folder"] / "torchvision_resnet18.safetensors"),
                                              strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    net.eval()
    encoder = exported["model"].encoder.eval()
    x = torch.rand(2, 3, 32, 32)
    normalised = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        torch.testing.assert_close(net(normalised), encoder(x))


def test_cifar_stem_trunk_loads_into_torchvision_with_the_documented_stem(tmp_path):
    make_run(tmp_path / "run", cifar_stem=True)
    folder = export_package(tmp_path / "run", "cifar", root=tmp_path / "packages", log=lambda _: None)
    weights = load_file(folder / "torchvision_resnet18.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):  # a plain stem does not fit: the card says so
        torchvision.models.resnet18().load_state_dict(weights, strict=False)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert "net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in (folder / "README.md").read_text()


@pytest.mark.parametrize("source", ["name", "package dir", "weights file", "run dir", "checkpoint"])
def test_load_encoder_accepts_every_source(exported, packages_root, source):
    folder = exported["folder"]
    path = {"name": "resnet-18_3-epochs", "package dir": folder, "weights file": folder / "model.safetensors",
            "run dir": exported["run_dir"], "checkpoint": exported["checkpoint"]}[source]
    encoder = load_encoder(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.config["model"]["out_dim"] == 8 and encoder.config["dataset"]["name"] == "stl10"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), exported["model"].encoder.eval()(x))


def test_a_downloaded_weights_file_alone_is_enough(exported, tmp_path):
    lone = tmp_path / "downloads" / "model.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((exported["folder"] / "model.safetensors").read_bytes())
    encoder = load_encoder(lone)
    # The metadata names the encoder; the head keys are those every reader gets for a file that lacks them.
    assert encoder.config["model"] == {"base_model": "resnet18", "cifar_stem": False, "out_dim": 8,
                                       "head_layers": 2, "head_bn": False}
    assert load_encoder(lone.parent).checkpoint_path == str(lone)  # a folder with only the weights is a package


@pytest.mark.parametrize("form", ["name", "package dir", "weights file"])
def test_fine_tune_from_package_initialises_the_model(exported, packages_root, tmp_path, form):
    data_root = tmp_path / "data"
    write_stl10(data_root)
    value = {"name": "resnet-18_3-epochs", "package dir": exported["folder"],
             "weights file": exported["folder"] / "model.safetensors"}[form]
    config = load_config(None, tiny_args(data_root, tmp_path / "ft")[2:] + [f"fine_tune_from={value}"])
    trainer = Trainer(config, init_distributed("cpu"))
    assert_same_weights(trainer.model.state_dict(), exported["model"].state_dict())
    assert trainer.next_epoch == 0 and not trainer.optimizer.state


@pytest.mark.slow
def test_run_py_fine_tune_from_package_name_end_to_end(exported, packages_root, tmp_path, capsys):
    data_root = tmp_path / "data"
    write_stl10(data_root)
    run_dir = tmp_path / "ft"
    assert run.main(tiny_args(data_root, run_dir, "fine_tune_from=resnet-18_3-epochs", "epochs=1")) == 0
    assert f"initialised weights from {exported['folder']}" in capsys.readouterr().out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 1 and state["config"]["fine_tune_from"] == "resnet-18_3-epochs"
    changed = [k for k, v in exported["model"].state_dict().items() if not torch.equal(v, state["model"][k])]
    assert changed  # it trained on from the package's weights


def test_feature_eval_accepts_a_package_name(exported, packages_root, tmp_path):
    data_root = tmp_path / "data"
    write_stl10(data_root, n_train=12, n_test=4)
    evaluation = evaluate("resnet-18_3-epochs", dataset="stl10", root=data_root, input_size=16, classifiers="knn",
                          device="cpu", out_dir=tmp_path / "out", cache=False, log=lambda _: None)
    assert evaluation.results["checkpoint"] == str(exported["folder"] / "model.safetensors")
    assert evaluation.results["trained_epochs"] == 3 and evaluation.results["rows"][0]["projection_dim"] == 8
    assert evaluation.results["checkpoint_sha256"] == packages.file_sha256(
        exported["folder"] / "model.safetensors")


def test_finetune_accepts_a_package_name(exported, packages_root, tmp_path):
    from feature_eval.finetune import finetune_evaluate

    data_root = tmp_path / "data"
    write_stl10(data_root, n_train=12, n_test=4)
    result = finetune_evaluate("resnet-18_3-epochs", label_fraction=1.0, dataset="stl10", root=data_root,
                               input_size=16, epochs=1, lrs=(0.1,), device="cpu", out_dir=tmp_path / "out",
                               log=lambda _: None)
    assert result.results["checkpoint"] == str(exported["folder"] / "model.safetensors")
    assert result.results["splits"]["labelled"] == 12
    assert result.paths["json"].name == "model_stl10_data_16px_finetune-100pct.json"  # other root, other size
    key = "backbone.conv1.weight"
    assert not torch.equal(result.models["simclr"].encoder.state_dict()[key], exported["model"].encoder.state_dict()[key])


def test_refresh_adds_evaluations_of_the_package_itself(tmp_path):
    make_run(tmp_path / "run")
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    assert "No evaluation results" in (folder / "README.md").read_text()
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    refresh_package(folder, log=lambda _: None)
    assert "55.5" in (folder / "README.md").read_text()
    assert json.loads((folder / "package.json").read_text())["evaluations"] == ["eval/model_stl10.json",
                                                                                "eval/model_stl10.md"]


# ---------------------------------------------------------------- errors

def test_unknown_name_lists_the_available_packages(exported, packages_root):
    for call in (lambda: packages.find_package("resnet-50_1000-epochs"),
                 lambda: load_encoder("resnet-50_1000-epochs"), lambda: resolve_checkpoint("resnet-50_1000-epochs")):
        with pytest.raises(CheckpointLoadError, match=r"no pretrained package 'resnet-50_1000-epochs'.*"
                                                      r"available: resnet-18_3-epochs"):
            call()


def test_unknown_name_with_no_packages_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointLoadError, match="available: none yet; make one with python -m "
                                                  "pretrained_models.export"):
        packages.find_package("anything", root=tmp_path)


def test_run_py_unknown_package_is_one_line_exit_1(exported, packages_root, tmp_path, capsys):
    data_root = tmp_path / "data"
    write_stl10(data_root)
    assert run.main(tiny_args(data_root, tmp_path / "x", "fine_tune_from=nope")) == 1
    err = capsys.readouterr().err
    assert "'nope'" in err and "resnet-18_3-epochs" in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_weights_say_where_to_put_the_download(exported, tmp_path, monkeypatch):
    folder = tmp_path / "packages" / "card-only"
    folder.mkdir(parents=True)
    for name in ("package.json", "README.md", "config.yaml"):
        (folder / name).write_bytes((exported["folder"] / name).read_bytes())
    monkeypatch.setattr(packages, "PACKAGES_DIR", folder.parent)
    for call in (lambda: load_encoder("card-only"), lambda: load_encoder(folder)):
        with pytest.raises(CheckpointLoadError, match=rf"no model.safetensors.*download.*{folder}/model.safetensors"):
            call()


def test_altered_weights_are_refused(exported, tmp_path):
    folder = tmp_path / "altered"
    folder.mkdir()
    for name in ("package.json", "config.yaml"):
        (folder / name).write_bytes((exported["folder"] / name).read_bytes())
    weights = load_file(exported["folder"] / "model.safetensors")
    weights["head.net.0.bias"] = weights["head.net.0.bias"] + 1
    with safe_open(str(exported["folder"] / "model.safetensors"), "pt") as f:
        save_file(weights, str(folder / "model.safetensors"), metadata=f.metadata())
    with pytest.raises(CheckpointLoadError, match="differs from the sha256"):
        load_encoder(folder)


def test_damaged_foreign_and_torchvision_files_are_clear_errors(exported, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointLoadError, match="damaged or not a safetensors file"):
        load_encoder(damaged)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointLoadError, match="not a SimCLR package"):
        load_encoder(foreign)
    with pytest.raises(CheckpointLoadError, match="plain torchvision weights"):
        load_encoder(exported["folder"] / "torchvision_resnet18.safetensors")


def test_package_weights_of_another_architecture_do_not_fit(exported, packages_root, tmp_path):
    data_root = tmp_path / "data"
    write_stl10(data_root)
    config = load_config(None, tiny_args(data_root, tmp_path / "ft")[2:] + ["fine_tune_from=resnet-18_3-epochs",
                                                                             "model.cifar_stem=true"])
    with pytest.raises(CheckpointLoadError, match="does not fit this model's encoder"):
        Trainer(config, init_distributed("cpu"))


def test_export_errors_are_one_line(exported, tmp_path, capsys):
    root = str(exported["root"])  # docs/EXIT_CODES.md: 2 for a name or destination, 1 for a checkpoint
    cases = [([str(exported["run_dir"]), "--as", "resnet-18_3-epochs", "--packages-dir", root], "already exists", 2),
             ([str(exported["run_dir"]), "--as", "../evil", "--packages-dir", root], "a package name is", 2),
             ([str(tmp_path / "nothing"), "--packages-dir", root], "not found", 1),
             ([str(exported["folder"]), "--as", "again", "--packages-dir", root], "already a package", 2),
             (["--refresh", "nope", "--packages-dir", root], "--refresh 'nope': no package of that name in "
              f"{root} (present: resnet-18_3-epochs); python -m pretrained_models.export --list describes each", 1),
             (["--refresh", "nope", "--packages-dir", str(tmp_path)], "(present: none); make one with python -m "
              "pretrained_models.export runs/<run>", 1),
             ([str(exported["run_dir"]), "--packages-dir", str(exported["checkpoint"])], "cannot write package", 2)]
    for argv, message, code in cases:
        assert export_module.main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as stop:
        export_module.main([])
    assert stop.value.code == 2


def test_export_refusals_are_one_line_when_run_as_a_module(exported):
    """`python -m pretrained_models.export` defines ExportError in `__main__`: the error policy still finds its row."""
    command = [sys.executable, "-m", "pretrained_models.export", str(exported["run_dir"]), "--as", "resnet-18_3-epochs",
               "--packages-dir", str(exported["root"])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert "already exists" in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_the_readme_recipe_for_a_torchvision_file_runs(exported, tmp_path):
    """pretrained_models/README.md: `torchvision_state_dict` of a checkpoint's weights loads into plain torchvision."""
    from models.loading import read_weights

    weights = read_weights(str(exported["checkpoint"]))["model"]
    # as a trained run's checkpoint holds them: channels-last convolutions (safetensors refuses non-contiguous ones)
    weights = {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in weights.items()}
    trunk = export_module.torchvision_state_dict(weights)
    save_file(trunk, str(tmp_path / "resnet18.safetensors"))
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(load_file(str(tmp_path / "resnet18.safetensors")), strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}


def test_export_rejects_weights_that_do_not_fit_their_config(tmp_path, capsys):
    _, path = make_run(tmp_path / "run")
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["base_model"] = "resnet50"
    torch.save(state, path)
    assert export_module.main([str(tmp_path / "run"), "--packages-dir", str(tmp_path / "p")]) == 1
    assert "does not fit a resnet50" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_force_replaces_a_package_and_the_default_name_follows_the_scheme(tmp_path):
    make_run(tmp_path / "a", seed=1)
    make_run(tmp_path / "b", seed=2)
    root = tmp_path / "packages"
    first = export_package(tmp_path / "a", root=root, log=lambda _: None)
    assert first.name == "resnet-18_3-epochs"
    second = export_package(tmp_path / "b", root=root, force=True, log=lambda _: None)
    assert second == first and sorted(p.name for p in root.iterdir()) == ["resnet-18_3-epochs"]  # no temp
    b_weights = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert_same_weights(packages.read_package(second)["model"], b_weights, atol=0)


@pytest.mark.parametrize("base_model, name", [("resnet34", "resnet-34"), ("wide_resnet50_2", "wide-resnet-50-2"),
                                               ("resnext101_32x8d", "resnext-101-32x8d")])
def test_the_default_name_of_every_trunk_follows_the_scheme(base_model, name):
    assert export_module.default_name(base_model, 40) == f"{name}_40-epochs" and packages.is_package_name(name)


def test_a_resnet34_package_says_its_trunk_and_loads_in_torchvision(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["base_model"] = "resnet34"
    state["model"] = create_model("resnet34", 8).state_dict()
    torch.save(state, path)
    folder = export_package(run_dir, root=tmp_path / "packages", log=lambda _: None)
    assert folder.name == "resnet-34_3-epochs"
    card = (folder / "README.md").read_text()
    assert "ResNet-34, feature dim 512" in card and "torchvision.models.resnet34()" in card
    missing, unexpected = torchvision.models.resnet34().load_state_dict(
        load_file(folder / "torchvision_resnet34.safetensors"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert load_encoder(folder).feature_dim == 512


@pytest.mark.parametrize("name", ["export.py", "README.md", "__init__.py", "__init__", "package.json",
                                  "model.safetensors", ".hidden", "_private", "assets", "LICENSE"])
def test_force_never_replaces_what_is_not_a_package(tmp_path, capsys, name):
    make_run(tmp_path / "run")
    root = tmp_path / "packages"
    root.mkdir()
    for entry in ("export.py", "README.md", "__init__.py", "LICENSE"):
        (root / entry).write_text(f"{entry} stays\n")
    (root / "assets").mkdir()
    (root / "assets" / "logo.txt").write_text("logo\n")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert export_module.main([str(tmp_path / "run"), "--as", name, "--force", "--packages-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert repr(name) in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert (root / "export.py").read_text() == "export.py stays\n"


def test_force_keeps_the_package_evaluations_of_identical_weights_and_drops_the_others(tmp_path):
    make_run(tmp_path / "a", seed=1)
    make_run(tmp_path / "b", seed=2)
    root = tmp_path / "packages"
    folder = export_package(tmp_path / "a", "p", root=root, log=lambda _: None)
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    write_eval(folder, "f" * 64, "other_stl10", 12.0)
    logs = []
    export_package(tmp_path / "a", "p", root=root, force=True, log=logs.append)  # the same weights again
    assert sorted(p.name for p in (folder / "eval").iterdir()) == ["model_stl10.json", "model_stl10.md"]
    assert json.loads((folder / "package.json").read_text())["evaluations"] == ["eval/model_stl10.json",
                                                                                "eval/model_stl10.md"]
    assert "55.5" in (folder / "README.md").read_text() and "12.0" not in (folder / "README.md").read_text()
    assert any("other_stl10.json" in line and "other weights" in line for line in logs)
    refresh_package(folder, log=lambda _: None)  # the manifest knows the replaced weights file held these weights
    assert "55.5" in (folder / "README.md").read_text()
    logs.clear()
    export_package(tmp_path / "b", "p", root=root, force=True, log=logs.append)  # other weights
    assert not (folder / "eval").exists() and "55.5" not in (folder / "README.md").read_text()
    assert any("model_stl10.json" in line and "other weights" in line for line in logs)


def test_a_damaged_config_or_manifest_neither_stops_list_nor_blocks_force(tmp_path, capsys):
    make_run(tmp_path / "run")
    root = tmp_path / "packages"
    folder = export_package(tmp_path / "run", "p", root=root, log=lambda _: None)
    (folder / "config.yaml").write_text("a: [unclosed\n")
    assert export_module.main(["--list", "--packages-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| p | ResNet-18 | - | 3 | - | - | - | yes |"
    (folder / "package.json").write_text("{not json")
    export_package(tmp_path / "run", "p", root=root, force=True, log=lambda _: None)  # nothing of it is kept
    assert json.loads((folder / "package.json").read_text())["name"] == "p" and "stl10" in data_row(folder)


def test_the_card_shows_one_section_for_the_run_and_the_package_evaluated_on_the_same_data(tmp_path):
    """evaluate names its files after the weights file: the run's `last_stl10.*`, copied into the package, and the
    package's own `model_stl10.*` scored the same weights, so the card shows one table of their latest rows."""
    make_run(tmp_path / "run")
    write_eval(tmp_path / "run", packages.file_sha256(tmp_path / "run" / "checkpoints" / "last.pt"), "last_stl10", 41.5)
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    path = folder / "eval" / "model_stl10.json"
    again = "python -m feature_eval.evaluate --checkpoint p --classifiers knn"
    later = json.loads(path.read_text())  # KNN only, redone on the package
    path.write_text(json.dumps({**later, "rows": later["rows"][1:], "command": again, "finished": "2030-01-01T00:00"}))
    refresh_package(folder, log=lambda _: None)
    card = (folder / "README.md").read_text()
    assert card.count("On stl10 (32 px)") == 1
    section = card.split("On stl10 (32 px)")[1].split("Result files")[0]
    assert "| 41.5 |" in section and "| 56.5 |" in section and "| 42.5 |" not in section  # the run's L-BFGS row
    assert ("Produced by `python -m feature_eval.evaluate --checkpoint runs/x/checkpoints/last.pt --dataset stl10 "
            f"--root data --input-size 32 --classifiers lbfgs,knn --seed 0` and `{again}`; from this package: "
            "`python -m feature_eval.evaluate --checkpoint p --dataset stl10 --root data --input-size 32 --classifiers "
            f"lbfgs,knn --seed 0` and `{again}`.") in section


@pytest.mark.slow
def test_evaluating_the_run_and_then_its_package_gives_one_card_section(tmp_path):
    """The real stems: evaluate writes `last_digits.*` for the run's last.pt, `model_digits.*` for the package."""
    from tests.test_feature_eval import make_checkpoint

    make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    quiet = dict(device="cpu", plots=False, log=lambda *_: None)
    evaluate(tmp_path / "run", classifiers="lbfgs,knn", max_iter=50, **quiet)
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    evaluate(folder, classifiers="knn", **quiet)
    refresh_package(folder, log=lambda _: None)
    assert sorted(p.name for p in (folder / "eval").iterdir()) == ["last_digits.json", "last_digits.md",
                                                                   "model_digits.json", "model_digits.md"]
    card = (folder / "README.md").read_text()
    assert card.count("On digits (16 px)") == 1 and card.count("| SimCLR |") == 3


def test_a_card_table_keeps_the_order_of_its_results_file_when_rows_have_different_dates():
    rows = [{"classifier": "knn", "classifier_name": "KNN", "extractor": extractor, "top1": top1, "top5": 90.0,
             "evaluated": evaluated} for extractor, top1, evaluated in (("simclr", 70.0, "2030-01-02T00:00"),
                                                                      ("random", 20.0, "2030-01-01T00:00"))]
    manifest = {"name": "p", "base_model": "resnet18", "cifar_stem": False, "feature_dim": 512, "out_dim": 8,
                "files": {}}
    card = export_module.model_card(manifest, {}, [Results.from_json({"rows": rows, "finished": "2030-01-02T00:00"})])
    assert card.index("| KNN | SimCLR | 70.0 |") < card.index("| KNN | Random init | 20.0 |")


def test_the_readme_names_the_head_keys_of_each_head():
    """pretrained_models/README.md's `head.net` indices for each head config are those of the model's state dict."""
    text = (REPO / "pretrained_models" / "README.md").read_text()
    claims = {words: indices for indices, words in re.findall(
        r"`\{([\d,]+)\}` (by default|with `model.head_layers: 3`|with `model.head_bn: true`|with both)", text)}
    assert set(claims) == {"by default", "with `model.head_layers: 3`", "with `model.head_bn: true`", "with both"}
    for layers, bn, words in ((2, False, "by default"), (3, False, "with `model.head_layers: 3`"),
                              (2, True, "with `model.head_bn: true`"), (3, True, "with both")):
        state = create_model("resnet18", 8, False, layers, bn).state_dict()
        assert {int(k.split(".")[2]) for k in state if k.startswith("head.")} == set(map(int, claims[words].split(",")))


def test_a_package_is_as_readable_as_any_file_written_here(tmp_path):
    """safetensors writes private files (0600); a package's files follow the umask, as every other file here does."""
    make_run(tmp_path / "run")
    old = os.umask(0o027)
    try:
        folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        name: 0o640 for name in ("model.safetensors", "torchvision_resnet18.safetensors", "config.yaml",
                                 "package.json", "README.md")}


def test_refresh_needs_no_weights_as_after_a_clone(tmp_path, capsys):
    make_run(tmp_path / "run")
    root = tmp_path / "packages"
    root.mkdir()
    (root / "README.md").write_text(README)
    folder = export_package(tmp_path / "run", "p", root=root, log=lambda _: None)
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    for weights in folder.glob("*.safetensors"):  # gitignored: a clone has only the small files
        weights.unlink()
    assert export_module.main(["--refresh", "p", "--packages-dir", str(root)]) == 0, capsys.readouterr().err
    assert "55.5" in (folder / "README.md").read_text()
    capsys.readouterr()
    assert export_module.main(["--list", "--packages-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| p | ResNet-18 | stl10 | 3 | 4 | 55.5 | 56.5 | no (download) |"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_export_and_refresh_leave_a_clean_checkout(tmp_path):
    """A copy of pretrained_models/ in a fresh git repo with this repo's .gitignore: after an export, a refresh and
    an evaluation result written into the package, `git status` shows nothing (no -dirty commit for later runs)."""
    repo = tmp_path / "clone"
    (repo / "pretrained_models").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    for name in ("README.md", "__init__.py", "export.py", "model_card_template.md"):
        shutil.copy(REPO / "pretrained_models" / name, repo / "pretrained_models" / name)

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "clone")
    make_run(tmp_path / "run")
    root = repo / "pretrained_models"
    folder = export_package(tmp_path / "run", "p", root=root, log=lambda _: None)
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    refresh_package(folder, log=lambda _: None)
    assert "55.5" in (folder / "README.md").read_text()
    assert git("status", "--porcelain", "--untracked-files=all") == ""


def data_row(folder):
    return next(line for line in (folder / "README.md").read_text().splitlines() if line.startswith("| Data |"))


def test_model_card_claims_no_image_count_that_was_not_counted(tmp_path):
    make_run(tmp_path / "run")
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    row = data_row(folder)
    assert "stl10" in row and "train + unlabeled" in row and "105,000" not in row and "images" not in row
    write_eval(folder, packages.file_sha256(folder / "model.safetensors"), "model_stl10", 55.5)
    path = folder / "eval" / "model_stl10.json"
    results = json.loads(path.read_text())
    results["dataset"]["root"] = yaml.safe_load((folder / "config.yaml").read_text())["dataset"]["root"]
    results["splits"] = {"fit": "train", "report": "test", "train": 86, "test": 20}
    path.write_text(json.dumps(results))
    refresh_package(folder, log=lambda _: None)
    assert "86 labelled train and 20 test images" in data_row(folder) and "105,000" not in data_row(folder)
    assert "fit on train (86 images), scored on test (20 images)" in (folder / "README.md").read_text()


def test_one_resolver_a_bare_run_name_works_and_a_run_and_package_of_one_name_is_an_error(
        exported, packages_root, tmp_path, monkeypatch, capsys):
    from feature_eval import finetune as finetune_module

    monkeypatch.chdir(tmp_path)  # runs/ is the working directory's, as for run.py
    make_run(tmp_path / "runs" / "stl")
    make_run(tmp_path / "runs" / "resnet-18_3-epochs", seed=2)  # the package's name too
    assert resolve_checkpoint("stl") == tmp_path.joinpath("runs", "stl", "checkpoints", "last.pt").relative_to(tmp_path)
    assert load_encoder("stl").checkpoint_path == "runs/stl/checkpoints/last.pt"
    assert export_module.main(["stl", "--as", "from-stl", "--packages-dir", str(tmp_path / "pk")]) == 0
    both = r"'resnet-18_3-epochs' is both the run runs/resnet-18_3-epochs and the package .*resnet-18_3-epochs: pass"
    for call in (resolve_checkpoint, load_encoder):
        with pytest.raises(CheckpointLoadError, match=both):
            call("resnet-18_3-epochs")
    capsys.readouterr()
    for main, argv in ((export_module.main, ["resnet-18_3-epochs", "--as", "x", "--packages-dir", str(tmp_path)]),
                       (finetune_module.main, ["--checkpoint", "resnet-18_3-epochs", "--device", "cpu"])):
        assert main(argv) == 1  # a name that resolves to two checkpoints: a checkpoint error
        err = capsys.readouterr().err
        assert "is both the run" in err and err.count("\n") == 1
    # A path says which one.
    assert resolve_checkpoint("runs/resnet-18_3-epochs").parts[-3:] == ("resnet-18_3-epochs", "checkpoints", "last.pt")
    assert resolve_checkpoint(exported["folder"]) == exported["folder"] / "model.safetensors"


def test_card_shows_the_last_whole_epoch_of_a_metrics_file_cut_short_by_a_crash(tmp_path):
    make_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"kind": "epoch", "epoch": 3, "train_loss": 1.25}) + "\n" + '{"kind": "ep')
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    assert "| Last epoch | train_loss 1.25 |" in (folder / "README.md").read_text()
    assert json.loads((folder / "package.json").read_text())["source"]["git_commit"] == "abc123"


def test_card_commands_are_rebuilt_word_by_word_for_the_package():
    def card(command: str, name: str) -> str:
        manifest = {"name": name, "base_model": "resnet18", "cifar_stem": False, "feature_dim": 512, "out_dim": 8,
                    "files": {}}
        return export_module.model_card(manifest, {}, [Results.from_json({"command": command, "rows": []})])

    spaced = "python -m feature_eval.evaluate --checkpoint 'runs/img run' --knn-k 3 --out-dir /tmp/x"
    # the package's own eval/, no stale path
    assert "package: `python -m feature_eval.evaluate --checkpoint img-enc --knn-k 3`" in card(spaced, "img-enc")
    joined = "python -m feature_eval.evaluate --checkpoint=runs/t --out-dir=/x --seed 1"
    assert "package: `python -m feature_eval.evaluate --checkpoint pk --seed 1`" in card(joined, "pk")
    assert f"Produced by `{joined}`" in card(joined, "pk")


def test_a_package_may_not_take_the_name_of_a_run_and_a_run_name_with_a_space_resolves(exported, tmp_path,
                                                                                        monkeypatch, capsys):
    import models.loading

    runs, packages = tmp_path / "runs", tmp_path / "packages"
    make_run(runs / "enc")
    make_run(runs / "my run")
    monkeypatch.setattr(export_module, "PACKAGES_DIR", packages)
    monkeypatch.setattr(export_module, "RUNS_DIR", runs)
    monkeypatch.setattr(models.loading, "RUNS_DIR", runs)
    with pytest.raises(export_module.ExportError, match="runs/enc is a run of that name"):
        export_package(runs / "enc", "enc", root=packages, log=lambda *_: None)
    assert resolve_checkpoint("my run") == runs / "my run" / "checkpoints" / "last.pt"



V1 = Path(__file__).parent / "data" / "results_v1"  # results files as feature_eval wrote them before typed rows


def v1_results(name: str, **changes) -> Results:
    return Results.from_json({**json.loads((V1 / f"{name}.json").read_text()), **changes})


def test_the_card_spells_config_values_as_config_yaml_does():
    manifest = {"name": "p", "base_model": "resnet18", "cifar_stem": False, "feature_dim": 512, "out_dim": 8,
                "files": {}}
    config = {"fp16_precision": False, "optimizer": {"cosine": True, "lr_scaling": None}, "dataset": {"blur": True}}
    recipe = next(line for line in export_module.model_card(manifest, config, []).splitlines()
                  if line.startswith("| Recipe |"))
    assert "cosine true" in recipe and "scaling null" in recipe and "blur true" in recipe
    assert "mixed precision false" in recipe and not re.search(r"\b(True|False|None)\b", recipe)
    assert "| Epochs | unknown (of unknown configured) |" in export_module.model_card(manifest, config, [])


def test_the_card_spells_every_image_count_alike_and_shows_the_fine_tune_epochs_of_fine_tune_rows():
    manifest = {"name": "p", "base_model": "resnet18", "cifar_stem": False, "feature_dim": 512, "out_dim": 8,
                "files": {}}
    evaluation, finetune = (v1_results(name, splits={**json.loads((V1 / f"{name}.json").read_text())["splits"],
                                                     "test": 1200})
                            for name in ("last_digits", "last_digits_finetune-1pct"))
    card = export_module.model_card(manifest, {"dataset": {"name": "digits", "root": "data"}}, [evaluation, finetune])
    assert "1437" not in card and "1200" not in card  # the v1 results files spell 1437
    assert "counted 1,437 labelled train and 1,200 test images" in card
    assert "fit on train (1,437 images), scored on test (1,200 images)" in card
    assert "fit on 14 of 1,437 train images (0.974%; --label-fraction 0.01), scored on test (1,200 images)" in card
    linear, tuned = card.split("On digits (16 px)")[1:]
    assert "| Protocol | Feature extractor | Top-1 % | Top-5 % |" in linear and "Fine-tune epochs" not in linear
    top1 = f"{finetune.rows[0].top1:.1f}"
    assert "| Protocol | Feature extractor | Fine-tune epochs | Top-1 % | Top-5 % |" in tuned
    assert f"| Fine-tuned end to end (0.974% labels) | SimCLR | 1 | {top1} |" in tuned


def test_a_package_eval_caption_names_the_package_not_the_exporting_machine_s_paths(tmp_path):
    """The captions of the markdown tables in a package's eval/ name the package and its command; the JSON keeps
    the checkpoint path and command as run, as evidence. A refresh does the same for the package's own results."""
    _, checkpoint = make_run(tmp_path / "run")
    (tmp_path / "run" / "eval").mkdir()
    for name in ("last_digits_finetune-1pct", "last_digits"):
        record = json.loads((V1 / f"{name}.json").read_text())
        record["checkpoint_sha256"] = packages.file_sha256(checkpoint)  # the run's weights, as when it evaluated
        (tmp_path / "run" / "eval" / f"{name}.json").write_text(json.dumps(record))
        shutil.copy(V1 / f"{name}.md", tmp_path / "run" / "eval")
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    tuned = (folder / "eval" / "last_digits_finetune-1pct.md").read_text()
    assert tuned.startswith("`p` fine-tuned end to end on digits") and "/tmp/res" not in tuned
    assert "Command: `python -m feature_eval.finetune --checkpoint p --label-fraction 0.01 --epochs 1 --lrs 0.1`" \
        in tuned and "runs/tiny" not in tuned
    assert (folder / "eval" / "last_digits.md").read_text().startswith("Frozen features of `p` on digits (16px)")
    assert json.loads((folder / "eval" / "last_digits_finetune-1pct.json").read_text())["command"] == \
        "python -m feature_eval.finetune --checkpoint runs/tiny --label-fraction 0.01 --epochs 1 --lrs 0.1"
    assert "/tmp/res" in (tmp_path / "run" / "eval" / "last_digits.md").read_text()  # the run's own stay as written
    own = folder / "model.safetensors"
    record = {**json.loads((V1 / "last_digits.json").read_text()), "checkpoint": str(own),
              "checkpoint_sha256": packages.file_sha256(own), "command": f"python -m feature_eval.evaluate "
                                                                        f"--checkpoint {folder}"}
    (folder / "eval" / "model_digits.json").write_text(json.dumps(record))
    (folder / "eval" / "model_digits.md").write_text(f"Frozen features of `{own}` on digits (16px). Command: "
                                                     f"`{record['command']}`\n\n| table |\n")
    refresh_package(folder, log=lambda _: None)
    assert (folder / "eval" / "model_digits.md").read_text() == (
        "Frozen features of `p` on digits (16px). Command: `python -m feature_eval.evaluate --checkpoint p`\n\n"
        "| table |\n")

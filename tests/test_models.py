import pytest
import torch
import torchvision

from models import create_model, load_encoder
from models.resnet_simclr import ARCHITECTURES, FEATURE_DIMS
from models.loading import CheckpointLoadError
from simclr.checkpoint import save_checkpoint
from simclr.config import config_to_dict, load_config


@pytest.mark.parametrize("base_model, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_shapes(base_model, dim):
    model = create_model(base_model, out_dim=32)
    h, z = model(torch.rand(2, 3, 64, 64))
    assert h.shape == (2, dim) and z.shape == (2, 32)
    assert model.encoder.feature_dim == dim


def test_cifar_stem_keeps_resolution():
    model = create_model("resnet18", 16, cifar_stem=True)
    assert model.encoder.backbone.conv1.stride == (1, 1)
    assert isinstance(model.encoder.backbone.maxpool, torch.nn.Identity)
    h, z = model(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, 512)


def test_every_parameter_gets_a_finite_gradient():
    from loss.nt_xent import NTXentLoss

    torch.manual_seed(0)
    model = create_model("resnet18", 16, cifar_stem=True)
    x = torch.rand(8, 3, 16, 16)
    _, z = model(x)
    NTXentLoss(0.5)(z[:4], z[4:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_encoder_keys_fit_torchvision():
    model = create_model("resnet18", 16)
    result = torchvision.models.resnet18().load_state_dict(
        {k[len("backbone."):]: v for k, v in model.encoder.state_dict().items()}, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def _checkpoint(tmp_path, base_model="resnet18", cifar_stem=True):
    config = load_config(None, [f"model.base_model={base_model}", f"model.cifar_stem={cifar_stem}", "model.out_dim=8"])
    model = create_model(base_model, 8, cifar_stem)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(config), "next_epoch": 1,
                           "optimizer": {}})
    return model, path


def test_load_encoder_from_file_and_run_dir(tmp_path):
    model, path = _checkpoint(tmp_path)
    for source in (path, tmp_path / "run"):
        encoder = load_encoder(source)
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
        x = torch.rand(3, 3, 16, 16)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(encoder(x), model.encoder(x))
    assert torch.load(path, weights_only=True)["model"].keys() == model.state_dict().keys()


def test_load_encoder_errors(tmp_path):
    with pytest.raises(CheckpointLoadError, match="not found"):
        load_encoder(tmp_path / "missing.pt")
    with pytest.raises(CheckpointLoadError, match="no checkpoints/last.pt"):
        load_encoder(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointLoadError, match="damaged"):
        load_encoder(bad)
    # weights of another architecture under a resnet18 config
    _, path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    state["model"] = create_model("resnet50", 8).state_dict()
    torch.save(state, path)
    with pytest.raises(CheckpointLoadError, match="does not fit a resnet18"):
        load_encoder(path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointLoadError, match="refused"):
        load_encoder(path)


def test_projection_head_default_is_the_papers_two_layer_mlp():
    head = create_model("resnet18", 16).head.net
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None and head[2].out_features == 16


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_projection_head_depth_and_batch_norm(layers):
    head = create_model("resnet18", 16, head_layers=layers, head_bn=True).head
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    norms = [m for m in head.net if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == layers and len(norms) == layers
    assert all(m.bias is None for m in linears)  # BatchNorm would cancel a bias
    assert not norms[-1].affine and all(m.affine for m in norms[:-1])
    assert sum(isinstance(m, torch.nn.ReLU) for m in head.net) == layers - 1
    head.train()
    z = head(torch.randn(64, 512) * 7 + 3)  # (B, out_dim)
    assert z.shape == (64, 16)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-4)  # the last BatchNorm normalises each output
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(16), atol=1e-2)


def test_head_keys_come_from_the_config_in_training(tmp_path):
    from simclr.trainer import Trainer
    from simclr.dist import DistInfo

    config = load_config(None, ["dataset.name=digits", "model.head_layers=3", "model.head_bn=true", "device=cpu",
                                "batch_size=8", "model.out_dim=8", f"run_dir={tmp_path / 'run'}",
                                "dataset.input_shape=(16,16,3)"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
    assert sum(isinstance(m, torch.nn.Linear) for m in trainer.model.head.net) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in trainer.model.head.net) == 3


@pytest.mark.parametrize("override", ["model.head_layers=0", "model.head_layers=5", "model.head_bn=maybe"])
def test_head_keys_are_validated(override):
    from simclr.config import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_an_older_checkpoint_is_upgraded_by_its_version_and_read_strictly(tmp_path):
    """A version-1 file written before `head_layers`/`head_bn` existed loads as the 2-layer head it trained with;
    a file of a newer format is refused with a message that says so."""
    from models.loading import read_weights

    model, path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    for key in ("head_layers", "head_bn"):
        del state["config"]["model"][key]
    torch.save(state, path)
    upgraded = read_weights(path)
    assert upgraded["config"]["model"]["head_layers"] == 2 and upgraded["config"]["model"]["head_bn"] is False
    assert "head_layers" not in torch.load(path, weights_only=True)["config"]["model"]  # the file is not changed
    assert load_encoder(path).config["model"] == {**upgraded["config"]["model"], "out_dim": 8}
    state["version"] = 99
    torch.save(state, path)
    with pytest.raises(CheckpointLoadError, match="format version 99.*reads up to 1"):
        read_weights(path)


def test_a_checkpoint_without_a_training_config_is_a_clear_error(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"model": create_model("resnet18", 8).state_dict()}, path)
    with pytest.raises(CheckpointLoadError, match="no training config"):
        load_encoder(path)


# The ResNet family beyond resnet18: the heavy trunks (60-125 M parameters, several seconds each on 2 CPU cores)
# run in the slow set only.
_LIGHT_TRUNKS = ("resnet34", "resnet50", "resnext50_32x4d")


@pytest.mark.parametrize("base_model", [
    name if name in _LIGHT_TRUNKS else pytest.param(name, marks=pytest.mark.slow)
    for name in FEATURE_DIMS if name != "resnet18"])  # resnet18: every other test here
def test_every_resnet_family_trunk_trains_a_step_and_loads_back(base_model, tmp_path):
    """Built from `model.base_model` by the trainer, one optimiser step on 16 px views (BatchNorm sees 2 x 2
    images), then saved and read back through `load_encoder` with the feature size the tables print."""
    from simclr.dist import DistInfo
    from simclr.trainer import Trainer

    config = load_config(None, ["dataset.name=digits", f"model.base_model={base_model}", "model.out_dim=8",
                                "batch_size=2", "device=cpu", "dataset.input_shape=(16,16,3)",
                                f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
    assert trainer.model.encoder.feature_dim == FEATURE_DIMS[base_model] == trainer.model.head.net[0].in_features
    before = trainer.model.encoder.backbone.conv1.weight.detach().clone()
    x1, x2 = next(iter(trainer.train_batches.batches(0)))
    loss, _ = trainer.train_step(x1, x2)
    assert torch.isfinite(loss) and not torch.equal(before, trainer.model.encoder.backbone.conv1.weight)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": trainer.model.state_dict(), "config": config_to_dict(config), "next_epoch": 1,
                           "optimizer": {}})
    encoder = load_encoder(path)
    assert encoder.feature_dim == FEATURE_DIMS[base_model] and ARCHITECTURES[base_model]
    trainer.model.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), trainer.model.encoder(x))  # (2, D)


def test_the_config_and_the_models_list_the_same_trunks():
    from simclr.config import BASE_MODELS

    assert tuple(FEATURE_DIMS) == BASE_MODELS == tuple(ARCHITECTURES)


def test_the_cifar_stem_fits_a_bottleneck_trunk():
    model = create_model("resnext50_32x4d", 8, cifar_stem=True)
    h, _ = model(torch.rand(2, 3, 16, 16))
    assert h.shape == (2, 2048) and model.encoder.backbone.conv1.stride == (1, 1)

"""feature_eval: protocols against scikit-learn and hand computation, the frozen encoder, caching, CLI errors."""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from feature_eval import context as context_module
from feature_eval import evaluate as evaluate_module
from feature_eval import features as features_module
from feature_eval.classifiers import (adam_probe, holdout_split, knn_classifier, lbfgs_probe, topk_accuracy,
                                      weighted_knn)
from feature_eval.features import FeatureSplit, cached_features, extract_features
from models.loading import CheckpointLoadError
from models.resnet_simclr import Encoder, create_model
from simclr.checkpoint import save_checkpoint
from simclr.config import DatasetConfig, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small problems run faster on one thread, and far faster when other processes share the cores."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # numpy's BLAS, which scikit-learn uses
        yield
    torch.set_num_threads(threads)


def make_checkpoint(path: Path, base_model: str = "resnet18", config_model: str | None = None,
                    input_size: int = 16, out_dim: int = 16) -> Path:
    """A checkpoint of an untrained model on digits (seeded), as the trainer would save it."""
    config = load_config(None, ["dataset.name=digits", f"model.out_dim={out_dim}", "epochs=3",
                                f"model.base_model={config_model or base_model}",
                                f"dataset.input_shape=({input_size},{input_size},3)"])
    torch.manual_seed(1)
    model = create_model(base_model, out_dim)
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(config), "next_epoch": 3})
    return path


def features_problem(n_train=300, n_test=90, dim=24, classes=5, seed=0):
    """Noisy Gaussian clusters: features float32, labels int64."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, dim))
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    scale = rng.uniform(0.5, 5, dim)  # unequal scales: standardisation matters
    x_train = ((centres[y_train] + rng.normal(0, 1.2, (n_train, dim))) * scale).astype(np.float32)
    x_test = ((centres[y_test] + rng.normal(0, 1.2, (n_test, dim))) * scale).astype(np.float32)
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------- protocols against references

def test_lbfgs_equals_sklearn_on_the_same_features():
    x_train, y_train, x_test, y_test = features_problem()
    result = lbfgs_probe(torch.from_numpy(x_train), torch.from_numpy(y_train), x_test, y_test, C=0.5, max_iter=500)
    scaler = StandardScaler().fit(x_train.astype(np.float64))
    clf = LogisticRegression(solver="lbfgs", C=0.5, max_iter=500, random_state=0)
    clf.fit(scaler.transform(x_train.astype(np.float64)), y_train)
    reference = scaler.transform(x_test.astype(np.float64))
    np.testing.assert_array_equal(result.predictions, clf.predict(reference))
    assert result.top1 == pytest.approx(100 * clf.score(reference, y_test))
    top5 = np.argsort(-clf.predict_proba(reference), axis=1, kind="stable")[:, :5]
    assert result.top5 == pytest.approx(100 * (top5 == y_test[:, None]).any(1).mean())
    assert 40 < result.top1 < 100  # the problem is neither trivial nor hopeless
    assert result.details["converged"]


@pytest.mark.parametrize("n_test, query_chunk, key_chunk", [(90, 256, 8192), (90, 7, 50), (1, 256, 8192), (7, 3, 31)])
def test_seed_knn_equals_sklearn(n_test, query_chunk, key_chunk):
    x_train, y_train, x_test, y_test = features_problem(n_test=90)
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    result = knn_classifier(x_train, y_train, x_test, y_test, k=10, query_chunk=query_chunk, key_chunk=key_chunk)
    scaler = StandardScaler().fit(x_train.astype(np.float64))
    knn = KNeighborsClassifier(n_neighbors=10).fit(scaler.transform(x_train.astype(np.float64)), y_train)
    reference = scaler.transform(x_test.astype(np.float64))
    np.testing.assert_array_equal(result.predictions, knn.predict(reference))
    np.testing.assert_allclose(result.scores, 10 * knn.predict_proba(reference))  # votes
    assert result.top1 == pytest.approx(100 * knn.score(reference, y_test))


def test_weighted_knn_on_ten_points_by_hand():
    s3 = math.sqrt(3)
    train = np.array([[1, 0], [2, 0], [1, s3], [0, 3], [-1, 0], [1, -s3], [-1, s3], [0, -1], [-1, -s3], [-5, 0]])
    labels = np.array([0, 1, 1, 2, 0, 2, 0, 1, 2, 1])
    # Cosines with (3, 0): 1, 1, .5, 0, -1, .5, -.5, 0, -.5, -1. With (0, -2): 0, 0, -.87, -1, 0, .87, -.87, 1, .87, 0.
    queries = np.array([[3.0, 0.0], [0.0, -2.0]])
    e = math.exp
    result = weighted_knn(train, labels, queries, np.array([1, 2]), k=4, temperature=0.5)
    # Query 1, k=4: (1, class 0), (1, class 1), (.5, class 1), (.5, class 2); weights exp(cos / 0.5).
    np.testing.assert_allclose(result.scores[0], [e(2), e(2) + e(1), e(1)], rtol=1e-5)
    # Query 2, k=4: (1, class 1), (.87, class 2), (.87, class 2), then a cosine-0 tie: the first item (class 0).
    np.testing.assert_allclose(result.scores[1], [e(0), e(2), 2 * e(s3)], rtol=1e-5)
    np.testing.assert_array_equal(result.predictions, [1, 2])  # two fairly close neighbours beat one close one
    assert result.top1 == 100.0 and result.top5 == 100.0  # top-5 of three classes is top-3
    sharp = weighted_knn(train, labels, queries, None, k=3, temperature=0.1)
    np.testing.assert_allclose(sharp.scores[1], [0, e(10), 2 * e(10 * s3 / 2)], rtol=1e-5)
    assert sharp.predictions[1] == 1  # a low temperature lets the closest neighbour win
    assert sharp.top1 is None
    # The same answer whatever the chunking, down to one query and two keys at a time.
    chunked = weighted_knn(train, labels, queries, None, k=4, temperature=0.5, query_chunk=1, key_chunk=2)
    np.testing.assert_allclose(chunked.scores, result.scores)


def test_weighted_knn_matches_a_slow_loop_for_1_and_7_test_items():
    x_train, y_train, x_test, _ = features_problem(n_train=120, n_test=7)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(x_test.astype(np.float64)) @ unit(x_train.astype(np.float64)).T
    expected = np.zeros((7, 5))
    for i in range(7):
        for j in np.argsort(-sims[i], kind="stable")[:20]:
            expected[i, y_train[j]] += math.exp(sims[i, j] / 0.1)
    for n in (1, 7):
        got = weighted_knn(x_train, y_train, x_test[:n], None, num_classes=5, k=20, query_chunk=3, key_chunk=16)
        np.testing.assert_allclose(got.scores, expected[:n], rtol=1e-4)


def test_topk_caps_k_at_the_number_of_classes_and_breaks_ties_low():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert topk_accuracy(scores, [2, 1, 2], ks=(1, 2, 5)) == pytest.approx([0.0, 200 / 3, 100.0])
    assert topk_accuracy(scores, [0, 0, 0], ks=(1,)) == pytest.approx([200 / 3])  # ties go to the lower class


# ---------------------------------------------------------------- the Adam probe and the test set

class RecordedLabels:
    """Test labels that write down every read into a shared event list."""

    def __init__(self, labels, events):
        self.labels, self.events = np.asarray(labels), events

    def __array__(self, dtype=None, copy=None):
        self.events.append("test labels read")
        return self.labels if dtype is None else self.labels.astype(dtype)

    def __len__(self):
        self.events.append("test labels read")
        return len(self.labels)

    def __getitem__(self, index):
        self.events.append("test labels read")
        return self.labels[index]

    def __iter__(self):
        self.events.append("test labels read")
        return iter(self.labels)


def test_adam_probe_reads_test_labels_only_after_its_last_step(monkeypatch):
    x_train, y_train, x_test, y_test = features_problem(n_train=200, n_test=60)
    events = []
    step = torch.optim.Adam.step

    def recorded_step(self, *args, **kwargs):
        events.append("step")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recorded_step)
    result = adam_probe(x_train, y_train, x_test, RecordedLabels(y_test, events), max_epochs=20, eval_every=5)
    assert "test labels read" in events and events.count("step") > 20
    first_read = events.index("test labels read")
    assert "step" not in events[first_read:], "the probe read test labels before it finished training"
    assert result.top1 == pytest.approx(100 * (result.predictions == y_test).mean())


def test_adam_probe_choice_and_predictions_do_not_depend_on_test_labels():
    x_train, y_train, x_test, y_test = features_problem(n_train=200, n_test=60)
    kwargs = dict(max_epochs=20, eval_every=5, weight_decays=(0.0, 1e-2, 1.0))
    true = adam_probe(x_train, y_train, x_test, y_test, **kwargs)
    permuted = adam_probe(x_train, y_train, x_test, np.random.default_rng(3).permutation(y_test), **kwargs)
    unlabelled = adam_probe(x_train, y_train, x_test, None, **kwargs)
    for other in (permuted, unlabelled):
        assert other.details == true.details
        np.testing.assert_array_equal(other.scores, true.scores)
    assert unlabelled.top1 is None and true.top1 != permuted.top1
    fit, valid = holdout_split(y_train, 0.2, seed=0)
    assert true.details["fit_items"] == len(fit) == 160 and true.details["valid_items"] == len(valid) == 40
    assert not set(fit) & set(valid)
    grid = true.details["valid_top1_grid"]
    assert true.details["valid_top1"] == max(acc for by_epoch in grid.values() for acc in by_epoch.values())
    assert true.top1 > 40


def test_adam_probe_batched_grid_equals_one_layer_trained_alone():
    from feature_eval.classifiers import _fit_linear

    x_train, y_train, _, _ = features_problem(n_train=120)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    *_, stacked = _fit_linear(x, y, 5, (0.0, 1e-2), epochs=3, lr=1e-3, batch_size=32, seed=0)
    layer = torch.nn.Linear(x.shape[1], 5)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    xs = (x - x.mean(0)) / x.std(0, unbiased=False)
    for _ in range(3):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            loss = torch.nn.functional.cross_entropy(layer(xs[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(stacked.weight[1].detach(), layer.weight.detach().T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stacked.bias[1].detach(), layer.bias.detach(), atol=1e-6, rtol=1e-5)


def test_adam_probe_trains_on_one_cpu_thread_and_restores_the_callers_count(monkeypatch):
    x_train, y_train, x_test, _ = features_problem(n_train=60, n_test=10)
    threads, step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: threads.append(torch.get_num_threads())
                        or step(self, *a, **k))
    torch.set_num_threads(2)  # the module's fixture set 1; it restores the machine's count after
    adam_probe(x_train, y_train, x_test, max_epochs=2, eval_every=1, weight_decays=(0.0,))
    assert threads and set(threads) == {1} and torch.get_num_threads() == 2
    torch.set_num_threads(1)


# ---------------------------------------------------------------- features: frozen, batched, cached

class _Images(torch.utils.data.Dataset):
    """A data set without `.images`, to exercise the DataLoader path."""

    def __init__(self, images, labels):
        self.images_, self.labels_ = images, labels

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return self.images_[i], int(self.labels_[i])


def test_extract_features_leaves_the_encoder_untouched_and_matches_a_plain_loop():
    from data_aug.datasets import TensorImages
    from data_aug.views import create_eval_transform

    torch.manual_seed(0)
    images = torch.randint(0, 256, (13, 3, 20, 20), dtype=torch.uint8)
    labels = torch.arange(13) % 3
    encoder = Encoder("resnet18")
    encoder.train()  # as a careless caller might hand it over: BatchNorm would update in this mode
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    got = extract_features(encoder, TensorImages(images, labels, ["a", "b", "c"]), crop_size=16, batch_size=5,
                           device="cpu")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during feature extraction"
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())  # the caller's mode is restored
    assert not got.features.requires_grad
    encoder.eval()
    transform = create_eval_transform(16)
    with torch.no_grad():
        expected = torch.cat([encoder(transform(img)[None]) for img in images])
    torch.testing.assert_close(got.features, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.labels, labels)
    loader_path = extract_features(encoder, _Images(images, labels), crop_size=16, batch_size=4, device="cpu")
    torch.testing.assert_close(loader_path.features, expected, atol=1e-4, rtol=1e-4)


def test_cached_features_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return FeatureSplit(torch.randn(4, 3), torch.arange(4))

    first = cached_features(tmp_path, {"split": "train"}, compute, log=lambda *_: None)
    again = cached_features(tmp_path, {"split": "train"}, compute, log=lambda *_: None)
    assert len(calls) == 1 and torch.equal(first.features, again.features)
    cached_features(tmp_path, {"split": "test"}, compute, log=lambda *_: None)
    assert len(calls) == 2
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable"):
        cached_features(tmp_path, {"split": "train"}, compute, log=lambda *_: None)
    assert len(calls) == 3


def test_pca_features_fits_once_for_both_splits_and_again_only_for_a_lost_split(tmp_path, monkeypatch):
    import feature_eval.baselines as baselines
    from data_aug.datasets import TensorImages

    g = torch.Generator().manual_seed(0)
    train, test = (TensorImages(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                                torch.arange(n) % 2, ["a", "b"]) for n in (12, 6))
    calls, fit = [], baselines.pca_baseline
    monkeypatch.setattr(baselines, "pca_baseline", lambda *a, **k: calls.append(1) or fit(*a, **k))
    first = baselines.pca_features(train, test, 8, 4, cache_dir=tmp_path, log=lambda *_: None)
    assert len(calls) == 1 and first[0].features.shape == (12, 4) and first[1].features.shape == (6, 4)
    assert first[2]["n_components"] == 4 and 0 < first[2]["explained_variance"] <= 1
    for path in tmp_path.glob("*.pt"):  # the test split's file lost: one fit, and train read back
        if len(torch.load(path, weights_only=True)["labels"]) == 6:
            path.unlink()
    again = baselines.pca_features(train, test, 8, 4, cache_dir=tmp_path, log=lambda *_: None)
    assert len(calls) == 2 and all(torch.equal(a.features, b.features) for a, b in zip(first[:2], again[:2]))


# ---------------------------------------------------------------- evaluate(), the files, the CLI

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_checkpoint(run / "checkpoints" / "last.pt")
    return run


@pytest.mark.slow
def test_evaluate_writes_table_and_json_and_keeps_the_encoder(tiny_run, monkeypatch):
    loaded = {}
    load = context_module.encoder_from_state

    def recording_load(state, path, device):
        encoder = load(state, path, device)
        loaded["encoder"], loaded["state"] = encoder, {k: v.clone() for k, v in encoder.state_dict().items()}
        return encoder

    monkeypatch.setattr(context_module, "encoder_from_state", recording_load)
    out = evaluate_module.evaluate(tiny_run, classifiers="lbfgs,knn", baselines="pca,random", device="cpu",
                                   max_iter=300, log=lambda *_: None)
    for key, value in loaded["encoder"].state_dict().items():
        assert torch.equal(value, loaded["state"][key]), f"{key} changed during evaluation"
    rows = out.results["rows"]
    assert [(r["classifier"], r["extractor"]) for r in rows] == [
        (c, e) for c in ("lbfgs", "knn", "weighted_knn") for e in ("simclr", "pca", "random")]
    assert out.results["splits"]["train"] == 1437 and out.results["splits"]["test"] == 360
    assert out.results["dataset"]["name"] == "digits" and out.results["dataset"]["input_size"] == 16
    assert out.results["seed"] == 0 and out.results["trained_epochs"] == 3
    pca = next(r for r in rows if r["extractor"] == "pca")
    assert pca["feature_dim"] == 16 and pca["architecture"] is None  # the projection size, out_dim
    # The lbfgs row is scikit-learn run directly on the same features.
    train, test = out.features["simclr"]
    scaler = StandardScaler().fit(train.features.numpy().astype(np.float64))
    clf = LogisticRegression(solver="lbfgs", C=1.0, max_iter=300, random_state=0).fit(
        scaler.transform(train.features.numpy().astype(np.float64)), train.labels.numpy())
    assert rows[0]["top1"] == pytest.approx(100 * clf.score(scaler.transform(test.features.numpy().astype(
        np.float64)), test.labels.numpy()))
    knn = KNeighborsClassifier(10).fit(scaler.transform(train.features.numpy().astype(np.float64)), train.labels)
    assert rows[3]["top1"] == pytest.approx(100 * knn.score(scaler.transform(test.features.numpy().astype(
        np.float64)), test.labels))
    # Files: the table in the original repository's columns and every number in JSON.
    table = out.paths["markdown"].read_text()
    assert out.paths["markdown"] == tiny_run / "eval" / "last_digits.md"
    assert "| Classifier | Feature extractor | Architecture | Feature dim | Projection dim | Epochs | Top-1 % | " \
           "Top-5 % |" in table
    assert f"| {rows[0]['top1']:.1f} |" in table and table.count("\n| ") == 1 + len(rows)
    saved = json.loads(out.paths["json"].read_text())
    assert saved["rows"][0]["top1"] == rows[0]["top1"] and saved["checkpoint"].endswith("last.pt")
    # The second evaluation reads the cached features instead of running the encoder.
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: pytest.fail("features not cached"))
    again = evaluate_module.evaluate(tiny_run, classifiers="knn", device="cpu", write=False, log=lambda *_: None)
    assert again.results["rows"][0]["top1"] == rows[3]["top1"] and not again.paths


@pytest.mark.slow
def test_evaluate_run_prints_the_table(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "RUN_CLASSIFIERS", ("knn",))  # the full default set is run by the quickstart
    monkeypatch.setattr(evaluate_module, "RUN_BASELINES", ("random",))
    evaluation = evaluate_module.evaluate_run(tiny_run)
    printed = capsys.readouterr().out
    assert "| Weighted KNN (k=200, T=0.1) | Random init |" in printed and evaluation.paths["json"].is_file()
    # the JSON records the command run.py prints when it fails (the options rewritten to cover rows kept from before)
    start = evaluate_module.rerun_command(tiny_run).split(" --classifiers ")[0] + " --classifiers "
    assert evaluation.results["command"].startswith(start)


def test_an_evaluation_from_python_records_the_command_that_makes_it_again(tiny_run, tmp_path):
    """No command line asked for it: the JSON records the equivalent one, built from the options (not null)."""
    options = dict(classifiers="knn", baselines="random", knn_k=5, plots=False, cache=False, device="cpu",
                   skip_bad_images=False, out_dir=str(tmp_path / "my out"))
    result = evaluate_module.evaluate(tiny_run, log=lambda *_: None, **options)
    words = shlex.split(result.results["command"])
    assert words[:5] == ["python", "-m", "feature_eval.evaluate", "--checkpoint", str(tiny_run)]
    args = vars(evaluate_module.parse_args(words[3:]))
    again = evaluate_module.EvalOptions(**{key: value for key, value in args.items() if key != "checkpoint"})
    assert again == evaluate_module.EvalOptions(**options) and "--max-iter" not in words  # defaults left out
    assert evaluate_module.rerun_command("runs/a b") == ("python -m feature_eval.evaluate --checkpoint 'runs/a b' "
                                                         "--classifiers lbfgs,adam,knn --baselines random,pca")


def test_evaluate_run_raises_a_user_error_for_run_py_to_report(tmp_path):
    """run.py turns it into one line and a non-zero exit (tests/test_exit_codes.py)."""
    with pytest.raises(CheckpointLoadError, match="nowhere"):
        evaluate_module.evaluate_run(tmp_path / "nowhere")


def run_cli(argv, capsys) -> tuple[int, str]:
    code = evaluate_module.main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_missing_checkpoint_is_one_line_exit_1(tmp_path, capsys):
    code, err = run_cli(["--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert code == 1 and err.count("\n") == 0 and "missing.pt" in err and "not found" in err
    code, err = run_cli(["--checkpoint", str(tmp_path)], capsys)
    assert code == 1 and "checkpoints/last.pt" in err


def test_cli_other_architecture_is_one_line_exit_1(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "r50.pt", base_model="resnet50", config_model="resnet18")
    code, err = run_cli(["--checkpoint", str(path)], capsys)
    assert code == 1 and err.count("\n") == 0 and "r50.pt" in err and "resnet18" in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    code, err = run_cli(["--checkpoint", str(foreign)], capsys)
    assert code == 1 and err.count("\n") == 0 and "foreign.pt" in err


def test_cli_bad_options_are_one_line_exit_2(tiny_run, capsys):
    code, err = run_cli(["--checkpoint", str(tiny_run), "--classifiers", "lbfgs,svm"], capsys)
    assert code == 2 and "svm" in err and "lbfgs, adam, knn" in err and err.count("\n") == 0
    code, err = run_cli(["--checkpoint", str(tiny_run), "--dataset", "mnist"], capsys)
    assert code == 2 and "mnist" in err and err.count("\n") == 0
    code, err = run_cli(["--checkpoint", str(tiny_run), "--dataset", "stl10", "--root", str(tiny_run / "no")], capsys)
    assert code == 1 and "STL10" in err and err.count("\n") == 0  # missing data: a runtime error
    assert "pass --download" in err and "dataset.download" not in err  # the option of this command, not a config key
    with pytest.raises(SystemExit) as stop:
        evaluate_module.main(["--checkpoint", str(tiny_run), "--input-size", "0"])
    assert stop.value.code == 2 and "--input-size" in capsys.readouterr().err


def test_options_are_held_to_the_bounds_the_command_line_checks():
    """The Python API checks each bounded option as the command line does, in one line that names it."""
    with pytest.raises(context_module.EvalError, match=r"--knn-k 0: must be at least 1"):
        evaluate_module.EvalOptions(knn_k=0)
    with pytest.raises(context_module.EvalError, match=r"--input-size 4: must be at least 8"):
        evaluate_module.evaluate("anything", input_size=4)


def write_image_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    """`<root>/<split>/<class>/<i>.png` with `layout[split][class]` seeded random 20x20 images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_feature_cache_follows_the_data_not_only_its_size(tiny_run, tmp_path):
    """Relabelling an image (moving it to another class folder) must not reuse the old features and labels."""
    root = tmp_path / "images"
    write_image_folder(root, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    options = dict(dataset="imagefolder", root=root, classifiers="knn", device="cpu", write=False,
                   cache_dir=tmp_path / "cache", log=lambda *_: None)
    first = evaluate_module.evaluate(tiny_run, **options)
    assert first.features["simclr"][0].labels.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "train" / "a" / "2.png").rename(root / "train" / "b" / "9.png")
    second = evaluate_module.evaluate(tiny_run, **options)
    assert second.features["simclr"][0].labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # the unchanged test split was reused


def test_the_same_data_under_another_root_reuses_the_cache(tiny_run, tmp_path):
    # A run copied to another machine or folder names another data root; the content digests decide, not the path.
    logged = []
    options = dict(dataset="digits", classifiers="knn", device="cpu", write=False, cache_dir=tmp_path / "cache",
                   log=logged.append)
    first = evaluate_module.evaluate(tiny_run, root=tmp_path / "here", **options)
    logged.clear()
    second = evaluate_module.evaluate(tiny_run, root=tmp_path / "there", **options)
    assert sum("from cache" in line for line in logged) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert torch.equal(first.features["simclr"][1].features, second.features["simclr"][1].features)


def test_data_fingerprint_changes_with_pixels_labels_and_files(tmp_path):
    from data_aug.datasets import TensorImages, load_split
    from feature_eval.features import data_fingerprint

    images, labels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    base = data_fingerprint(TensorImages(images, labels, ["a", "b"]))
    assert base == data_fingerprint(TensorImages(images.clone(), labels.clone(), ["a", "b"]))
    changed = images.clone()
    changed[3, 2, 7, 7] = 1
    assert data_fingerprint(TensorImages(changed, labels, ["a", "b"])) != base
    assert data_fingerprint(TensorImages(images, labels.flip(0), ["a", "b"])) != base
    write_image_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    before = data_fingerprint(load_split("imagefolder", tmp_path, "train"))
    (tmp_path / "train" / "a" / "0.png").write_bytes((tmp_path / "train" / "b" / "1.png").read_bytes())
    assert data_fingerprint(load_split("imagefolder", tmp_path, "train")) != before  # same name, new content


def test_adam_probe_on_too_few_training_images_is_a_one_line_error(tiny_run, tmp_path, capsys):
    root = tmp_path / "images"
    write_image_folder(root, {"train": {"a": 2, "b": 1}, "test": {"a": 1, "b": 1}})
    code, err = run_cli(["--checkpoint", str(tiny_run), "--dataset", "imagefolder", "--root", str(root),
                         "--classifiers", "adam", "--device", "cpu", "--no-cache"], capsys)
    assert code == 2 and err.count("\n") == 0 and "3 images" in err and "--classifiers lbfgs,knn" in err


@pytest.mark.slow
def test_cli_records_its_command_and_checks_the_output_folder_first(tiny_run, tmp_path, capsys, monkeypatch):
    argv = ["--checkpoint", str(tiny_run), "--classifiers", "knn", "--knn-k", "3", "--device", "cpu",
            "--out-dir", str(tmp_path / "out")]
    assert evaluate_module.main(argv) == 0
    saved = json.loads((tmp_path / "out" / "last_digits.json").read_text())
    assert saved["command"] == "python -m feature_eval.evaluate " + " ".join(argv)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: pytest.fail("extracted first"))
    code, err = run_cli(argv[:-1] + [str(blocked / "out")], capsys)
    assert code == 2 and "cannot write results" in err and err.count("\n") == 0


@pytest.mark.slow
def test_module_entry_point_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "feature_eval.evaluate", "--checkpoint", str(tmp_path / "x.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: checkpoint") and done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("n", [1, 2, 7])
def test_embedding_works_for_tiny_test_sets(n):
    from feature_eval.plots import embed_2d

    points, rows = embed_2d(np.random.default_rng(0).normal(size=(n, 4)))
    assert points.shape == (n, 2) and rows.tolist() == list(range(n)) and np.isfinite(points).all()


def test_results_of_other_data_or_sizes_get_their_own_file_names(tmp_path):
    trained = DatasetConfig(root=str(tmp_path / "data"), input_shape=(96, 96, 3))
    stem = context_module.results_stem
    assert stem(Path("runs/r/checkpoints/last.pt"), "stl10", tmp_path / "data", 96, trained) == "last_stl10"
    assert stem(Path("last.pt"), "imagefolder", tmp_path / "my set", 96, trained) == "last_imagefolder_my-set"
    assert stem(Path("last.pt"), "stl10", tmp_path / "data", 64, trained) == "last_stl10_64px"


@pytest.mark.slow
def test_baseline_features_are_shared_by_every_checkpoint_on_the_same_data(tmp_path, monkeypatch):
    import feature_eval.baselines as baselines

    first = make_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    torch.manual_seed(5)
    second = tmp_path / "b" / "checkpoints" / "last.pt"
    state = torch.load(first, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(second, state)
    out = evaluate_module.evaluate(tmp_path / "a", classifiers="knn", baselines="pca,random", device="cpu",
                                   write=False, log=lambda *_: None)
    assert any(baselines.BASELINE_CACHE.glob("*.pt"))  # the conftest points it at a temporary folder
    # Another run on the same data: its own features are computed, the baselines' are read back.
    calls, extract = [], features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: extract(*a, **k) if "SimCLR" in a[-1]
                        else calls.append(a) or pytest.fail("random"))
    monkeypatch.setattr(baselines, "pca_baseline", lambda *a, **k: pytest.fail("PCA recomputed"))
    again = evaluate_module.evaluate(tmp_path / "b", classifiers="knn", baselines="pca,random", device="cpu",
                                     write=False, log=lambda *_: None)
    rows = {(r["classifier"], r["extractor"]): r["top1"] for r in out.results["rows"]}
    rows_again = {(r["classifier"], r["extractor"]): r["top1"] for r in again.results["rows"]}
    assert all(rows[k] == rows_again[k] for k in rows if k[1] != "simclr") and not calls
    assert again.results["baselines"]["pca"]["feature_dim"] == 16
    variance = out.results["baselines"]["pca"]["pca"]["explained_variance"]  # kept in the cache with the features
    assert 0 < variance <= 1 and again.results["baselines"]["pca"]["pca"]["explained_variance"] == variance
    # Other data (another eval size) never reuses them.
    with pytest.raises(pytest.fail.Exception, match="PCA recomputed"):
        evaluate_module.evaluate(tmp_path / "b", classifiers="knn", baselines="pca", device="cpu", input_size=12,
                                 write=False, log=lambda *_: None)

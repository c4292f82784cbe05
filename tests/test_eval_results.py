"""What `feature_eval.evaluate` leaves on disk: pictures next to the table, rows kept across reruns, and the one
results format (`feature_eval.results`) that files of today's and earlier versions are read with."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feature_eval import evaluate as evaluate_module
from feature_eval.plots import embed_2d
from feature_eval.results import (Results, Row, current_rows, markdown_table, read_results, rewrite_command,
                                  write_results)
from models.loading import file_sha256
from pretrained_models.export import model_card
from tests.test_feature_eval import make_checkpoint

QUIET = dict(device="cpu", log=lambda *_: None)
# Results files as the code before typed rows (issue 22) wrote them, at 49cbf52 (a `git archive` of it): an evaluation
# of `make_checkpoint` with classifiers="knn", baselines="random", then one with classifiers="lbfgs", max_iter=50
# that kept those rows (plots=False, cache=False), and `finetune_evaluate` with label_fraction=0.01, epochs=1,
# lrs=(0.1,).
V1 = Path(__file__).parent / "data" / "results_v1"
CARD = {"name": "p", "base_model": "resnet18", "cifar_stem": False, "feature_dim": 512, "out_dim": 16, "files": {}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_checkpoint(run / "checkpoints" / "last.pt")
    return run


def table_rows(markdown: str) -> list[tuple[str, str]]:
    """(classifier, extractor) names of the rows of the markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Classifier")]
    return [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in lines]


def assert_picture(path, min_size):
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] >= min_size[0] and picture.shape[0] >= min_size[1], picture.shape
    assert picture.std() > 20 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_evaluate_draws_tsne_confusion_and_neighbours_next_to_the_table(run_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    assert evaluate_module.main(["--checkpoint", str(run_dir), "--classifiers", "lbfgs,knn", "--max-iter", "50",
                                 "--device", "cpu", "--out-dir", str(out)]) == 0
    assert (f"pictures: {out / 'last_digits_tsne.png'}, {out / 'last_digits_confusion.png'}, "
            f"{out / 'last_digits_neighbours.png'}") in capsys.readouterr().out
    assert_picture(out / "last_digits_tsne.png", (700, 500))
    assert_picture(out / "last_digits_confusion.png", (3 * 400, 400))  # a panel per SimCLR row: 3
    markdown = (out / "last_digits.md").read_text()
    assert "![t-SNE of the SimCLR test features, coloured by class](last_digits_tsne.png)" in markdown
    assert "(last_digits_confusion.png)" in markdown and "features](last_digits_neighbours.png)" in markdown
    assert "How to read it: with no baselines" in markdown and "--baselines random,pca" in markdown
    saved = json.loads((out / "last_digits.json").read_text())
    assert saved["pictures"] == {"tsne": "last_digits_tsne.png", "confusion": "last_digits_confusion.png",
                                 "neighbours": "last_digits_neighbours.png"}
    counts = np.asarray(saved["rows"][0]["confusion"])
    assert counts.shape == (10, 10) and counts.sum() == 360 and "confusion" not in saved["rows"][0]["details"]
    assert 100 * np.trace(counts) / 360 == pytest.approx(saved["rows"][0]["top1"])
    # --no-plots draws nothing and takes away the pictures of the earlier table
    assert evaluate_module.main(["--checkpoint", str(run_dir), "--classifiers", "knn", "--device", "cpu",
                                 "--out-dir", str(out), "--no-plots"]) == 0
    assert not list(out.glob("*.png")) and "![" not in (out / "last_digits.md").read_text()


def test_tsne_embeds_a_seeded_subsample():
    features = np.random.default_rng(0).normal(size=(3000, 8))
    points, rows = embed_2d(features, max_points=60, seed=4)
    assert points.shape == (60, 2) and len(set(rows.tolist())) == 60 and rows.max() < 3000
    assert np.array_equal(rows, embed_2d(features, max_points=60, seed=4)[1])
    assert not np.array_equal(rows, embed_2d(features, max_points=60, seed=5)[1])


@pytest.mark.slow
def test_a_smaller_rerun_keeps_the_earlier_rows_and_says_so(run_dir, tmp_path, one_thread):
    out, logged = tmp_path / "out", []
    options = dict(out_dir=out, plots=False, device="cpu", log=logged.append)
    first = evaluate_module.evaluate(run_dir, classifiers="knn", baselines="random", command=(
        f"python -m feature_eval.evaluate --checkpoint {run_dir} --classifiers knn --baselines random"), **options)
    assert len(first.results["rows"]) == 4
    second = evaluate_module.evaluate(run_dir, classifiers="lbfgs", max_iter=50, command=(
        f"python -m feature_eval.evaluate --checkpoint {run_dir} --classifiers=lbfgs --max-iter 50"), **options)
    pairs = [(r["classifier"], r["extractor"]) for r in second.results["rows"]]
    assert pairs == [("lbfgs", "simclr"), ("knn", "simclr"), ("knn", "random"), ("weighted_knn", "simclr"),
                     ("weighted_knn", "random")]  # the earlier 4 and the new 1, in the table's order
    added = [line for line in logged if line.startswith("added to the table of last_digits.json")]
    assert len(added) == 1 and added[0].endswith(": kept 4 earlier row(s), dropped 0") and len(added[0]) < 110
    saved = json.loads((out / "last_digits.json").read_text())
    markdown = (out / "last_digits.md").read_text()
    # JSON and markdown tell the same story, and the recorded command reproduces every row
    assert [(r["classifier_name"], r["extractor_name"]) for r in saved["rows"]] == table_rows(markdown)
    assert saved["options"]["classifiers"] == ["lbfgs", "knn"] and saved["options"]["baselines"] == ["random"]
    assert saved["command"] == (f"python -m feature_eval.evaluate --checkpoint {run_dir} --classifiers lbfgs,knn "
                                "--max-iter 50 --baselines random")
    assert f"Command: `{saved['command']}`" in markdown.split("\n\n")[0]  # the caption
    kept_note = next(note for note in markdown.split("\n\n") if note.startswith("Kept from earlier evaluations"))
    assert f"KNN (k=10, Euclidean) / Random init ({first.results['finished']})" in kept_note
    assert "Logistic regression" not in kept_note
    kept = next(r for r in saved["rows"] if r["classifier"] == "knn" and r["extractor"] == "random")
    assert kept["top1"] == first.results["rows"][1]["top1"] and kept["evaluated"] == first.results["finished"]
    # the model card of a package made from this run lists all five rows and that command
    card = model_card(CARD, {}, [read_results(out / "last_digits.json")])
    assert card.count("| SimCLR |") == 3 and card.count("| Random init |") == 2
    assert f"Produced by `{saved['command']}`" in card
    # the same rows again replace themselves; the others stay
    logged.clear()
    third = evaluate_module.evaluate(run_dir, classifiers="knn", max_iter=50, **options)
    kept_note = next(note for note in (out / "last_digits.md").read_text().split("\n\n") if note.startswith("Kept"))
    assert len(third.rows) == 5 and [r.name for r in third.rows if r.name in kept_note] == [
        "Logistic regression (L-BFGS) / SimCLR", "KNN (k=10, Euclidean) / Random init",
        "Weighted KNN (k=200, T=0.1) / Random init"]  # not the two SimCLR KNN rows, made again
    assert [line for line in logged if line.startswith("added to")] == [
        "added to the table of last_digits.json: kept 3 earlier row(s), dropped 0"]


@pytest.mark.slow
def test_rows_of_other_settings_are_dropped_not_mixed(run_dir, tmp_path, one_thread):
    out, logged = tmp_path / "out", []
    options = dict(out_dir=out, plots=False, device="cpu", log=logged.append)
    evaluate_module.evaluate(run_dir, classifiers="lbfgs,knn", max_iter=50, **options)
    # another --max-iter: the L-BFGS row goes, the KNN rows (no such option) stay
    again = evaluate_module.evaluate(run_dir, classifiers="adam", max_iter=60, **options)
    assert [r["classifier"] for r in again.results["rows"]] == ["adam", "knn", "weighted_knn"]
    assert any(line.endswith("kept 2 earlier row(s), dropped 1 (made with other --max-iter)") for line in logged)
    markdown = (out / "last_digits.md").read_text()
    assert "Dropped, as made with other --max-iter: Logistic regression (L-BFGS) / SimCLR (" in markdown
    assert len(table_rows(markdown)) == 3
    assert json.loads((out / "last_digits.json").read_text())["rows"] == again.results["rows"]
    # another seed changes every row: none is kept
    last = evaluate_module.evaluate(run_dir, classifiers="knn", seed=1, **options)
    assert len(last.results["rows"]) == 2
    assert logged[-1].endswith("kept 0 earlier row(s), dropped 3 (made with other --seed)")
    assert "Linear (Adam, hold-out tuned) / SimCLR" in (out / "last_digits.md").read_text()


def test_a_damaged_earlier_file_is_replaced(run_dir, tmp_path):
    out, logged = tmp_path / "out", []
    out.mkdir()
    (out / "last_digits.json").write_text("{not json")
    result = evaluate_module.evaluate(run_dir, classifiers="knn", out_dir=out, plots=False, device="cpu",
                                      log=logged.append)
    assert len(result.results["rows"]) == 2 and any("was unreadable" in line for line in logged)


def test_how_to_read_names_the_baselines_present():
    sentence = evaluate_module.how_to_read({"simclr", "random", "pca"})
    assert sentence.startswith("How to read it: compare each SimCLR row") and "untrained" in sentence
    assert "PCA" in sentence and sentence.count(".") == 1
    assert "PCA" not in evaluate_module.how_to_read({"simclr", "random"})


def test_tsne_of_identical_features_puts_them_at_the_origin():
    """An untrained or collapsed encoder gives every image the same features; scikit-learn's t-SNE would divide
    by their zero spread and crash the process in its Barnes-Hut tree."""
    points, rows = embed_2d(np.ones((4, 8)))
    assert rows.tolist() == [0, 1, 2, 3] and not points.any()
    with pytest.raises(ValueError, match="NaN or Inf"):
        embed_2d(np.full((4, 8), np.nan))


@pytest.mark.slow
def test_an_exported_package_carries_the_pictures_its_table_shows(tmp_path, one_thread):
    from pretrained_models.export import export_package

    make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    evaluate_module.evaluate(tmp_path / "run", classifiers="knn", **QUIET)
    folder = export_package(tmp_path / "run", "p", root=tmp_path / "packages", log=lambda _: None)
    names = {"last_digits.json", "last_digits.md", "last_digits_tsne.png", "last_digits_confusion.png",
             "last_digits_neighbours.png"}
    assert {p.name for p in (folder / "eval").iterdir()} == names
    manifest = json.loads((folder / "package.json").read_text())
    assert {Path(entry).name for entry in manifest["evaluations"]} == names


@pytest.mark.slow
def test_a_rerun_without_the_random_baseline_keeps_the_comparison_picture(run_dir, tmp_path, one_thread):
    out, logged = tmp_path / "out", []
    evaluate_module.evaluate(run_dir, classifiers="knn", baselines="random", out_dir=out, device="cpu",
                             log=logged.append)
    picture = (out / "last_digits_neighbours.png").read_bytes()
    again = evaluate_module.evaluate(run_dir, classifiers="knn", out_dir=out, device="cpu", log=logged.append)
    assert (out / "last_digits_neighbours.png").read_bytes() == picture  # the random-init rows' picture stays
    assert again.paths["neighbours"] == out / "last_digits_neighbours.png"
    assert any(line.startswith(f"kept {out / 'last_digits_neighbours.png'}") for line in logged)


def test_the_neighbours_title_is_wrapped_to_the_picture_not_clipped():
    """One panel (no random baseline) makes a narrow picture: a long title wraps instead of running off both edges."""
    from feature_eval.plots import draw_neighbours

    images = np.zeros((2, 3, 16, 16), np.uint8)
    panels = [("SimCLR", np.zeros((2, 3, 3, 16, 16), np.uint8), np.zeros((2, 3), int))]
    picture = draw_neighbours(images, np.zeros(2, int), panels, ["a"], "a long title " * 12)
    assert (picture[:, 0] == 255).all() and (picture[:, -1] == 255).all()  # nothing drawn at the edges
    assert (picture[:40, 1:-1] < 128).any()  # the title is there


def test_neighbours_are_the_cosine_nearest_train_images_and_the_picture_has_their_grid(one_thread):
    """8 seeded test images; for each, the 8 train images of largest cosine similarity under each extractor (found
    here by brute force); the picture: a row per test image, 1 + 8 + 8 framed cells, green right, red wrong."""
    from data_aug.datasets import TensorImages
    from feature_eval.features import FeatureSplit
    from feature_eval.plots import RIGHT, WRONG, draw_neighbours

    g = np.random.default_rng(0)
    train = TensorImages(torch.as_tensor(g.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)),
                         torch.as_tensor(g.integers(0, 3, 40)), ["a", "b", "c"])
    test = TensorImages(torch.as_tensor(g.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8)),
                        torch.as_tensor(g.integers(0, 3, 12)), ["a", "b", "c"])
    features = {key: (FeatureSplit(torch.randn(40, 5, generator=torch.Generator().manual_seed(s)), train.labels),
                      FeatureSplit(torch.randn(12, 5, generator=torch.Generator().manual_seed(s + 1)), test.labels))
                for s, key in ((1, "simclr"), (3, "random"))}
    queries, labels, panels = evaluate_module.neighbour_panels(features, train, test, 16, seed=0)
    rows = np.sort(np.random.default_rng(0).permutation(12)[:8])
    assert queries.shape == (8, 3, 16, 16) and np.array_equal(queries, test.images[rows].numpy())
    assert [name for name, _, _ in panels] == ["SimCLR", "random init"]
    for (name, images, found), key in zip(panels, ("simclr", "random")):
        keys, asked = features[key][0].features, features[key][1].features[rows]
        cosine = (asked / asked.norm(dim=1, keepdim=True)) @ (keys / keys.norm(dim=1, keepdim=True)).T
        nearest = cosine.argsort(dim=1, descending=True)[:, :8].numpy()
        assert images.shape == (8, 8, 3, 16, 16) and np.array_equal(images, train.images.numpy()[nearest])
        assert np.array_equal(found, train.labels.numpy()[nearest])
    picture = draw_neighbours(queries, labels, panels, ["a", "b", "c"], "title")
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert RIGHT in colours and WRONG in colours
    frames = (np.all(picture == RIGHT, axis=2) | np.all(picture == WRONG, axis=2)).any(axis=0)
    edges = np.flatnonzero(np.diff(frames.astype(int)) == 1)  # each framed cell's left edge, left to right
    assert len(edges) == 16  # 8 + 8 neighbours per row (the test image's own frame is grey)
    rows_framed = (np.all(picture == RIGHT, axis=2) | np.all(picture == WRONG, axis=2)).any(axis=1)
    assert (np.diff(rows_framed.astype(int)) == 1).sum() == 8  # 8 rows of test images


# ---------------------------------------------------------------- the results format

def row(classifier="knn", extractor="simclr", top1=50.0, **settings) -> Row:
    return Row(classifier, classifier.upper(), extractor, None, None, None, None, top1, 90.0, settings=settings)


def test_a_table_is_the_latest_row_of_each_pair_made_under_the_settings_of_now():
    now = {"knn": {"weights": "a", "--knn-k": 10}, "lbfgs": {"weights": "a", "--max-iter": 50}}
    rows = [row("knn", top1=1, weights="a", **{"--knn-k": 10}), row("lbfgs", top1=2, weights="a", **{"--max-iter": 9}),
            row("knn", "random", top1=3, weights="a", **{"--knn-k": 10}), row("knn", top1=4, weights="b"),
            row("lbfgs", top1=5, weights="a", **{"--max-iter": 50, "--seed": 1}),
            row("knn", top1=6, weights="a", **{"--knn-k": 10})]
    table = current_rows(rows, now)
    # lbfgs first (the protocols' order); knn: SimCLR, then random, in the order they first came; other weights or
    # another --max-iter never stand in it; a setting the protocol does not have now (--seed here) is not compared
    assert [(r.classifier, r.extractor, r.top1) for r in table] == [("lbfgs", "simclr", 5), ("knn", "simclr", 6),
                                                                    ("knn", "random", 3)]
    assert markdown_table(table).count("\n") == 4 and "| KNN | SimCLR | - | - | - | - | 6.0 | 90.0 |" in \
        markdown_table(table)


def test_one_command_rewriter_replaces_in_place_adds_and_removes():
    command = "python -m feature_eval.evaluate --checkpoint 'runs/img run' --classifiers=knn --out-dir /tmp/x --seed 1"
    assert rewrite_command(command, {"--checkpoint": "enc", "--out-dir": None, "--baselines": "random"}) == \
        "python -m feature_eval.evaluate --checkpoint enc --classifiers=knn --seed 1 --baselines random"
    assert rewrite_command(command, {"--classifiers": "lbfgs,knn"}) == (
        "python -m feature_eval.evaluate --checkpoint 'runs/img run' --classifiers lbfgs,knn --out-dir /tmp/x --seed 1")
    assert rewrite_command("x --seed 1 --seed 2", {"--seed": "3"}) == "x --seed 3"  # a repeated option goes
    assert rewrite_command(None, {"--seed": "3"}) is None


def test_the_json_writes_each_list_of_numbers_on_one_line_and_reads_back_the_same(tmp_path):
    """A confusion matrix reads as rows; lists of anything else, and text that looks like a list, stay as they are."""
    record = {"confusion": [[3, 0], [1, -2]], "scores": [0.5, 1e-07], "names": ["a", "b"], "empty": [],
              "command": "python -m feature_eval.evaluate --root 'data/[ 1 ]'", "rows": []}
    paths = write_results(record, "| table |", tmp_path, "r", "caption")
    text = paths["json"].read_text()
    assert '"confusion": [\n    [3, 0],\n    [1, -2]\n  ]' in text and '"scores": [0.5, 1e-07]' in text
    assert '"names": [\n    "a",' in text and json.loads(text) == record  # the command's "[ 1 ]" untouched


def test_results_files_of_the_code_before_typed_rows_still_read():
    evaluation = read_results(V1 / "last_digits.json")
    assert [(r.classifier, r.extractor) for r in evaluation.rows] == [
        ("lbfgs", "simclr"), ("knn", "simclr"), ("knn", "random"), ("weighted_knn", "simclr"),
        ("weighted_knn", "random")]
    assert evaluation.dataset == "digits" and evaluation.input_size == 16 and evaluation.splits["test"] == 360
    assert evaluation.command.startswith("python -m feature_eval.evaluate --checkpoint runs/tiny")
    knn = evaluation.rows[1]
    assert knn.extractor_name == "SimCLR" and len(knn.confusion) == 10 and knn.evaluated <= evaluation.finished
    # rows of then carry no settings: they get their evaluation's
    assert knn.settings["weights"] == evaluation.checkpoint_sha256 and knn.settings["--max-iter"] == 50
    assert knn.settings["--seed"] == 0 and knn.settings["--knn-k"] == 10
    assert knn.settings["data"] == ["digits", "data", 16, 1437, 360]  # the root as given: the checkout may move
    finetune = read_results(V1 / "last_digits_finetune-1pct.json")
    assert [r.classifier for r in finetune.rows] == ["finetune"] and finetune.rows[0].details["finetune_epochs"] == 1
    assert finetune.splits["labelled"] == 14 and "finetune" in finetune.command
    card = model_card(CARD, {}, [evaluation, finetune])
    assert card.count("| SimCLR |") == 4 and f"{finetune.rows[0].top1:.1f}" in card
    assert "Produced by `python -m feature_eval.finetune --checkpoint runs/tiny" in card
    assert "from this package: `python -m feature_eval.finetune --checkpoint p " in card
    with pytest.raises(ValueError, match="no rows"):
        Results.from_json({"checkpoint": "x"})
    odd = Results.from_json({"dataset": "digits", "splits": None, "rows": [{"classifier": "knn"}, 3]})
    assert odd.dataset is None and odd.splits == {} and odd.rows == () and "--checkpoint <checkpoint>" in odd.command
    undated = Results.from_json({"finished": "2026-11-01T10:00", "rows": [{"classifier": "knn", "extractor": "pca"}]})
    assert undated.rows[0].evaluated == "2026-11-01T10:00"  # a row of before rows were dated: its evaluation's date


def test_an_evaluation_adds_its_rows_to_a_table_written_before_rows_carried_settings(run_dir, tmp_path, one_thread):
    out, logged = tmp_path / "out", []
    out.mkdir()
    earlier = json.loads((V1 / "last_digits.json").read_text())
    # the same file, as if it had scored this run's checkpoint
    earlier["checkpoint_sha256"] = file_sha256(run_dir / "checkpoints" / "last.pt")
    (out / "last_digits.json").write_text(json.dumps(earlier))
    again = evaluate_module.evaluate(run_dir, classifiers="knn", max_iter=50, out_dir=out, plots=False,
                                     device="cpu", log=logged.append)
    assert [r.name for r in again.rows] == [
        "Logistic regression (L-BFGS) / SimCLR", "KNN (k=10, Euclidean) / SimCLR",
        "KNN (k=10, Euclidean) / Random init",
        "Weighted KNN (k=200, T=0.1) / SimCLR", "Weighted KNN (k=200, T=0.1) / Random init"]
    assert any(line.endswith("kept 3 earlier row(s), dropped 0") for line in logged)
    lbfgs = earlier["rows"][0]
    assert again.rows[0].top1 == lbfgs["top1"] and again.rows[0].evaluated == lbfgs["evaluated"]
    # another --max-iter: the L-BFGS row of then goes, as a row of today's would
    (out / "last_digits.json").write_text(json.dumps(earlier))
    logged.clear()
    evaluate_module.evaluate(run_dir, classifiers="knn", out_dir=out, plots=False, device="cpu", log=logged.append)
    assert any(line.endswith("dropped 1 (made with other --max-iter)") for line in logged)


def test_rows_made_again_in_the_same_second_are_replaced_not_kept(tmp_path):
    """A rerun that scores the same rows within the same second makes rows equal to the earlier ones: they are
    still made now, and 'kept' names only earlier rows the rerun did not make."""
    path = tmp_path / "last_digits.json"
    path.write_text((V1 / "last_digits.json").read_text())
    earlier = read_results(path)
    settings = {row.classifier: row.settings for row in earlier.rows}
    again = [row for row in earlier.rows if row.classifier == earlier.rows[0].classifier]
    record = {**earlier.record, "baselines": {}, "command": earlier.command}
    logged = []
    table, notes = evaluate_module._add_to_table(path, record, again, settings, logged.append)
    assert len(table) == len(earlier.rows) and record["options"]["classifiers"] == ["lbfgs", "knn"]
    assert logged == [f"added to the table of last_digits.json: kept {len(table) - len(again)} earlier row(s), "
                      "dropped 0"]
    assert notes[0].startswith("Kept from earlier evaluations") and len(notes) == 1
    assert not any(row.name in notes[0] for row in again) and all(row.name in notes[0] for row in table[len(again):])

"""See what the views of a config do to its data, without training: the grid a run writes as `views.png`.

    python -m simclr.preview --config my.yaml dataset.s=0.5          # writes runs/preview.png
    python -m simclr.preview --config configs/quickstart.yaml --out /tmp/q.png dataset.min_crop_scale=0.08

The same training images (seeded by `seed`) and the same pipeline (`dataset.augment_on`, `dataset.s`,
`dataset.min_crop_scale`, `dataset.blur`, `dataset.input_shape`) as `python run.py` with these arguments,
so the picture is the one the run would write. It lives in `simclr/`, not `data_aug/`, because it reads the
config: `data_aug/` knows nothing of `simclr/`, and a second config parser there would drift from this one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import startup  # standard library only
from simclr.config import ConfigError, load_config

DEFAULT_OUT = "runs/preview.png"  # under the ignored runs/, so that a preview leaves the checkout clean


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simclr.preview", description=__doc__.split("\n")[0],
                                     epilog="overrides: key=value or section.key=value, as for run.py")
    parser.add_argument("--config", default="config.yaml", help="YAML config file (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="PNG to write (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, checked like the YAML keys")
    return parser.parse_args(argv)


def render(config):
    """The views grid of `config` (a `simclr.config.Config`), uint8 `[H, W, 3]`."""
    from torch.utils.data import Subset

    from data_aug.datasets import load_split, split_validation
    from simclr.run_plots import views_picture

    d = config.dataset
    data = load_split(d.name, d.root, "pretrain", download=d.download, skip_bad_images=d.skip_bad_images)
    train_idx, _ = split_validation(len(data), d.valid_size, config.seed)  # the images training sees
    return views_picture(Subset(data, train_idx.tolist()), d, config.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return startup.EXIT_USAGE
    problem = startup.torch_install_problem()  # a mismatched torch/torchvision pair: one line, not a traceback
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return startup.EXIT_ERROR
    from data_aug.errors import DataError
    from data_aug.view_grid import save_png

    try:
        picture = render(config)
    except (DataError, ValueError) as err:  # ValueError: augment_on device with images of several sizes
        print(f"error: {err}", file=sys.stderr)
        return startup.EXIT_ERROR
    out = Path(args.out)
    try:
        if args.out == DEFAULT_OUT:  # runs/ may not exist yet; a folder the user names must
            out.parent.mkdir(parents=True, exist_ok=True)
        save_png(picture, out)
    except OSError as err:
        print(f"error: cannot write {out} ({err.strerror or err}): pass --out PATH", file=sys.stderr)
        return startup.EXIT_ERROR
    print(out)
    return startup.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

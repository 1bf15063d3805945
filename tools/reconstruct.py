"""Test-split reconstruction error (paper Table 2) and a grid of test images over their
reconstructions (paper Fig. 10).

    python tools/reconstruct.py RUN_DIR_OR_CHECKPOINT [--data LMDB] [--split test]
        [--count N] [--out reconstructions.png] [--grid 8x4] [--device cuda] [--ema]

The error is the per-pixel MSE in [-1, 1] of x against g(mu(q(x))): SSE / (3·H·W) averaged
over the held-out images (paper: CIFAR-10 0.028, CelebA 0.030). Appends one JSON line to
``metrics-reconstruction.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from triangle.datasets import MultiResolutionDataset
from triangle.metrics.reconstruction import dataset_images, reconstruction_error
from triangle.progressive.grids import interleave_rows, reconstruct, save_images

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_cli.py, also when loaded by path
import _cli  # noqa: E402


def _grid_shape(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected COLSxROWS, e.g. 8x4") from None
    if cols < 1 or rows < 1:
        raise click.BadParameter(f"{text!r}: both sizes must be positive")
    return cols, rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_cli.checkpoint_argument
@click.option("--data", type=click.Path(), default=None, help="Multi-resolution LMDB  [default: the run's dataset]")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Images evaluated (the split's first N)  [default: the whole split]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Grid PNG  [default: RUN_DIR/reconstructions-<images seen>.png]")
@click.option("--grid", "grid", default="8x4", show_default=True,
              help="COLSxROWS pairs in the grid: each row of test images has its reconstructions below.")
@_cli.device_option
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--ema/--raw", default=False, show_default=True,
              help="Generator weights paired with q_φ (it was trained against the raw one).")
def main(checkpoint, data, split, count, out, grid, device, batch, ema):
    """Per-pixel test MSE of RUN_DIR_OR_CHECKPOINT (a run dir: its newest checkpoint) and a grid PNG."""
    cols, rows = _grid_shape(grid)
    device = _cli.resolve_device(device)
    loaded = _cli.load(checkpoint, ema=ema, inference=True, device=device)
    data = _cli.run_data(loaded, data)
    g, q, a, res = loaded.generator, loaded.inference, loaded.fade_alpha, loaded.resolution
    with _cli.one_line_errors():
        r = reconstruction_error(g, q, data, res, a, split=split, count=count, batch=batch, device=device)
        ds = MultiResolutionDataset(data, split=split)
        x = dataset_images(ds, res, range(min(cols * rows, len(ds))), a).to(device)
    out = out or loaded.run_dir / f"reconstructions-{loaded.images_seen:012d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_images(interleave_rows(x, reconstruct(g, q, x, a), cols), out, cols)
    record = {"checkpoint": loaded.path.name, "kimg": loaded.kimg, "images_seen": loaded.images_seen,
              "resolution": res, "fade_alpha": a, "generator": "ema" if ema else "raw",
              "mse_per_pixel": r.mse, "count": r.count, "split": split,
              "data": os.path.realpath(data), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(loaded.run_dir / "metrics-reconstruction.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    click.echo(f"{loaded.path.name} ({res}x{res}, kimg {loaded.kimg:g}): reconstruction MSE per pixel "
               f"in [-1, 1] = {r.mse:.5f} over {r.count} {split} images (SSE / 3HW of x vs g(mu(q(x))))")
    click.echo(f"grid: {out} (rows of {split} images, their reconstructions below)")


if __name__ == "__main__":
    main()

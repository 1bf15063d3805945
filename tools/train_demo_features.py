"""Rebuild the demo feature network's weights (metrics/demo_features.pt) with its fixed seed.

    python tools/train_demo_features.py [--out metrics/demo_features.pt] [--seed 0]
        [--steps 6000] [--count 20000] [--negatives 8000] [--threads 1]

Trains on fresh renders of demo seed 12345 at 8, 16, 32 and 64 and on negatives made from the
same seed (background alone, Gaussian-blurred renders, soft colour blobs, noise: the "none"
class), about 3 minutes on one CPU thread. Then prints, at each resolution, on images the
network never saw (the demo dataset's own first 1000 images, seed 0, and negatives of seed 0):
the shape accuracy, and the fraction recognised as a shape (argmax a shape with probability
>= 0.9) of real renders, of renders blurred by a Gaussian of sigma 12% of the side, of blob
images and of uniform noise. One thread by default, so that the same command rebuilds the same
weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from triangle.files import write_atomic
from triangle.metrics.demo_features import (
    TRAIN_RESOLUTIONS,
    WEIGHTS_FILE,
    demo_images,
    gaussian_blur,
    negative_images,
    recognised_fraction,
    shape_accuracy,
    train_demo_features,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), default=WEIGHTS_FILE, show_default=True,
              help="Where to write the state dict.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Initialisation and batch order.")
@click.option("--steps", type=click.IntRange(min=1), default=6000, show_default=True)
@click.option("--count", type=click.IntRange(min=16), default=20_000, show_default=True,
              help="Training renders.")
@click.option("--negatives", type=click.IntRange(min=0), default=8000, show_default=True,
              help="Negative images (class none); 0: none (a 4-shape classifier that never says none).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads (results are reproducible for a given count).")
@click.option("--eval-count", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out images per resolution for the printed accuracy.")
def main(out, seed, steps, count, negatives, threads, eval_count):
    """Train the demo feature network and write its weights to OUT."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net = train_demo_features(seed, count=count, negatives=negatives, steps=steps, log=click.echo)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda fh: torch.save(net.state_dict(), fh))
    click.echo(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) "
               f"after {time.perf_counter() - t0:.0f} s")
    click.echo(f"held-out, {eval_count} images each (seed 0): shape accuracy; recognised as a "
               "shape (argmax a shape, p >= 0.9) of real renders, blurred renders "
               "(sigma 12% of the side), blob images, uniform noise")
    noise = torch.Generator().manual_seed(0)
    for r in TRAIN_RESOLUTIONS:
        real = demo_images(range(eval_count), r)
        rates = [recognised_fraction(net, x) for x in (
            real, gaussian_blur(real, 0.12 * r),
            negative_images(range(eval_count), r, kind="blobs"),
            torch.rand(eval_count, 3, r, r, generator=noise) * 2 - 1)]
        click.echo(f"{r:3d}x{r:<3d} accuracy {100 * shape_accuracy(net, r, eval_count):5.1f}%; "
                   "recognised: " + ", ".join(f"{name} {100 * v:5.1f}%" for name, v in
                                              zip(("real", "blurred", "blobs", "noise"), rates)))


if __name__ == "__main__":
    main()

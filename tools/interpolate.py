"""Latent walks (paper Fig. 9): each row goes from g(z0) to g(z1) in --steps images.

    python tools/interpolate.py RUN_DIR_OR_CHECKPOINT [--out strip.png] [--rows 4] [--steps 8]
        [--seed 0] [--mode slerp|lerp|circle] [--from-images LMDB I J ...] [--gif]
        [--device cuda] [--ema/--raw]

Endpoints are prior samples z ~ N(0, I) (seeded), or, with ``--from-images LMDB I J`` (one row
per use), the inference model's means mu(q(x)) of images I and J of the LMDB's --split.
Small resolutions are enlarged (nearest) to at least 64 pixels per image in the PNG.
``--gif`` also writes the walk as an animation (the PNG's name with .gif): frame k shows step k
of every row side by side; ``--mode circle`` makes it loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from triangle.datasets import MultiResolutionDataset
from triangle.metrics.interpolation import MODES, latent_walks, random_endpoints
from triangle.metrics.reconstruction import dataset_images
from triangle.progressive.grids import generate, save_animation, save_images

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_cli.py, also when loaded by path
import _cli  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_cli.checkpoint_argument
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG  [default: RUN_DIR/interpolation-<images seen>-<mode>.png]")
@click.option("--rows", type=click.IntRange(min=1), default=4, show_default=True,
              help="Walks between random endpoints (ignored with --from-images).")
@click.option("--steps", type=click.IntRange(min=2), default=8, show_default=True,
              help="Images per walk, both endpoints included.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random endpoints.")
@click.option("--mode", type=click.Choice(MODES), default="slerp", show_default=True)
@click.option("--from-images", nargs=3, type=(click.Path(), int, int), multiple=True,
              metavar="LMDB I J", help="Walk between mu(q(x_I)) and mu(q(x_J)); repeat for more rows.")
@click.option("--split", type=click.Choice(["all", "train", "test"]), default="all", show_default=True,
              help="Split that I and J index.")
@click.option("--gif", is_flag=True, help="Also write the walk as an animated GIF beside the PNG.")
@click.option("--frame-ms", type=click.IntRange(min=10), default=120, show_default=True,
              help="Milliseconds per GIF frame.")
@_cli.device_option
@click.option("--ema/--raw", default=None,
              help="Generator weights  [default: EMA for random endpoints, raw (q_φ's partner) "
                   "with --from-images]")
def main(checkpoint, out, rows, steps, seed, mode, from_images, split, gif, frame_ms, device, ema):
    """Latent interpolation strips from RUN_DIR_OR_CHECKPOINT (a run dir: its newest checkpoint)."""
    device = _cli.resolve_device(device)
    ema = (not from_images) if ema is None else ema
    loaded = _cli.load(checkpoint, ema=ema, inference=bool(from_images), device=device)
    a, res = loaded.fade_alpha, loaded.resolution
    if from_images:
        with _cli.one_line_errors():
            x0, x1 = [], []
            for data, i, j in from_images:
                ds = MultiResolutionDataset(data, split=split)
                x = dataset_images(ds, res, [i, j], a)
                x0.append(x[0]), x1.append(x[1])
            with torch.no_grad():
                z0 = loaded.inference(torch.stack(x0).to(device), a)[0].cpu()
                z1 = loaded.inference(torch.stack(x1).to(device), a)[0].cpu()
    else:
        z0, z1 = random_endpoints(rows, loaded.latent_dim, seed)
    images = generate(loaded.generator, latent_walks(z0, z1, steps, mode).to(device), a)
    out = out or loaded.run_dir / f"interpolation-{loaded.images_seen:012d}-{mode}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_images(images, out, steps)
    source = "mu(q(x)) of the given images" if from_images else f"random z (seed {seed})"
    click.echo(f"{loaded.path.name} ({res}x{res}, {'ema' if ema else 'raw'}): {z0.shape[0]} {mode} "
               f"walks of {steps} from {source} -> {out}")
    if gif:
        animation = out.with_suffix(".gif")
        save_animation(images, z0.shape[0], animation, frame_ms)
        click.echo(f"animation of {steps} frames -> {animation}")


if __name__ == "__main__":
    main()

"""A grid of samples g(z), z ~ N(0, I) seeded, from a checkpoint (paper Fig. 8).

    python tools/sample.py RUN_DIR_OR_CHECKPOINT [--out samples.png] [--num 64] [--nrow 8]
        [--seed 0] [--device cuda] [--ema/--raw]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import torch

from triangle.progressive.grids import generate, save_images

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_cli.py, also when loaded by path
import _cli  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_cli.checkpoint_argument
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG  [default: RUN_DIR/samples-<images seen>-seed<seed>.png]")
@click.option("--num", type=click.IntRange(min=1), default=64, show_default=True, help="Samples.")
@click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per row  [default: sqrt(num)]")
@click.option("--seed", type=int, default=0, show_default=True)
@_cli.device_option
@click.option("--ema/--raw", default=True, show_default=True, help="EMA or raw generator weights.")
def main(checkpoint, out, num, nrow, seed, device, ema):
    """A PNG grid of samples from RUN_DIR_OR_CHECKPOINT (a run dir: its newest checkpoint)."""
    device = _cli.resolve_device(device)
    loaded = _cli.load(checkpoint, ema=ema, device=device)
    z = torch.randn(num, loaded.latent_dim, generator=torch.Generator().manual_seed(seed))
    out = out or loaded.run_dir / f"samples-{loaded.images_seen:012d}-seed{seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_images(generate(loaded.generator, z.to(device), loaded.fade_alpha), out,
                nrow or max(1, math.isqrt(num)))
    click.echo(f"{loaded.path.name} ({loaded.resolution}x{loaded.resolution}, {'ema' if ema else 'raw'}): "
               f"{num} samples -> {out}")


if __name__ == "__main__":
    main()

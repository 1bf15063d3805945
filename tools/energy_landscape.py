"""The energy landscape of a run (paper §4.3, Fig. 11): minima of U(z) = −f(g(z)) in the
generator's latent space, the barriers between them, basins and the disconnectivity graph.

    python tools/energy_landscape.py RUN_DIR_OR_CHECKPOINT [--out PREFIX] [--starts 64]
        [--encoded 16] [--steps 300] [--barrier-threshold T] [--neb-steps 100] [--device cuda]

Descends from ``--starts`` prior samples and from the inference model's means of ``--encoded``
held-out images, merges minima whose images are the same, estimates each pair's barrier (the
highest energy on the great circle between them; ``--neb-steps`` relaxes the paths of the merge
tree with a nudged elastic band for lower, better estimates), groups minima whose barrier is
below ``--barrier-threshold`` into basins and writes ``PREFIX.png``, ``PREFIX.svg`` (the
disconnectivity graph, each basin's minimum beneath it) and ``PREFIX.json`` (minima, energies,
barriers, basins, merge tree). Method: metrics/energy_landscape.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

from triangle.datasets import DatasetError, MultiResolutionDataset
from triangle.files import write_atomic
from triangle.metrics.energy_landscape import (
    LandscapeConfig,
    LatentEnergy,
    draw_disconnectivity,
    map_landscape,
)
from triangle.metrics.reconstruction import dataset_images

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_cli.py, also when loaded by path
import _cli  # noqa: E402


class _ProgressLine:
    """Progress on stderr, ``descent  120/300  4.1 s``: one updating line per phase on a
    terminal, a line every 10 seconds (and at each phase's end) in a log file."""

    def __init__(self) -> None:
        self.phase, self.t0, self.last = None, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            if self.phase is not None and self.tty:
                click.echo(err=True)
            self.phase, self.t0 = phase, now
        if done == total or now - self.last > (0.5 if self.tty else 10.0):
            self.last = now
            line = f"{phase:<13} {done:>6}/{total}  {now - self.t0:6.1f} s"
            click.echo(f"\r{line}" if self.tty else line, nl=not self.tty, err=True)

    def close(self) -> None:
        if self.phase is not None and self.tty:
            click.echo(err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_cli.checkpoint_argument
@click.option("--out", "prefix", type=click.Path(path_type=Path), default=None,
              help="Output prefix  [default: RUN_DIR/landscape-<images seen>]")
@click.option("--starts", type=click.IntRange(min=0), default=64, show_default=True,
              help="Descents from prior samples z ~ N(0, I).")
@click.option("--encoded", type=click.IntRange(min=0), default=16, show_default=True,
              help="Descents from mu(q(x)) of the first N held-out images (none if the data has "
                   "no test split).")
@click.option("--data", type=click.Path(), default=None,
              help="LMDB of the encoded images  [default: the run's dataset]")
@click.option("--steps", type=click.IntRange(min=1), default=LandscapeConfig.descent_steps,
              show_default=True, help="Adam steps of each descent.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=LandscapeConfig.descent_lr,
              show_default=True, help="Adam's learning rate (cosine-annealed to 0).")
@click.option("--merge-rms", type=click.FloatRange(min=0), default=LandscapeConfig.merge_rms,
              show_default=True, help="Minima whose images differ by less (RMS, [-1, 1]) are one.")
@click.option("--path-points", type=click.IntRange(min=3), default=LandscapeConfig.path_points,
              show_default=True, help="Points on each path between two minima.")
@click.option("--neb-steps", type=click.IntRange(min=0), default=LandscapeConfig.neb_steps,
              show_default=True, help="Nudged-elastic-band iterations on the merge tree's paths.")
@click.option("--barrier-threshold", type=click.FloatRange(min=0), default=None,
              help="Minima closer than this (climb from the higher one) share a basin  "
                   "[default: a tenth of the minima's energy spread]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prior starts.")
@click.option("--batch", type=click.IntRange(min=1), default=LandscapeConfig.batch, show_default=True)
@_cli.device_option
@click.option("--ema/--raw", default=False, show_default=True,
              help="Generator weights (raw: the one the energy was trained against).")
def main(checkpoint, prefix, starts, encoded, data, steps, lr, merge_rms, path_points, neb_steps,
         barrier_threshold, seed, batch, device, ema):
    """Map the energy landscape of RUN_DIR_OR_CHECKPOINT (a run dir: its newest checkpoint)."""
    device = _cli.resolve_device(device)
    loaded = _cli.load(checkpoint, ema=ema, inference=encoded > 0, energy=True, device=device)
    alpha, res, d = loaded.fade_alpha, loaded.resolution, loaded.latent_dim
    z = [torch.randn(starts, d, generator=torch.Generator().manual_seed(seed))]
    kinds = ["prior"] * starts
    if encoded:
        try:
            ds = MultiResolutionDataset(_cli.run_data(loaded, data), split="test")
            x = dataset_images(ds, res, range(min(encoded, len(ds))), alpha).to(device)
        except DatasetError as exc:
            click.echo(f"no encoded starts ({exc})", err=True)
        else:
            with torch.no_grad():
                z.append(loaded.inference(x, alpha)[0].cpu())
            kinds += ["encoded"] * x.shape[0]
    z = torch.cat(z).to(device)
    if z.shape[0] < 2:
        raise click.ClickException("fewer than 2 starts: raise --starts or --encoded")
    cfg = LandscapeConfig(descent_steps=steps, descent_lr=lr, merge_rms=merge_rms,
                          path_points=path_points, neb_steps=neb_steps,
                          barrier_threshold=barrier_threshold, batch=batch,
                          on_sphere=loaded.config.network.normalize_latent)
    landscape = LatentEnergy(lambda c: loaded.generator(c, alpha), lambda x: loaded.energy(x, alpha), batch)
    progress = _ProgressLine()
    t0 = time.perf_counter()
    result = map_landscape(landscape, z, cfg, start_kinds=kinds, progress=progress)
    progress.close()
    prefix = prefix or loaded.run_dir / f"landscape-{loaded.images_seen:012d}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    basin_images = landscape.images(result.minima[[b.minimum for b in result.basins]])
    title = (f"{loaded.path.name}: {len(result.minima)} minima in {len(result.basins)} basins "
             f"(threshold {result.barrier_threshold:.3g})")
    draw_disconnectivity(result, basin_images.float().cpu(), [f"{prefix}.png", f"{prefix}.svg"], title)
    record = {"checkpoint": str(loaded.path), "kimg": loaded.kimg, "resolution": res,
              "generator": "ema" if ema else "raw", "seconds": round(time.perf_counter() - t0, 1),
              **result.to_json()}
    write_atomic(f"{prefix}.json", lambda fh: fh.write(json.dumps(record, indent=1).encode()))
    click.echo(f"{loaded.path.name} ({res}x{res}): {z.shape[0]} starts -> {len(result.minima)} minima, "
               f"{len(result.basins)} basins (barrier threshold {result.barrier_threshold:.3g}), "
               f"energies {min(result.energies):.3g} .. {max(result.energies):.3g}; "
               f"{prefix}.png, .svg, .json")


if __name__ == "__main__":
    main()

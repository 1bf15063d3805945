"""Training curves of a run as a picture: metrics.jsonl against kimg, one panel per quantity.

    python tools/plot.py RUN_DIR [--out curves.png]

The energy on data, samples and noise; reconstruction error; KL; latent NLL; gradient norms;
images/s; the demo's sample quality where logged; fades shaded, stage starts dotted. The
trainer keeps RUN_DIR/latest-curves.png up to date at every tick; this draws any run's, also
one that is still training or was stopped.
"""

from __future__ import annotations

from pathlib import Path

import click

from triangle.progressive.curves import plot_curves
from triangle.progressive.run_dir import read_jsonl


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write  [default: RUN_DIR/curves.png]")
def main(run_dir: Path, out: Path | None) -> None:
    """Draw RUN_DIR's metrics.jsonl."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise click.ClickException(f"{log} does not exist: give the run directory of a run "
                                   "that has reported at least one tick")
    records = read_jsonl(log)
    if not records:
        raise click.ClickException(f"{log} holds no record yet: wait for the first tick")
    out = out or run_dir / "curves.png"
    try:
        panels = plot_curves(records, out)
    except ValueError as exc:  # records without any quantity to draw
        raise click.ClickException(f"{log}: {exc}; is it a training run's metrics log?") from None
    click.echo(f"{len(records)} ticks to kimg {records[-1]['kimg']:g}, {len(panels)} panels "
               f"({', '.join(panels)}) -> {out}")


if __name__ == "__main__":
    main()

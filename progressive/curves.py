"""Training curves as a picture: ``metrics.jsonl`` against kimg, one panel per quantity.

``plot_curves(records, path)`` draws every quantity the records hold (the energy on data,
samples and noise; reconstruction error; KL; latent NLL; gradient norms; images/s; the demo's
sample quality where logged), with the fade phases shaded and a line at every stage start.
The trainer refreshes ``RUN_DIR/latest-curves.png`` at every tick (at most once a minute,
and at the end); ``tools/plot.py`` draws any run's. matplotlib (Agg, no display) is imported
on first use.
"""

from __future__ import annotations

import math
import os

from ..files import write_atomic

# (panel title, metrics keys drawn in it); a panel with no key in the records is left out.
PANELS = (
    ("energy f", ("f_real", "f_fake", "f_data", "f_samples", "f_noise")),
    ("reconstruction MSE", ("rec_mse",)),
    ("KL", ("kl",)),
    ("latent NLL", ("lat_nll",)),
    ("gradient norms", ("grad_norm_generator", "grad_norm_inference", "grad_norm_energy")),
    ("images/s", ("images_per_s",)),
    ("demo FD", ("demo_fd",)),
    ("shapes recognised", ("shapes_recognised",)),
)


def panels_for(records: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels that have data: (title, the keys present)."""
    present = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    out = []
    for title, keys in PANELS:
        found = tuple(k for k in keys if k in present)
        if found:
            out.append((title, found))
    return out


def plot_curves(records: list[dict], path: str | os.PathLike) -> list[str]:
    """Draw ``records`` (metrics.jsonl's, in order) into the PNG ``path`` (written atomically);
    returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = panels_for(records)
    if not panels:
        raise ValueError("no plottable quantity in the records")
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 2.4 * rows))
    fig.subplots_adjust(left=0.06, right=0.98, top=0.95, bottom=0.06, hspace=0.45, wspace=0.15)
    kimg = [r["kimg"] for r in records]
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            points = [(r["kimg"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot(*zip(*points, strict=True), label=key, linewidth=1)
        _mark_stages(ax, records)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=6, loc="best")
        ax.set_xlim(0, max(kimg) or 1)
    fig.supxlabel("kimg", fontsize=8)
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=80))
    return [title for title, _ in panels]


def _mark_stages(ax, records: list[dict]) -> None:
    """A dotted line at each stage's first record (the stage began after the record before it);
    the records of fades shaded."""
    for before, r in zip(records, records[1:], strict=False):
        if (r.get("resolution"), r.get("fading")) != (before.get("resolution"), before.get("fading")):
            ax.axvline(before["kimg"], color="grey", linestyle=":", linewidth=0.6)
        if r.get("fading"):
            ax.axvspan(before["kimg"], r["kimg"], color="grey", alpha=0.08, linewidth=0)

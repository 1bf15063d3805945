"""Prepare multi-resolution LMDB datasets (every level 4..max of every image) and verify them.

    python tools/prepare_lmdb.py celebahq SOURCE_DIR --out OUT.lmdb [--max-res 1024]
    python tools/prepare_lmdb.py folder SOURCE_DIR --out OUT.lmdb --max-res R
    python tools/prepare_lmdb.py celeba SOURCE_DIR --out OUT.lmdb   (64², 9,000/1,000 split)
    python tools/prepare_lmdb.py torchvision cifar10 --root DIR --out OUT.lmdb
    python tools/prepare_lmdb.py demo --out OUT.lmdb [--count N] [--max-res R]
    python tools/prepare_lmdb.py verify OUT.lmdb

An interrupted preparation resumes when the same command is run again.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import click

from triangle.datasets import (
    DatasetError,
    celebahq_source,
    demo_source,
    folder_source,
    torchvision_source,
    verify_lmdb,
    write_lmdb,
)
from triangle.datasets.sources import TORCHVISION_SETS
from triangle.resolutions import is_resolution


class Progress:
    """tqdm when installed (images/s included), else a plain line at most once a second."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.last, self.t0, self.done0 = desc, None, 0.0, time.perf_counter(), None

    def __call__(self, step: int, done: int, total: int) -> None:
        if self.done0 is None:
            self.done0 = done - step
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=self.done0, unit="img", desc=self.desc, dynamic_ncols=True)
            except ImportError:
                self.bar = None
        if self.bar is not None:
            self.bar.update(step)
            return
        now = time.perf_counter()
        if now - self.last >= 1.0 or done == total:
            rate = (done - self.done0) / max(now - self.t0, 1e-9)
            click.echo(f"{self.desc}: {done}/{total} ({rate:.1f} img/s)", err=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _disk_usage(path: str) -> int:
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    return sum(os.stat(f).st_blocks * 512 for f in files if os.path.isfile(f))


def _verify(path: str) -> None:
    report = verify_lmdb(path)
    meta = report.metadata
    if meta is None:
        raise click.ClickException(report.problems[0])
    if meta is not None:
        click.echo(f"{path}: {meta.count} images, layout {meta.layout}, source: {meta.source}")
        for r in meta.resolutions:
            note = " (derived)" if r in meta.derived else ""
            click.echo(f"  {r:>5}x{r:<5} {meta.codecs[r]:<5} {report.counts.get(r, 0)} decoded{note}")
        if meta.test_indices:
            click.echo(f"  test split: {len(meta.test_indices)} held-out images")
    if not report.ok:
        for p in report.problems:
            click.echo(f"  problem: {p}", err=True)
        raise click.ClickException(f"{path}: {len(report.problems)} problem(s) found")
    click.echo("verify: every record decoded")


def _run(out: str, make_source, *, verify: bool, **kwargs) -> None:
    """Build the source, write, print the summary; DatasetError -> a one-line error."""
    try:
        source = make_source()
        for w in source.warnings:
            click.echo(f"warning: {w}", err=True)
        bar = Progress("prepare")
        try:
            report = write_lmdb(out, source, progress=bar, **kwargs)
        finally:
            bar.close()
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; run the same command again to resume") from None
    meta = report.metadata
    if report.resumed_from:
        click.echo(f"resumed at item {report.resumed_from} of {report.items}")
    click.echo(f"wrote {report.written} images ({meta.resolutions[0]}..{meta.max_resolution}) to {out} "
               f"in {report.seconds:.1f} s, {report.images_per_second:.1f} images/s")
    if report.skipped:
        reasons: dict[str, int] = {}
        for _, why in report.skipped:
            key = why.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        click.echo(f"skipped {len(report.skipped)}: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
        for name, why in report.skipped[:50]:
            click.echo(f"  {name}: {why}")
        if len(report.skipped) > 50:
            click.echo(f"  ... and {len(report.skipped) - 50} more")
    else:
        click.echo("skipped 0")
    click.echo("size per level (stored bytes):")
    for r in meta.resolutions:
        click.echo(f"  {r:>5}x{r:<5} {meta.codecs[r]:<5} {_human(meta.bytes_per_level.get(r, 0)):>10}")
    click.echo(f"  on disk: {_human(_disk_usage(out))}")
    if meta.test_indices:
        click.echo(f"test split: {len(meta.test_indices)} held-out images (split='test'); "
                   f"train: {meta.count - len(meta.test_indices)}")
    if verify:
        _verify(out)


def common(max_res_default: int | None):
    """Options every preparing command shares."""

    def wrap(f):
        opts = [
            click.option("--out", required=True, type=click.Path(dir_okay=True), help="LMDB to write (a directory)."),
            click.option("--max-res", "max_resolution", type=int, default=max_res_default,
                         required=max_res_default is None, show_default=True, help="Top level (power of two >= 4)."),
            click.option("--codec", type=click.Choice(["jpeg", "png", "raw"]), default="jpeg", show_default=True,
                         help="Levels above --raw-max: JPEG, PNG (lossless) or raw."),
            click.option("--raw-max", type=int, default=64, show_default=True, help="Levels up to this are raw uint8."),
            click.option("--quality", type=int, default=95, show_default=True, help="JPEG quality."),
            click.option("--filter", type=click.Choice(["box", "lanczos"]), default="box", show_default=True,
                         help="box: 2x2 cascade from the top; lanczos: each level from the top."),
            click.option("--holdout", type=int, default=None, help="Hold out this many images as the test split."),
            click.option("--holdout-seed", type=int, default=0, show_default=True),
            click.option("--workers", type=int, default=None, help="Processes (default: all cores)."),
            click.option("--batch-size", type=int, default=0, help="Images per LMDB commit (default: by size)."),
            click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out."),
            click.option("--verify", is_flag=True, help="Re-read and decode every record afterwards."),
        ]
        return functools.reduce(lambda g, o: o(g), reversed(opts), f)

    return wrap


def _check(max_resolution: int, holdout: int | None, workers: int | None) -> None:
    if not is_resolution(max_resolution):
        raise click.UsageError(f"--max-res {max_resolution} is not a power of two >= 4")
    if holdout is not None and holdout < 0:
        raise click.UsageError("--holdout must be >= 0")
    if workers is not None and workers < 1:
        raise click.UsageError("--workers must be >= 1")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Prepare and verify multi-resolution LMDB datasets."""


def _image_options(f):
    f = click.option("--fit", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
                     help="Non-square images: centre crop or pad to square.")(f)
    return click.option("--small", type=click.Choice(["upscale", "skip"]), default="upscale", show_default=True,
                        help="Images smaller than --max-res: upscale (Lanczos) or skip.")(f)


@cli.command()
@click.argument("source_dir", type=click.Path())
@common(max_res_default=1024)
@_image_options
def celebahq(source_dir, out, holdout, verify, **kw):
    """CelebA-HQ: a folder of the 30,000 1024x1024 images (e.g. CelebAMask-HQ/CelebA-HQ-img)."""
    _check(kw["max_resolution"], holdout, kw["workers"])
    _run(out, lambda: celebahq_source(source_dir), verify=verify, holdout=holdout or 0, **kw)


@cli.command()
@click.argument("source_dir", type=click.Path())
@common(max_res_default=None)
@_image_options
@click.option("--limit", type=int, default=0, help="Only the first N images (natural sort order).")
def folder(source_dir, out, holdout, verify, limit, **kw):
    """Any image folder, recursive: JPEG, PNG, WebP, ...; bad files are skipped and listed."""
    _check(kw["max_resolution"], holdout, kw["workers"])
    _run(out, lambda: folder_source(source_dir, limit=limit), verify=verify, holdout=holdout or 0, **kw)


@cli.command()
@click.argument("source_dir", type=click.Path())
@common(max_res_default=64)
@click.option("--count", type=int, default=10_000, show_default=True, help="First N images of the folder.")
@click.option("--crop", type=int, default=140, show_default=True, help="Centre crop before resizing.")
def celeba(source_dir, out, holdout, verify, count, **kw):
    """CelebA at 64x64 as in the paper: 10,000 images of img_align_celeba, 1,000 held out."""
    holdout = 1000 if holdout is None else holdout
    _check(kw["max_resolution"], holdout, kw["workers"])
    _run(out, lambda: folder_source(source_dir, limit=count, description=f"CelebA folder {source_dir}"),
         verify=verify, holdout=holdout, **kw)


@cli.command(name="torchvision")
@click.argument("name", type=click.Choice(TORCHVISION_SETS))
@click.option("--root", required=True, type=click.Path(), help="The torchvision dataset's local root.")
@common(max_res_default=None)
@click.option("--lsun-class", "lsun_classes", multiple=True, default=["bedroom_train"], show_default=True)
def torchvision_cmd(name, root, out, holdout, verify, lsun_classes, **kw):
    """CIFAR-10, Fashion-MNIST (official test set held out) or LSUN from a local root; no download."""
    if kw["max_resolution"] is None:
        raise click.UsageError("--max-res is required (CIFAR-10 and Fashion-MNIST: 32; LSUN: 64)")
    _check(kw["max_resolution"], holdout, kw["workers"])
    fit = "pad" if name == "fashion-mnist" else "crop"  # 28x28 -> 32x32 with a black border
    _run(out, lambda: torchvision_source(name, root, lsun_classes=lsun_classes), verify=verify,
         holdout=holdout or 0, fit=fit, **kw)


@cli.command()
@common(max_res_default=64)
@click.option("--count", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out, holdout, verify, count, seed, **kw):
    """The built-in procedural dataset (no download)."""
    _check(kw["max_resolution"], holdout, kw["workers"])
    if count < 1:
        raise click.UsageError("--count must be >= 1")
    _run(out, lambda: demo_source(count, seed), verify=verify, holdout=holdout or 0, **kw)


@cli.command()
@click.argument("path", type=click.Path())
def verify(path):
    """Re-read and decode every record; print the count per resolution; fail on any problem."""
    _verify(path)


if __name__ == "__main__":
    sys.exit(cli())

"""FID, KID and Inception Score of a checkpoint's generator (paper Table 1), through clean-fid.

    python tools/fid.py RUN_DIR_OR_CHECKPOINT --data LMDB [--metrics fid,kid,is]
        [--num-samples 10000] [--split train] [--features inception|demo|random-conv]
        [--inception PATH] [--device cuda] [--batch 64] [--workers N] [--ema/--raw]
    accelerate launch --num_processes 8 tools/fid.py RUN_DIR ...   # the same numbers, 8x faster

Samples the (EMA) generator at its checkpoint's resolution, compares them with the data at that
resolution, prints the metrics and appends one JSON line to ``metrics-fid.jsonl`` in the run
directory. Under ``accelerate launch`` the samples and the data's batches are shared out over
the processes and their features gathered (metrics/fid.py, ``Shard``): the result equals one
process's for the same seed. The data statistics are cached beside the LMDB (``LMDB.fid-stats/``, or the run
directory's ``fid-stats/`` if that is not writable). The paper reports CelebA 64x64 FID 31.92
with 10k samples.

``--features demo`` (runs on the built-in demo dataset) measures in the features of the demo
feature network shipped with the package (metrics/demo_features.py; no download) and also
prints the fraction of samples whose shape it recognises, and the two references computed the
same way: the floor (real images that the statistics do not hold, against them: what a
perfect generator scores; for a demo run as many fresh renders of its renderer as samples,
else the other split's images, at most as many) and uniform noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import click
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from triangle.datasets import SHAPES, MultiResolutionDataset, read_metadata
from triangle.metrics.demo_features import (
    SCORE_BATCH,
    DemoFeatures,
    DemoQuality,
    DemoReference,
    demo_images,
)
from triangle.metrics.fid import (
    INCEPTION_FILE,
    METRICS,
    InceptionFeatures,
    RandomConvFeatures,
    Shard,
    data_statistics,
    default_stats_dir,
    fid_of_generator,
    generated_images,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_cli.py, also when loaded by path
import _cli  # noqa: E402

FEATURES = ("inception", "demo", "random-conv")


def _demo_quality(loaded, data: str, features: DemoFeatures, *, split: str, num_samples: int,
                  num_real: int | None, batch: int, device, cache: Path, seed: int) -> DemoQuality:
    """The same samples (same z) scored by the demo network against the same data statistics,
    with the noise on as many uniform noise images and the floor on as many real images that
    are not in those statistics: for a demo run on its own dataset, fresh renders of the same
    renderer and seed; otherwise the other split's images, at most as many as it has (none for
    --split all). A Fréchet distance from N images is biased upwards by about 1/N, so only a
    floor from as many images as the samples is the score of a perfect generator."""
    res = loaded.resolution
    real, _, _ = data_statistics(data, res, features, split=split, count=num_real, batch=batch,
                                 cache_dir=cache)  # the cache fid_of_generator wrote
    other = {"train": "test", "test": "train"}.get(split)
    cfg, floor = loaded.config, None
    own_demo = cfg.data is None and Path(data).resolve() == (loaded.run_dir / _cli.DEMO_DATA).resolve()
    if own_demo:  # images after the dataset's own: in neither split
        # Rendered as the LMDB's levels are up to 64 (above, they are JPEG: close, not equal),
        # a batch at a time: 10,000 images at 256x256 would be 8 GB at once.
        top = min(read_metadata(data).max_resolution, 64)
        end = cfg.demo_count + num_samples
        floor = (demo_images(range(i, min(i + SCORE_BATCH, end)), res, cfg.seed, top)
                 for i in range(cfg.demo_count, end, SCORE_BATCH))
    elif other is not None and (other == "train" or read_metadata(data).test_indices):
        ds = MultiResolutionDataset(data, split=other)
        count = min(num_samples, len(ds))
        floor = torch.stack([ds.image(i, res, as_float=True) for i in range(count)])
    reference = DemoReference(real, floor, features.net, resolution=res, noise_count=num_samples,
                              seed=seed)
    samples = generated_images(loaded.generator, loaded.fade_alpha, loaded.latent_dim, num_samples,
                               batch=batch, device=device, seed=seed)
    return reference.score(b / 127.5 - 1 for b in samples)  # [0, 255] levels -> [-1, 1]


def _stats_dir(data: str, run_dir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    beside = default_stats_dir(data)
    parent = beside if beside.exists() else beside.parent
    return beside if os.access(parent, os.W_OK) else run_dir / "fid-stats"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_cli.checkpoint_argument
@click.option("--data", type=click.Path(), default=None,
              help="Multi-resolution LMDB  [default: the run's dataset]")
@click.option("--metrics", "metrics_list", default="fid,kid", show_default=True,
              help=f"Comma-separated, of {', '.join(METRICS)} (is: Inception Score, 10 splits, "
                   "from the feature network's classifier).")
@click.option("--num-samples", type=click.IntRange(min=2), default=10_000, show_default=True,
              help="Generated images.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True,
              help="Data split of the reference statistics.")
@click.option("--num-real", type=click.IntRange(min=2), default=None,
              help="Data images (the split's first N)  [default: the whole split]")
@click.option("--inception", type=click.Path(), default=None,
              help=f"{INCEPTION_FILE} or its folder (offline machines)  [default: clean-fid's "
                   "/tmp copy, downloaded if missing]")
@click.option("--features", "features_name", type=click.Choice(FEATURES), default=None,
              help="Feature network. inception: clean-fid's (FID as published); demo: the demo "
                   "feature network (built-in demo data only; also prints recognised shapes, "
                   "floor and noise); random-conv: a seeded random network (smoke tests only). "
                   "Only inception is comparable with published numbers.  [default: inception]")
@click.option("--extractor", type=click.Choice(FEATURES), default=None, hidden=True)  # old name
@_cli.device_option
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Workers resizing images to 299 (DataLoader processes for the data, threads for "
                   "samples).  [default: 4, at most the usable CPUs]")
@click.option("--ema/--raw", default=True, show_default=True, help="EMA or raw generator weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled z.")
@click.option("--stats-dir", type=click.Path(path_type=Path), default=None,
              help="Cache of data statistics  [default: LMDB.fid-stats/ beside the data]")
def main(checkpoint, data, metrics_list, num_samples, split, num_real, inception, features_name,
         extractor, device, batch, workers, ema, seed, stats_dir):
    """FID, KID and IS of RUN_DIR_OR_CHECKPOINT's generator (a run dir: its newest checkpoint)."""
    features_name = features_name or extractor or "inception"
    # More DataLoader processes than usable cores only slow the run down (torch warns about it,
    # counting the cores this process may run on, as here).
    if workers is None:
        usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
        workers = min(4, usable)
    metrics = tuple(m.strip() for m in metrics_list.split(",") if m.strip())
    if not metrics or set(metrics) - set(METRICS):
        raise click.BadParameter(f"{metrics_list!r}: give some of {', '.join(METRICS)}",
                                 param_hint="--metrics")
    # Under accelerate launch: joins the process group, a device each (PartialState reads the
    # launcher's settings but for --cpu, which only the Accelerator reads from the environment).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    multi = state.num_processes > 1
    device = state.device if multi and device is None else _cli.resolve_device(device)
    loaded = _cli.load(checkpoint, ema=ema, device=device)
    needs_data = bool({"fid", "kid"} & set(metrics))  # the IS alone reads no data
    data = _cli.run_data(loaded, data) if needs_data else data
    with _cli.one_line_errors():
        if features_name == "random-conv":
            features = RandomConvFeatures(device=device)
        elif features_name == "demo":
            features = DemoFeatures(device=device)
        else:
            features = InceptionFeatures(inception, device=device)
        cache = _stats_dir(data, loaded.run_dir, stats_dir) if needs_data else None
        t0 = time.perf_counter()
        r = fid_of_generator(loaded.generator, loaded.fade_alpha, loaded.latent_dim, loaded.resolution,
                             data, features, num_samples=num_samples, split=split, num_real=num_real,
                             batch=batch, device=device, num_workers=workers, cache_dir=cache, seed=seed,
                             metrics=metrics, shard=Shard.current())
        if not state.is_main_process:
            return
        demo = (_demo_quality(loaded, data, features, split=split, num_samples=num_samples,
                              num_real=num_real, batch=batch, device=device, cache=cache, seed=seed)
                if features_name == "demo" and r.fid is not None else None)
    record = {
        "checkpoint": loaded.path.name, "kimg": loaded.kimg, "images_seen": loaded.images_seen,
        "resolution": loaded.resolution, "fade_alpha": loaded.fade_alpha,
        "generator": "ema" if ema else "raw", "fid": r.fid, "kid": r.kid,
        "inception_score": r.inception_score and r.inception_score[0],
        "inception_score_std": r.inception_score and r.inception_score[1],
        "num_samples": r.num_fake, "num_real": r.num_real, "data": os.path.realpath(data) if needs_data else None,
        "split": split, "extractor": features.name, "seed": seed, "processes": state.num_processes,
        "seconds": round(time.perf_counter() - t0, 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if demo is not None:
        record |= {"demo_fd_floor": demo.floor, "demo_fd_noise": demo.noise,
                   "shapes_recognised": demo.shapes_recognised,
                   "data_shapes_recognised": demo.data_recognised,
                   "shape_fractions": dict(zip(SHAPES, demo.shape_fractions)),
                   "none_fraction": demo.none_fraction}
    with open(loaded.run_dir / "metrics-fid.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    stats = f"{'read from' if r.stats_cached else 'written to'} {r.stats_file}" if r.stats_file else "not cached"
    scores = [f"FID {r.fid:.3f}" if r.fid is not None else "",
              f"KID {r.kid:.5f}" if r.kid is not None else "",
              f"IS {r.inception_score[0]:.3f} ± {r.inception_score[1]:.3f}" if r.inception_score else ""]
    against = f" vs {r.num_real} {split} images" if r.num_real else ""
    processes = f", {state.num_processes} processes" if multi else ""
    click.echo(f"{loaded.path.name} ({loaded.resolution}x{loaded.resolution}, kimg {loaded.kimg:g}, "
               f"{record['generator']}): {'  '.join(x for x in scores if x)}  "
               f"({r.num_fake} samples{against}, {features.name}{processes})")
    if demo is not None:
        # The FD printed is fid_of_generator's, the one logged; the demo scorer's own equals it.
        click.echo(dataclasses.replace(demo, fd=r.fid).summary())
    click.echo(f"{f'data statistics {stats}; ' if needs_data else ''}appended to "
               f"{loaded.run_dir / 'metrics-fid.jsonl'}")


if __name__ == "__main__":
    main()

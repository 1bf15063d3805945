"""Measure data preparation and reading against the common approaches, in one run.

    python bench/data.py                      # a few minutes on 2 CPU cores
    python bench/data.py --images 200 --reads 1024 --workdir /scratch/bench

Inputs: ``--images`` 1024x1024 JPEG files (q95; demo scenes with sensor-like noise so they
compress like photos). Printed:

- preparation images/s, all levels 4..1024: ours (2x2 box cascade, raw <= 64, JPEG above)
  against per-level Lanczos resize from the full image + JPEG for every level, as the
  PyTorch StyleGAN ports' prepare_data.py does; both with the same number of processes;
- reading images/s per resolution with 0 and 2 DataLoader workers, at the trainer's batch on
  one GPU (``batch_sizes`` of the default schedule: 128 at 4², 64 at 32², 32 at 128², 16 at
  256², 4 at 1024²; ``--batch N`` for one size everywhere): ours (uint8, read the way the
  trainer reads it: ``DataLoader(ds, batch_sampler=ScheduledBatchSampler, num_workers=k,
  persistent_workers=k>0, collate_fn=collate_images)``) against (a) PIL-decoding a JPEG stored per
  level in LMDB with the ports' transform (flip, ToTensor, Normalize) and (b) torchvision
  ImageFolder resizing the 1024 JPEGs on the fly; both baselines with DataLoader's own
  batching at the same batch size (ImageFolder: at most 16, as it reads few images).
  "item by item" is our dataset without ``__getitems__`` (one ``__getitem__`` per image,
  then the default collate stacks), the way the reader worked before it had one. Each
  figure is the median of ``--repeats`` interleaved measurements, each at least 0.3 s (the
  machine may be shared: compare only figures of one run).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import tempfile
import time
import warnings
from pathlib import Path

import click
import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from triangle.datasets import (
    MultiResolutionDataset,
    ScheduledBatchSampler,
    collate_images,
    folder_source,
    write_lmdb,
)
from triangle.datasets.demo import render_demo_image
from triangle.progressive.schedule import ScheduleConfig, batch_sizes

warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")


def _make_input(args: tuple[int, str]) -> None:
    i, path = args
    img = render_demo_image(i, 1024).astype(np.int16)
    img += np.random.default_rng(i).normal(0, 6, img.shape).astype(np.int16)  # photo-like entropy
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)


def _baseline_encode(path: str) -> list[tuple[int, bytes]]:
    """The ports' way: every level resized from the full image with Lanczos, each a JPEG."""
    img = Image.open(path).convert("RGB")
    out = []
    size = 4
    while size <= img.size[0]:
        buf = io.BytesIO()
        img.resize((size, size), Image.LANCZOS).save(buf, format="jpeg", quality=95)
        out.append((size, buf.getvalue()))
        size *= 2
    return out


def baseline_prepare(files: list[str], out: str, workers: int) -> float:
    """Write the StyleGAN-port layout from ``files``; return images/s."""
    t0 = time.perf_counter()
    env = lmdb.open(out, map_size=1 << 34, readahead=False)
    with multiprocessing.get_context().Pool(workers) as pool, env.begin(write=True) as txn:
        for i, levels in enumerate(pool.imap(_baseline_encode, files, chunksize=1)):
            for size, data in levels:
                txn.put(f"{size}-{str(i).zfill(5)}".encode(), data)
        txn.put(b"length", str(len(files)).encode())
    env.close()
    return len(files) / (time.perf_counter() - t0)


class PortDataset(Dataset):
    """The ports' reader: PIL decode of the per-level JPEG, then flip/ToTensor/Normalize."""

    def __init__(self, path: str, length: int):
        import torchvision.transforms as T

        self.path, self.length, self.resolution, self.env = path, length, 4, None
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if self.env is None:  # lazily, so the baseline is not handicapped by a shared handle
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False)
        with self.env.begin() as txn:
            data = txn.get(f"{self.resolution}-{str(i).zfill(5)}".encode())
        return self.transform(Image.open(io.BytesIO(data)))

    def __getstate__(self):
        return {**self.__dict__, "env": None}


class RandomIndices:
    """An endless stream of random indices for a baseline's DataLoader (the same for every
    reader and run), so a measurement may take as many batches as it needs."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        rng = np.random.default_rng(0)
        while True:
            yield from rng.integers(0, self.n, size=4096).tolist()


class ItemByItem(Dataset):
    """Our dataset without ``__getitems__``: DataLoader reads it one ``__getitem__`` at a time."""

    def __init__(self, ds: MultiResolutionDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        return self.ds[key]


def _rate(loader, reads: int, skip: int, min_seconds: float = 0.3) -> float:
    """Images/s over at least ``reads`` images, 4 batches and ``min_seconds`` (a time slice
    lost to another job must not decide a figure), after the first ``1 + skip`` batches
    (workers started; with k workers, batches made while the first was awaited are ready at
    once: skip k of them)."""
    it = iter(loader)
    for _ in range(1 + skip):
        next(it)
    n, batches, t0 = 0, 0, time.perf_counter()
    while n < reads or batches < 4 or time.perf_counter() - t0 < min_seconds:
        batch_ = next(it)
        n += len(batch_[0] if isinstance(batch_, (list, tuple)) else batch_)  # ImageFolder: (x, y)
        batches += 1
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


@click.command()
@click.option("--images", default=48, show_default=True, help="1024x1024 input JPEGs.")
@click.option("--reads", default=512, show_default=True, help="Images read per measurement, at least (a quarter at 1024).")
@click.option("--batch", default=0, show_default=True,
              help="Batch size for every resolution; 0: the trainer's one-GPU batch per resolution.")
@click.option("--repeats", default=3, show_default=True, help="Interleaved measurements per figure (median).")
@click.option("--workers", default=2, show_default=True, help="Processes for preparing; DataLoader workers.")
@click.option("--resolutions", default="4,32,128,256,1024", show_default=True)
@click.option("--workdir", default=None, help="Where to put the inputs and LMDBs (default: a temp dir).")
def main(images, reads, batch, repeats, workers, resolutions, workdir):
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(workdir or tmp.name)
    inputs = root / "inputs" / "all"
    inputs.mkdir(parents=True, exist_ok=True)
    files = [str(inputs / f"{i:05d}.jpg") for i in range(images)]
    with multiprocessing.get_context().Pool(workers) as pool:
        pool.map(_make_input, [(i, f) for i, f in enumerate(files) if not os.path.exists(f)])
    mean_kb = np.mean([os.path.getsize(f) for f in files]) / 1024
    print(f"machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, threads 1; "
          f"{images} inputs 1024x1024 JPEG q95, mean {mean_kb:.0f} KiB")

    ours_path, port_path = str(root / "ours.lmdb"), str(root / "port.lmdb")
    report = write_lmdb(ours_path, folder_source(inputs), max_resolution=1024, workers=workers, overwrite=True)
    ours_prep = report.written / report.seconds
    if os.path.exists(port_path):
        for f in Path(port_path).iterdir():
            f.unlink()
    base_prep = baseline_prepare(files, port_path, workers)
    print(f"\nprepare, all levels 4..1024, {workers} processes:")
    print(f"  ours (box cascade, raw<=64, JPEG q95 above)  {ours_prep:8.1f} img/s")
    print(f"  per-level Lanczos resize + JPEG q95 each      {base_prep:8.1f} img/s   ratio {ours_prep / base_prep:.2f}x")

    import torchvision.datasets as tvd
    import torchvision.transforms as T

    print("\nread, images/s; ratios are ours / baseline; median of "
          f"{repeats} interleaved measurements")
    print(f"{'res':>5} {'batch':>5} {'workers':>7} {'ours':>8} {'item by item':>12} {'lmdb+PIL':>9} {'ratio':>6} "
          f"{'ImageFolder':>11} {'ratio':>6}")
    ds = MultiResolutionDataset(ours_path, split="all")
    port_ds = PortDataset(port_path, images)  # one per process: LMDB allows one handle per file
    for res in [int(r) for r in resolutions.split(",")]:
        b = batch or batch_sizes(ScheduleConfig(max_resolution=max(res, 4)), res)[1]
        n = max(reads // 4 if res >= 1024 else reads, 2 * b)
        tf = T.Compose([T.Resize((res, res)), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        folder = tvd.ImageFolder(str(root / "inputs"), transform=tf)
        port_ds.resolution = res
        for w in (0, workers):
            kw = {"num_workers": w, "persistent_workers": w > 0}
            rates: dict[str, list[float]] = {"ours": [], "item": [], "port": [], "imf": []}
            for _ in range(repeats):  # interleaved, so a burst of load hits every reader alike
                sampler = ScheduledBatchSampler(len(ds), lambda _n, r=res, b=b: (r, b), seed=0)
                rates["ours"].append(_rate(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_images,
                                                      **kw), n, w))
                sampler = ScheduledBatchSampler(len(ds), lambda _n, r=res, b=b: (r, b), seed=0)
                rates["item"].append(_rate(DataLoader(ItemByItem(ds), batch_sampler=sampler, **kw), n, w))
                rates["port"].append(_rate(DataLoader(port_ds, batch_size=b, **kw,
                                                      sampler=RandomIndices(len(port_ds))), n, w))
                # ~100x slower (a 1024 JPEG decoded per image): fewer reads, a batch of at most 16
                # (its per-batch costs are nothing beside that decode)
                bf = min(b, 16)
                rates["imf"].append(_rate(DataLoader(folder, batch_size=bf, **kw,
                                                     sampler=RandomIndices(len(folder))), 4 * bf, w))
            ours, item, port, imf = (float(np.median(rates[k])) for k in ("ours", "item", "port", "imf"))
            print(f"{res:>5} {b:>5} {w:>7} {ours:>8.0f} {item:>12.0f} {port:>9.0f} {ours / port:>5.1f}x "
                  f"{imf:>11.0f} {ours / imf:>5.0f}x", flush=True)
    ds.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

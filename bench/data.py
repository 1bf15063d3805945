"""Measure data preparation and reading against the common approaches, in one run.

    python bench/data.py                      # a few minutes on 2 CPU cores
    python bench/data.py --images 200 --reads 1024 --workdir /scratch/bench

Inputs: ``--images`` 1024x1024 JPEG files (q95; demo scenes with sensor-like noise so they
compress like photos). Printed:

- preparation images/s, all levels 4..1024: ours (2x2 box cascade, raw <= 64, JPEG above)
  against per-level Lanczos resize from the full image + JPEG for every level, as the
  PyTorch StyleGAN ports' prepare_data.py does; both with the same number of processes;
- reading images/s per resolution with 0 and 2 DataLoader workers: ours (uint8) against
  (a) PIL-decoding a JPEG stored per level in LMDB with the ports' transform (flip, ToTensor,
  Normalize) and (b) torchvision ImageFolder resizing the 1024 JPEGs on the fly.
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
    folder_source,
    write_lmdb,
)
from triangle.datasets.demo import render_demo_image

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


def _indices(n: int, count: int) -> list[int]:
    """Random indices as a plain list (cheap to iterate; the same for every reader)."""
    return np.random.default_rng(0).integers(0, n, size=count).tolist()


def _rate(loader, reads: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # workers started and warm
    n, t0 = 0, time.perf_counter()
    while n < reads:
        batch_ = next(it)
        n += len(batch_[0] if isinstance(batch_, (list, tuple)) else batch_)  # ImageFolder: (x, y)
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


@click.command()
@click.option("--images", default=48, show_default=True, help="1024x1024 input JPEGs.")
@click.option("--reads", default=512, show_default=True, help="Images read per measurement (a quarter at 1024).")
@click.option("--batch", default=16, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Processes for preparing; DataLoader workers.")
@click.option("--resolutions", default="4,32,128,256,1024", show_default=True)
@click.option("--workdir", default=None, help="Where to put the inputs and LMDBs (default: a temp dir).")
def main(images, reads, batch, workers, resolutions, workdir):
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

    print(f"\nread, images/s (batch {batch}); ratios are ours / baseline")
    print(f"{'res':>5} {'workers':>7} {'ours':>9} {'lmdb+PIL':>9} {'ratio':>6} {'ImageFolder':>11} {'ratio':>6}")
    ds = MultiResolutionDataset(ours_path, split="all")
    port_ds = PortDataset(port_path, images)  # one per process: LMDB allows one handle per file
    for res in [int(r) for r in resolutions.split(",")]:
        n = reads // 4 if res >= 1024 else reads
        for w in (0, workers):
            kw = {"num_workers": w, "persistent_workers": w > 0}
            sampler = ScheduledBatchSampler(len(ds), lambda _n, r=res: (r, batch), seed=0)
            ours = _rate(DataLoader(ds, batch_sampler=sampler, **kw), n, batch)
            port_ds.resolution = res
            port = _rate(DataLoader(port_ds, batch_size=batch, **kw,
                                    sampler=_indices(len(port_ds), n + 2 * batch)), n, batch)
            tf = T.Compose([T.Resize((res, res)), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
            folder = tvd.ImageFolder(str(root / "inputs"), transform=tf)
            imf = _rate(DataLoader(folder, batch_size=batch, **kw,
                                   sampler=_indices(len(folder), n + 2 * batch)),
                        max(batch * 2, n // 8), batch)
            print(f"{res:>5} {w:>7} {ours:>9.0f} {port:>9.0f} {ours / port:>5.1f}x {imf:>11.0f} {ours / imf:>5.0f}x",
                  flush=True)
    ds.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

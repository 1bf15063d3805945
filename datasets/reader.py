"""Read a multi-resolution LMDB (either layout) as a torch Dataset.

The environment is opened lazily, once per process (a handle must never cross a fork), with
``readonly=True, lock=False, readahead=False``; pickling drops it, so DataLoader workers
under fork and spawn each open their own. Items are addressed as ``(index, resolution,
flip)``, so the resolution can change from one batch to the next with the same workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .format import (
    DatasetError,
    Metadata,
    acquire_reader,
    box_downsample,
    decode_numpy,
    image_key,
    metadata_from_txn,
    port_key,
    read_metadata,
    release_reader,
)

try:  # libjpeg-turbo straight into a CHW tensor: ~1.3x faster than PIL, and no extra copy
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
    from torchvision.io import decode_png as _tv_decode_png
except ImportError:  # pragma: no cover - torchvision is a dependency, but the reader does not need it
    _tv_decode_jpeg = _tv_decode_png = None

SPLITS = ("train", "test", "all")


def split_indices(meta: Metadata, split: str) -> np.ndarray:
    """Dataset indices of ``split`` (sorted int64). "train" excludes every test index."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(meta.count, dtype=np.int64)
    test = np.asarray(meta.test_indices, dtype=np.int64)
    if split == "test":
        if test.size == 0:
            raise DatasetError(f"{meta.source}: no held-out test split; prepare it with --holdout N")
        return test
    keep = np.ones(meta.count, dtype=bool)
    keep[test] = False
    return np.flatnonzero(keep).astype(np.int64)


@dataclass
class _Handle:
    env: object
    pid: int = field(default_factory=os.getpid)


class MultiResolutionDataset(Dataset):
    """Images of one split at any stored resolution.

    ``ds[(i, resolution, flip)]`` -> ``torch.uint8`` tensor 3 x R x R (RGB, CHW) of the
    ``i``-th item of the split; ``ds[i]`` uses ``self.resolution`` (default: the top) unflipped.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", resolution: int | None = None):
        self.path = os.fspath(path)
        self.meta = read_metadata(self.path)
        self.split = split
        self.indices = split_indices(self.meta, split)
        self.resolutions = list(self.meta.resolutions)
        self.max_resolution = self.meta.max_resolution
        self.resolution = self._check_resolution(resolution or self.max_resolution)
        self._handle: _Handle | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None  # an LMDB handle must not travel to another process
        return state

    def _check_resolution(self, resolution: int) -> int:
        if resolution not in self.meta.codecs:
            raise DatasetError(f"{self.path}: no {resolution}x{resolution} level; available: "
                               f"{', '.join(map(str, self.resolutions))}")
        return int(resolution)

    def _txn(self):
        h = self._handle
        if h is None or h.pid != os.getpid():  # first use in this process, or a fork since
            h = self._handle = _Handle(acquire_reader(self.path))
            with h.env.begin() as txn:  # the dataset must not have changed under us
                if metadata_from_txn(txn, self.path).count != self.meta.count:
                    raise DatasetError(f"{self.path}: changed since it was opened; reopen it")
        return h.env.begin()

    def close(self) -> None:
        """Give back this process's handle (reopened lazily on the next read)."""
        if self._handle is not None and self._handle.pid == os.getpid():
            release_reader(self.path)
        self._handle = None

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):
            i, resolution, flip = key
        else:
            i, resolution, flip = key, self.resolution, False
        return self.image(int(i), int(resolution), bool(flip))

    def image(self, i: int, resolution: int, flip: bool = False, as_float: bool = False) -> torch.Tensor:
        """Item ``i`` of the split: ``uint8`` 3 x R x R, or ``float32`` in [-1, 1] if ``as_float``."""
        if not 0 <= i < len(self.indices):
            raise IndexError(f"index {i} out of range for the {self.split} split of {len(self.indices)} items")
        resolution = self._check_resolution(resolution)
        t = self._read(int(self.indices[i]), resolution)
        if flip:
            t = t.flip(2)
        if as_float:
            return t.to(torch.float32).div_(127.5).sub_(1.0)
        return t

    def _read(self, index: int, resolution: int) -> torch.Tensor:
        if resolution in self.meta.derived:  # StyleGAN-port LMDBs: cascade from the smallest stored level
            src = min(r for r in self.resolutions if r not in self.meta.derived)
            a = self._read(index, src).permute(1, 2, 0).numpy()
            while a.shape[0] > resolution:
                a = box_downsample(a)
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        key = image_key(resolution, index) if self.meta.layout == "triangle" else port_key(resolution, index)
        with self._txn() as txn:
            data = txn.get(key)
        if data is None:
            raise DatasetError(f"{self.path}: record {key.decode()} is missing; run prepare_lmdb.py verify")
        return decode_tensor(data, self.meta.codecs[resolution], resolution)


def decode_tensor(data: bytes, codec: str, resolution: int) -> torch.Tensor:
    """Record bytes -> ``uint8`` 3 x R x R tensor (contiguous)."""
    if codec == "jpeg" and _tv_decode_jpeg is not None:
        t = _tv_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    elif codec == "png" and _tv_decode_png is not None:
        t = _tv_decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    else:
        a = decode_numpy(data, codec, resolution)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    if t.shape[0] == 1:  # a grayscale JPEG written by another tool
        t = t.expand(3, -1, -1).contiguous()
    if tuple(t.shape) != (3, resolution, resolution):
        raise DatasetError(f"record decodes to {tuple(t.shape)}, expected (3, {resolution}, {resolution})")
    return t

"""Read a multi-resolution LMDB (either layout) as a torch Dataset.

The environment is opened lazily, once per process (a handle must never cross a fork), with
``readonly=True, lock=False, readahead=False``; pickling drops it, so DataLoader workers
under fork and spawn each open their own. Items are addressed as ``(index, resolution,
flip)``, so the resolution can change from one batch to the next with the same workers.

DataLoader hands each whole batch to ``__getitems__``: one LMDB transaction, every image
decoded (or, raw, copied) straight into one ``uint8`` B x 3 x R x R tensor, its flip folded
into that copy. It is returned as an :class:`ImageBatch`, a sequence of the B images (so
DataLoader's default collate stacks it, one copy); :func:`collate_images`, passed as
``collate_fn``, returns the tensor itself. From a worker, through that collate, a batch of up
to ``PIPE_MAX_BYTES`` travels as bytes through the result pipe (:class:`PipedBatch`), a larger
one as torch sends tensors, through shared memory; either way the main process receives a
plain tensor. A worker that has sent a batch through the pipe ends when its parent process
dies (:func:`_exit_with_parent`): a write into that pipe can block forever once nobody reads it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

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


def _torchvision_decoders() -> dict:
    """torchvision's public JPEG/PNG decoders (libjpeg-turbo straight into a CHW view of HWC
    memory; measured up to 1.7x PIL's rate at 128x128, bench/data.py), or none where this
    torchvision lacks them (they are deprecated since 0.29): PIL decodes then."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, decode_png
    except ImportError:  # pragma: no cover - a torchvision without its image decoders
        return {}
    rgb = ImageReadMode.RGB  # grayscale and CMYK records come out RGB too
    return {"jpeg": lambda t: decode_jpeg(t, mode=rgb), "png": lambda t: decode_png(t, mode=rgb)}


_DECODERS = _torchvision_decoders()
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

    def _txn(self, buffers: bool = False):
        """A read transaction on this process's handle (``buffers``: values are views of the
        map, valid until the transaction ends)."""
        h = self._handle
        if h is None or h.pid != os.getpid():  # first use in this process, or a fork since
            h = self._handle = _Handle(acquire_reader(self.path))
            with h.env.begin() as txn:  # the dataset must not have changed under us
                if metadata_from_txn(txn, self.path).count != self.meta.count:
                    raise DatasetError(f"{self.path}: changed since it was opened; reopen it")
        return h.env.begin(buffers=buffers)

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

    def __getitems__(self, keys: list) -> ImageBatch:
        """A whole batch of keys (as ``__getitem__`` takes them) at once, as one tensor.

        DataLoader calls this with each batch of its batch sampler. Keys of mixed resolutions
        give a plain list of the images (as ``__getitem__`` would).
        """
        items = [k if isinstance(k, tuple) else (k, self.resolution, False) for k in keys]
        if not items:
            return []
        idx, res, flips = zip(*items, strict=True)
        resolution = int(res[0])
        if any(int(r) != resolution for r in res):
            return [self[k] for k in keys]
        resolution = self._check_resolution(resolution)
        pos = np.asarray(idx, dtype=np.int64)
        bad = (pos < 0) | (pos >= len(self.indices))
        if bad.any():
            raise IndexError(f"index {int(pos[bad][0])} out of range for the {self.split} split of "
                             f"{len(self.indices)} items")
        flip = np.asarray(flips, dtype=bool)
        out = torch.empty((len(items), 3, resolution, resolution), dtype=torch.uint8)
        if resolution in self.meta.derived:
            for j, index in enumerate(self.indices[pos].tolist()):
                t = self._read(index, resolution)
                out[j] = t.flip(2) if flip[j] else t
        else:
            self._read_batch(self.indices[pos].tolist(), resolution, flip, out.numpy())
        return ImageBatch(out)

    def _read_batch(self, indices: list[int], resolution: int, flip: np.ndarray, out: np.ndarray) -> None:
        """Records ``indices`` at ``resolution`` into ``out`` (B x 3 x R x R, flipped where ``flip``)."""
        if self.meta.layout == "triangle":
            prefix = f"r{resolution}/".encode()
            keys = [prefix + b"%08d" % i for i in indices]
        else:
            keys = [port_key(resolution, i) for i in indices]
        codec = self.meta.codecs[resolution]
        r = resolution
        with self._txn(buffers=True) as txn:
            if codec == "raw":
                records = [txn.get(k) for k in keys]
                if None in records:
                    self._missing(keys[records.index(None)])
                size = r * r * 3
                if any(len(b) != size for b in records):
                    b = next(b for b in records if len(b) != size)
                    raise DatasetError(f"raw record of {len(b)} bytes, expected {r}x{r}x3")
                hwc = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(-1, r, r, 3)
                chw = hwc.transpose(0, 3, 1, 2)
                if flip.all():
                    np.copyto(out, chw[..., ::-1])
                else:
                    np.copyto(out, chw)
                    if flip.any():
                        out[flip] = chw[flip][..., ::-1]
                return
            with warnings.catch_warnings():  # torchvision's deprecation notice, once per call
                warnings.simplefilter("ignore", DeprecationWarning)
                for j, k in enumerate(keys):
                    data = txn.get(k)
                    if data is None:
                        self._missing(k)
                    chw = decode_chw(data, codec, r)
                    np.copyto(out[j], chw[..., ::-1] if flip[j] else chw)

    def _missing(self, key: bytes):
        raise DatasetError(f"{self.path}: record {key.decode()} is missing; run prepare_lmdb.py verify")

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_chw(data, self.meta.codecs[resolution], resolution)
        return torch.from_numpy(np.ascontiguousarray(chw))


def decode_chw(data, codec: str, resolution: int) -> np.ndarray:
    """Record bytes -> ``uint8`` 3 x R x R (a CHW view of HWC memory)."""
    decoder = _DECODERS.get(codec)
    if decoder is None:
        return decode_numpy(data, codec, resolution).transpose(2, 0, 1)
    t = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if tuple(t.shape) != (3, resolution, resolution):
        raise DatasetError(f"record decodes to {tuple(t.shape)}, expected (3, {resolution}, {resolution})")
    return t.numpy()


# Batches up to this size leave a DataLoader worker as bytes through its result pipe; larger
# ones as torch sends a tensor, in shared memory. Passing a shared-memory tensor costs a socket
# connection with an authentication handshake per batch (the file descriptor changes hands),
# about a millisecond, which is most of the time of a small batch.
PIPE_MAX_BYTES = 1 << 20


class ImageBatch(list):
    """What ``__getitems__`` returns: the list of the B images of a batch (3 x R x R views) of
    one contiguous ``uint8`` B x 3 x R x R tensor, ``.tensor``. :func:`collate_images` returns
    ``.tensor`` itself; DataLoader's default collate stacks the images (a copy).
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.unbind(0))
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"ImageBatch({tuple(self.tensor.shape)})"


def collate_images(batch: ImageBatch | Sequence[torch.Tensor]) -> torch.Tensor | PipedBatch:
    """DataLoader's ``collate_fn`` for :class:`MultiResolutionDataset`: an :class:`ImageBatch`'s
    tensor as it is (no copy); any other list of images, stacked. In a DataLoader worker a
    batch of up to ``PIPE_MAX_BYTES`` is wrapped as a :class:`PipedBatch`, which reaches the
    main process as a plain tensor too."""
    if not isinstance(batch, ImageBatch):
        return torch.stack(list(batch))
    t = batch.tensor
    if get_worker_info() is not None and t.numel() <= PIPE_MAX_BYTES:
        _exit_with_parent()
        return PipedBatch(t)
    return t


class PipedBatch:
    """A small batch leaving a DataLoader worker: pickled as its bytes and unpickled (in the
    main process) as a plain tensor, instead of as a shared-memory tensor."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return _tensor_from_bytes, (bytearray(self.tensor.numpy()), tuple(self.tensor.shape))


def _tensor_from_bytes(data: bytearray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8).view(shape)


PARENT_POLL_S = 1.0  # how often a worker that pipes batches looks whether its parent still lives
PARENT_WATCH = "exit-with-parent"  # the watch thread's name (a fork of the process has none)


def _exit_with_parent() -> None:
    """Start, once per DataLoader worker process, a daemon thread that ends the process
    (``os._exit``) as soon as the process that started it has died.

    Why: a batch sent as bytes through the worker's result pipe (``PipedBatch``, up to
    ``PIPE_MAX_BYTES``; a pipe holds 64 KiB) leaves the worker's queue-feeder thread blocked in
    the write until the main process reads it. When the main process is killed (SIGKILL, a
    cluster's pre-emption) nobody ever reads it, and the write never fails either, since the
    workers themselves hold the pipe's read end. torch's worker does notice the dead parent
    (its watchdog, every 5 s) and leaves its loop, but then exits through multiprocessing's
    finalizers, which join that feeder thread (torch skips the join only when the main process
    asked the workers to stop): the worker lived on, an orphan holding its memory, blocked
    forever (a second worker waits on the queue's write lock behind it). Shared-memory batches
    send only a handle and never fill the pipe.
    """
    if any(t.name == PARENT_WATCH for t in threading.enumerate()):
        return
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent_pid:  # a dead parent's children are reparented
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name=PARENT_WATCH, daemon=True).start()

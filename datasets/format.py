"""The on-disk format: keys, the metadata record, codecs and the 2x2 box filter.

One LMDB environment holds every level of every image (layout ``"triangle"``):

====================  =====================================================================
key                   value
====================  =====================================================================
``r{R}/{i:08d}``      image ``i`` at ``R x R``: raw ``uint8`` HxWx3 bytes, JPEG or PNG
``__meta__``          JSON metadata; written last, only when every record is in place
``__prep__``          JSON progress of an unfinished preparation (absent once complete)
====================  =====================================================================

Existing LMDBs of the PyTorch StyleGAN ports (layout ``"stylegan-port"``: JPEG values under
``f"{size}-{index:05d}"`` and a ``length`` key) are read as they are; levels below the
smallest stored one are derived with the same box filter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import lmdb
import numpy as np
from PIL import Image

from ..resolutions import resolutions

FORMAT_NAME = "triangle-multires-lmdb"
FORMAT_VERSION = 1
META_KEY = b"__meta__"
PREP_KEY = b"__prep__"
PORT_LENGTH_KEY = b"length"
CODECS = ("raw", "jpeg", "png")
# Largest level a StyleGAN-port LMDB is probed for.
_PORT_MAX_PROBE = 8192


class DatasetError(Exception):
    """A path is not a usable dataset; the message is one line saying what to do."""


def image_key(resolution: int, index: int) -> bytes:
    """Key of image ``index`` at ``resolution`` in the triangle layout."""
    return f"r{resolution}/{index:08d}".encode()


def port_key(resolution: int, index: int) -> bytes:
    """Key of image ``index`` at ``resolution`` in the StyleGAN-port layout."""
    return f"{resolution}-{index:05d}".encode()


@dataclass(frozen=True)
class Metadata:
    """What a dataset holds. ``resolutions`` sorted ``[4, ..., max_resolution]``."""

    count: int
    resolutions: list[int]
    max_resolution: int
    codecs: dict[int, str]
    source: str
    format_version: int
    test_indices: tuple[int, ...] = ()
    layout: str = "triangle"
    # Levels computed at read time (StyleGAN-port LMDBs lack the small ones).
    derived: tuple[int, ...] = ()
    filter: str = "box"
    quality: int = 95
    bytes_per_level: dict[int, int] = field(default_factory=dict)
    # sha256 of every image's record at the smallest level, in index order (content_hash);
    # None in LMDBs written before it existed and in StyleGAN-port LMDBs.
    content_hash: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "format_version": self.format_version,
                "count": self.count,
                "resolutions": self.resolutions,
                "codecs": {str(r): c for r, c in self.codecs.items()},
                "source": self.source,
                "test_indices": list(self.test_indices),
                "filter": self.filter,
                "quality": self.quality,
                "bytes_per_level": {str(r): b for r, b in self.bytes_per_level.items()},
                "content_hash": self.content_hash,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> Metadata:
        try:
            d = json.loads(raw)
            version = d.get("format_version")
            if d.get("format") != FORMAT_NAME or version != FORMAT_VERSION:
                raise DatasetError(
                    f"{path}: unknown dataset format {d.get('format')!r} version {version!r} "
                    f"(this code reads version {FORMAT_VERSION}); prepare it again"
                )
            resolutions = sorted(int(r) for r in d["resolutions"])
            return cls(
                count=int(d["count"]),
                resolutions=resolutions,
                max_resolution=resolutions[-1],
                codecs={int(r): c for r, c in d["codecs"].items()},
                source=str(d["source"]),
                format_version=version,
                test_indices=tuple(sorted(int(i) for i in d["test_indices"])),
                filter=d.get("filter", "box"),
                quality=int(d.get("quality", 95)),
                bytes_per_level={int(r): int(b) for r, b in d.get("bytes_per_level", {}).items()},
                content_hash=d.get("content_hash"),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise DatasetError(f"{path}: damaged metadata record ({e}); prepare it again") from e


def content_hash(txn: lmdb.Transaction, count: int, resolution: int) -> str:
    """sha256 of the records ``r{resolution}/0 .. count-1`` in index order: what tells two
    copies of a dataset apart (``Metadata.content_hash``; the writer uses the smallest level,
    48 bytes an image at 4x4)."""
    digest = hashlib.sha256()
    for index in range(count):
        record = txn.get(image_key(resolution, index))
        digest.update(b"" if record is None else record)
    return digest.hexdigest()


def open_env(path: str | os.PathLike, *, write: bool = False, map_size: int = 0) -> lmdb.Environment:
    """Open an LMDB environment: a directory (``data.mdb`` inside) or a single file.

    Readers use ``readonly=True, lock=False, readahead=False`` (many processes, random
    access: readahead would pull neighbouring pages nobody asked for).
    """
    path = os.fspath(path)
    if write:
        return lmdb.open(path, map_size=map_size, subdir=not os.path.isfile(path),
                         readahead=False, meminit=False, max_dbs=0)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file or directory")
    subdir = os.path.isdir(path)
    if subdir and not os.path.exists(os.path.join(path, "data.mdb")):
        raise DatasetError(f"{path}: not an LMDB (no data.mdb inside); prepare it with tools/prepare_lmdb.py")
    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=subdir,
                         meminit=False, max_readers=512)
    except lmdb.Error as e:
        raise DatasetError(f"{path}: not an LMDB ({e}); prepare it with tools/prepare_lmdb.py") from e


# LMDB refuses a second handle on one environment in a process, yet a process may hold a
# train and a test dataset of one file, plus read_metadata or verify: readers share one
# handle per (process, path). Entries inherited through a fork carry the parent's pid and
# are closed in the child (py-lmdb still counts them as open there) and replaced, never
# used. This is the package's only module-level state.
_READERS: dict[str, list] = {}  # realpath -> [pid, env, users]


def acquire_reader(path: str | os.PathLike) -> lmdb.Environment:
    """This process's read-only handle on ``path`` (opened on first use); pair with release_reader."""
    key = os.path.realpath(os.fspath(path))
    entry = _READERS.get(key)
    if entry is not None and entry[0] != os.getpid():
        # Inherited through fork. Closing a readonly, lock-free handle only unmaps this
        # process's copy of the file; the parent's handle is untouched.
        entry[1].close()
        entry = None
    if entry is None:
        entry = _READERS[key] = [os.getpid(), open_env(path), 0]
    entry[2] += 1
    return entry[1]


def release_reader(path: str | os.PathLike) -> None:
    """Give back a handle from acquire_reader; the last user in this process closes it."""
    key = os.path.realpath(os.fspath(path))
    entry = _READERS.get(key)
    if entry is None or entry[0] != os.getpid():
        return
    entry[2] -= 1
    if entry[2] <= 0:
        del _READERS[key]
        entry[1].close()


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The metadata of a prepared dataset (either layout).

    Raises DatasetError for a missing path, a file that is not an LMDB, an interrupted
    preparation, or an unknown format version.
    """
    env = acquire_reader(path)
    try:
        with env.begin() as txn:
            return metadata_from_txn(txn, os.fspath(path))
    finally:
        release_reader(path)


def metadata_from_txn(txn: lmdb.Transaction, path: str) -> Metadata:
    raw = txn.get(META_KEY)
    if raw is not None:
        return Metadata.from_json(raw, path)
    if txn.get(PREP_KEY) is not None:
        raise DatasetError(
            f"{path}: preparation was interrupted (incomplete); run the same prepare command again to resume"
        )
    length = txn.get(PORT_LENGTH_KEY)
    if length is not None:
        return _port_metadata(txn, path, length)
    raise DatasetError(f"{path}: an LMDB without dataset metadata; prepare it with tools/prepare_lmdb.py")


def _port_metadata(txn: lmdb.Transaction, path: str, length: bytes) -> Metadata:
    try:
        count = int(length.decode())
    except ValueError as e:
        raise DatasetError(f"{path}: StyleGAN-port LMDB with a bad 'length' record {length[:20]!r}") from e
    stored = [r for r in resolutions(_PORT_MAX_PROBE) if txn.get(port_key(r, 0)) is not None]
    if count <= 0 or not stored:
        raise DatasetError(f"{path}: StyleGAN-port LMDB with no images (length {count})")
    top = stored[-1]
    levels = resolutions(top)
    missing = [r for r in levels if r not in stored and r > stored[0]]
    if missing:
        raise DatasetError(f"{path}: StyleGAN-port LMDB lacks levels {missing} between {stored[0]} and {top}")
    return Metadata(
        count=count,
        resolutions=levels,
        max_resolution=top,
        codecs={r: "jpeg" for r in levels},
        source=f"stylegan-port LMDB {os.path.basename(os.path.normpath(path))}",
        format_version=0,
        layout="stylegan-port",
        derived=tuple(r for r in levels if r < stored[0]),
        filter="unknown",
        quality=0,
    )


# -- pixels -------------------------------------------------------------------------------


def box_downsample(img: np.ndarray) -> np.ndarray:
    """2x2 box filter: ``uint8`` HxWx3 (H, W even) -> ``uint8`` H/2 x W/2 x 3.

    Each output pixel is the mean of its four inputs, rounded half up: ``(sum + 2) // 4``,
    the same average the networks use to fade between levels.
    """
    a = img.astype(np.uint16)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def encode(img: np.ndarray, codec: str, quality: int = 95) -> bytes:
    """``uint8`` HxWx3 -> bytes in ``codec`` (raw: the C-order array bytes)."""
    if codec == "raw":
        return np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    if codec == "jpeg":
        # 4:4:4 chroma up to 128 px (there a 2x2 chroma block is a visible share of an
        # object's edge); the usual 4:2:0 above, where nearly all the bytes are.
        subsampling = 0 if img.shape[0] <= 128 else 2
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    elif codec == "png":
        # compress_level 1: most of PNG's size win at a fraction of level 6's time.
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        raise DatasetError(f"unknown codec {codec!r}; one of {', '.join(CODECS)}")
    return buf.getvalue()


def decode_numpy(data: bytes, codec: str, resolution: int) -> np.ndarray:
    """bytes -> ``uint8`` R x R x 3 (HWC)."""
    if codec == "raw":
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != resolution * resolution * 3:
            raise DatasetError(f"raw record of {arr.size} bytes, expected {resolution}x{resolution}x3")
        return arr.reshape(resolution, resolution, 3)
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape != (resolution, resolution, 3):
        raise DatasetError(f"record decodes to {arr.shape}, expected {resolution}x{resolution}x3")
    return arr

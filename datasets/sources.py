"""Where images come from: folders (CelebA-HQ, CelebA, any folder), torchvision roots, demo.

A :class:`Source` lists its items deterministically (the list is part of the preparation's
fingerprint, so a resume continues the same list) and hands out a small picklable *task*
per item: ``(loader, payload)``. The writer's worker processes call ``loader(payload,
options)`` and get the top level as ``uint8`` R x R x 3, or :class:`SkipImage` with a
reason. File bytes are read in the parent so workers stay pure functions of their task.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .demo import render_demo_image
from .format import DatasetError

CELEBAHQ_COUNT = 30_000
CELEBAHQ_RESOLUTION = 1024
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


class SkipImage(Exception):
    """This item cannot become an image; the message says why (shown in the summary)."""


@dataclass(frozen=True)
class PrepOptions:
    """How an item becomes the top level (picklable; sent with every task)."""

    resolution: int
    fit: str = "crop"  # "crop": centre square crop; "pad": pad to square with black
    small: str = "upscale"  # images smaller than `resolution`: "upscale" or "skip"
    crop: int = 0  # >0: centre crop of this side first (CelebA 178x218 -> 140x140)


Loader = Callable[[Any, PrepOptions], np.ndarray]


@dataclass(frozen=True)
class Source:
    """A deterministic list of items and how to fetch each one's task."""

    description: str  # recorded as the dataset's `source`
    names: Sequence[str]  # one per item; shown for skipped items
    task: Callable[[int], tuple[Loader, Any]]  # item position -> (loader, payload)
    fingerprint: str  # changes when the items change (a resume must not mix inputs)
    test_items: tuple[int, ...] = ()  # item positions forming an official test split
    warnings: tuple[str, ...] = ()


# -- turning anything into an RGB square ---------------------------------------------------


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB': 16-bit scaled (not clipped), alpha over white, CMYK converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        # 16-bit data opens as I;16 or I (0..65535); Image.convert would clip it at 255.
        top = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def square_top_level(im: Image.Image, options: PrepOptions) -> np.ndarray:
    """An RGB image -> ``uint8`` R x R x 3 at ``options.resolution`` (crop/pad, resize)."""
    r = options.resolution
    w, h = im.size
    if options.crop:
        c = min(options.crop, w, h)
        im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        w, h = im.size
    if options.fit == "pad" and w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    elif w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    side = im.size[0]
    if side < r and options.small == "skip":
        raise SkipImage(f"too small ({w}x{h} < {r}x{r})")
    if side != r:
        im = im.resize((r, r), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def load_image_bytes(data: bytes, options: PrepOptions) -> np.ndarray:
    """Encoded file bytes -> top level. Raises SkipImage for empty/broken/non-image data."""
    if not data:
        raise SkipImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns on odd EXIF/ICC data; the image itself is fine.
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            if im.format == "JPEG" and min(im.size) >= 2 * options.resolution and not options.crop:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: still >= the target, much faster.
                im.draft("RGB", (options.resolution, options.resolution))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
    except SkipImage:
        raise
    except Image.DecompressionBombError as e:
        raise SkipImage(f"too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable ({e})"
        raise SkipImage(reason) from e
    return square_top_level(im, options)


def load_file(path: str, options: PrepOptions) -> np.ndarray:
    """A file path -> top level (used where reading in the parent is not wanted)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SkipImage(f"cannot read ({e.strerror})") from e
    return load_image_bytes(data, options)


def load_array(arr: np.ndarray, options: PrepOptions) -> np.ndarray:
    """An HxW or HxWxC ``uint8`` array (torchvision data) -> top level."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return square_top_level(Image.fromarray(np.ascontiguousarray(a[..., :3], dtype=np.uint8)), options)


def load_pil(im: Image.Image, options: PrepOptions) -> np.ndarray:
    return square_top_level(to_rgb(im), options)


def load_demo(payload: tuple[int, int], options: PrepOptions) -> np.ndarray:
    index, seed = payload
    return render_demo_image(index, options.resolution, seed)


# -- sources --------------------------------------------------------------------------------


def _natural_key(path: str) -> list:
    """'img10.jpg' after 'img9.jpg': CelebA-HQ's 0.jpg..29999.jpg keep their numbers as indices."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


def list_files(root: str | os.PathLike) -> list[str]:
    """Every non-hidden file below ``root`` (recursive), naturally sorted, relative paths."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DatasetError(f"{root}: no such directory")
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.startswith(".")]
    if not found:
        raise DatasetError(f"{root}: empty folder (no files found below it)")
    return sorted(found, key=_natural_key)


def _file_fingerprint(root: str, files: Sequence[str]) -> str:
    h = hashlib.sha256(os.path.abspath(root).encode())
    for f in files:
        h.update(f.encode() + b"\0" + str(os.path.getsize(os.path.join(root, f))).encode() + b"\n")
    return h.hexdigest()


def folder_source(root: str | os.PathLike, *, limit: int = 0, description: str = "") -> Source:
    """Any image folder, recursive. Non-image files are listed too and skipped with a reason."""
    root = os.fspath(root)
    files = list_files(root)
    if limit:
        images = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        files = images[:limit]

    def task(i: int, _root=root, _files=files):
        return load_image_bytes, _read_bytes(os.path.join(_root, _files[i]))

    return Source(description or f"folder {os.path.abspath(root)}", files, task,
                  _file_fingerprint(root, files))


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""  # unreadable: the loader reports it as an empty file rather than crashing


def celebahq_source(root: str | os.PathLike) -> Source:
    """CelebA-HQ as a folder of 30,000 1024x1024 images (e.g. CelebAMask-HQ/CelebA-HQ-img).

    A different count or size is a warning, not an error: subsets are normal.
    """
    src = folder_source(root, description=f"CelebA-HQ folder {os.path.abspath(os.fspath(root))}")
    notes = []
    images = [f for f in src.names if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if len(images) != CELEBAHQ_COUNT:
        notes.append(f"found {len(images)} images, CelebA-HQ has {CELEBAHQ_COUNT}: writing what is there")
    if images:
        try:
            with Image.open(os.path.join(os.fspath(root), images[0])) as im:
                size = im.size
        except OSError:
            size = None
        if size is None:
            notes.append(f"first image {images[0]} is unreadable")
        elif size != (CELEBAHQ_RESOLUTION, CELEBAHQ_RESOLUTION):
            notes.append(f"first image {images[0]} is {size[0]}x{size[1]}, "
                         f"CelebA-HQ images are {CELEBAHQ_RESOLUTION}x{CELEBAHQ_RESOLUTION}")
    return Source(src.description, src.names, src.task, src.fingerprint, warnings=tuple(notes))


def demo_source(count: int, seed: int = 0) -> Source:
    """The procedural demo set: ``count`` images, deterministic in (index, seed)."""
    if count <= 0:
        raise DatasetError(f"--count must be positive, got {count}")
    names = [f"demo-{i}" for i in range(count)]
    return Source(f"demo (procedural, seed {seed})", names,
                  lambda i, _s=seed: (load_demo, (i, _s)), f"demo:{count}:{seed}")


TORCHVISION_SETS = ("cifar10", "fashion-mnist", "lsun")


def torchvision_source(name: str, root: str | os.PathLike, *, lsun_classes: Sequence[str] = ("bedroom_train",)) -> Source:
    """A torchvision dataset from an existing local root (never downloads).

    cifar10 and fashion-mnist write train then test; the official test set becomes the
    held-out split. LSUN reads torchvision's LSUN layout (``{class}_lmdb`` folders).
    """
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetError(f"{name} needs torchvision: pip install torchvision") from e
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such directory")
    try:
        if name == "cifar10":
            parts = [tvd.CIFAR10(root, train=t, download=False) for t in (True, False)]
            arrays = [p.data for p in parts]  # N x 32 x 32 x 3 uint8
        elif name == "fashion-mnist":
            parts = [tvd.FashionMNIST(root, train=t, download=False) for t in (True, False)]
            arrays = [p.data.numpy() for p in parts]  # N x 28 x 28 uint8
        elif name == "lsun":
            lsun = tvd.LSUN(root, classes=list(lsun_classes))
            names = [f"lsun-{i}" for i in range(len(lsun))]
            return Source(f"torchvision LSUN {list(lsun_classes)} at {os.path.abspath(root)}", names,
                          lambda i, _d=lsun: (load_pil, _d[i][0]), f"lsun:{root}:{lsun_classes}:{len(lsun)}")
        else:
            raise DatasetError(f"unknown torchvision set {name!r}; one of {', '.join(TORCHVISION_SETS)}")
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"{root}: no {name} data found ({str(e).splitlines()[0]})") from e
    data = np.concatenate(arrays)
    n_train = len(arrays[0])
    names = [f"{name}-{'train' if i < n_train else 'test'}-{i if i < n_train else i - n_train}"
             for i in range(len(data))]
    return Source(f"torchvision {name} at {os.path.abspath(root)}", names,
                  lambda i, _d=data: (load_array, _d[i]), f"{name}:{root}:{len(data)}",
                  test_items=tuple(range(n_train, len(data))))

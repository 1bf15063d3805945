"""Write a multi-resolution LMDB from a :class:`~triangle.datasets.sources.Source`.

Worker processes turn each item into the top level, cascade it down with the 2x2 box
filter (Lanczos from the top as an option) and encode every level; the parent puts the
records into LMDB in batches. Each batch commits together with a progress record
(``__prep__``), so a killed preparation resumes after its last commit, and the metadata
record that makes the LMDB readable is written only after the last image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lmdb
import numpy as np
from PIL import Image

from ..resolutions import is_resolution, resolutions
from .format import (
    CODECS,
    FORMAT_VERSION,
    META_KEY,
    PREP_KEY,
    DatasetError,
    Metadata,
    box_downsample,
    content_hash,
    encode,
    image_key,
)
from .sources import PrepOptions, SkipImage, Source, demo_source

FILTERS = ("box", "lanczos")
# Compressed bytes per raw byte, generous for photos, used only for the first map size.
_RATIO = {"raw": 1.0, "jpeg": 0.25, "png": 0.75}
_GROW_LIMIT = 1 << 44  # 16 TiB: a map this size that is still full means something else is wrong


@dataclass(frozen=True)
class LevelPlan:
    """Which levels to build and how each is stored (picklable; sent to workers)."""

    resolutions: tuple[int, ...]
    codecs: tuple[str, ...]  # one per resolution
    filter: str = "box"
    quality: int = 95


def plan_levels(max_resolution: int, *, codec: str = "jpeg", raw_max: int = 64,
                filter: str = "box", quality: int = 95) -> LevelPlan:
    """Levels 4..max: raw ``uint8`` up to ``raw_max`` (no decode; JPEG is no smaller there),
    ``codec`` above."""
    if codec not in CODECS:
        raise DatasetError(f"unknown codec {codec!r}; one of {', '.join(CODECS)}")
    if filter not in FILTERS:
        raise DatasetError(f"unknown filter {filter!r}; one of {', '.join(FILTERS)}")
    if not 1 <= quality <= 100:
        raise DatasetError(f"JPEG quality must be 1..100, got {quality}")
    if not is_resolution(int(max_resolution)):
        raise DatasetError(f"resolution {max_resolution} is not a power of two >= 4")
    res = resolutions(int(max_resolution))
    return LevelPlan(tuple(res), tuple("raw" if r <= raw_max else codec for r in res), filter, quality)


def build_levels(top: np.ndarray, plan: LevelPlan) -> dict[int, np.ndarray]:
    """Top level ``uint8`` R x R x 3 -> {resolution: ``uint8`` r x r x 3} for every planned level."""
    levels = {plan.resolutions[-1]: top}
    if plan.filter == "box":
        a = top
        for r in reversed(plan.resolutions[:-1]):
            a = box_downsample(a)
            levels[r] = a
    else:
        im = Image.fromarray(top)
        for r in plan.resolutions[:-1]:
            levels[r] = np.asarray(im.resize((r, r), Image.LANCZOS))
    return levels


def _process_chunk(tasks: list, options: PrepOptions, plan: LevelPlan) -> list:
    """Worker: [(loader, payload)] -> [("ok", {res: bytes}) | ("skip", reason)]."""
    out = []
    for loader, payload in tasks:
        try:
            top = loader(payload, options)
        except SkipImage as e:
            out.append(("skip", str(e)))
            continue
        except Exception as e:  # noqa: BLE001  (a strange file must never stop a 30,000-image run)
            out.append(("skip", f"unreadable ({type(e).__name__}: {e})"))
            continue
        levels = build_levels(top, plan)
        out.append(("ok", {r: encode(levels[r], c, plan.quality)
                           for r, c in zip(plan.resolutions, plan.codecs, strict=True)}))
    return out


def _results(source: Source, start: int, options: PrepOptions, plan: LevelPlan,
             workers: int) -> Iterator[tuple[int, tuple]]:
    """(item position, result) in order, from ``start``. A bounded window of chunks is in
    flight, so file bytes are never all read into memory at once."""
    n = len(source.names)
    r = plan.resolutions[-1]
    chunk = 1 if r >= 256 else 4 if r >= 64 else 32
    if workers <= 1:
        for i in range(start, n, chunk):
            stop = min(i + chunk, n)
            tasks = [source.task(j) for j in range(i, stop)]
            yield from zip(range(i, stop), _process_chunk(tasks, options, plan), strict=True)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque = deque()
        nxt = start
        while pending or nxt < n:
            while nxt < n and len(pending) < 4 * workers:
                stop = min(nxt + chunk, n)
                tasks = [source.task(j) for j in range(nxt, stop)]
                pending.append((nxt, pool.apply_async(_process_chunk, (tasks, options, plan))))
                nxt = stop
            first, res = pending.popleft()
            results = res.get()
            yield from zip(range(first, first + len(results)), results, strict=True)


@dataclass
class WriteReport:
    """What a preparation did. ``bytes_per_level``: stored value bytes per resolution."""

    path: str
    metadata: Metadata
    items: int  # items in the source
    resumed_from: int  # item position the run started at (0: a fresh run)
    written: int  # images in the dataset
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    seconds: float = 0.0
    processed_now: int = 0  # items handled by this run (not by an interrupted earlier one)
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.processed_now / self.seconds if self.seconds > 0 else 0.0


def estimate_map_size(count: int, plan: LevelPlan) -> int:
    """Bytes for ``count`` images: per level raw size x codec ratio, plus LMDB page rounding."""
    per = sum(r * r * 3 * _RATIO[c] + 4096 for r, c in zip(plan.resolutions, plan.codecs, strict=True))
    return int(count * per * 1.25) + (64 << 20)


def _fingerprint(source: Source, plan: LevelPlan, options: PrepOptions, holdout: int, holdout_seed: int) -> str:
    d = {"source": source.fingerprint, "plan": [plan.resolutions, plan.codecs, plan.filter, plan.quality],
         "options": [options.resolution, options.fit, options.small, options.crop],
         "holdout": [holdout, holdout_seed], "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(d).encode()).hexdigest()


def _open_for_writing(path: str, map_size: int, overwrite: bool, fingerprint: str) -> tuple[lmdb.Environment, dict | None]:
    """Open (creating) the environment; return the progress record to resume from, if any."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, "data.mdb")):
        raise DatasetError(f"{path}: exists and is not an LMDB; choose another --out")
    existing = os.path.getsize(os.path.join(path, "data.mdb")) if os.path.isdir(path) and os.listdir(path) else 0
    os.makedirs(path, exist_ok=True)
    try:
        env = lmdb.open(path, map_size=max(map_size, int(existing * 1.5)), readahead=False, meminit=False)
    except lmdb.Error as e:
        raise DatasetError(f"{path}: cannot open as an LMDB for writing ({e})") from e
    with env.begin() as txn:
        complete = txn.get(META_KEY) is not None
        prep = txn.get(PREP_KEY)
        nonempty = txn.stat()["entries"] > 0
    if prep is not None:
        prep = json.loads(prep)
        if prep.get("fingerprint") == fingerprint and not overwrite:
            return env, prep
    elif nonempty and not overwrite:
        env.close()
        what = "a complete dataset" if complete else "a non-empty LMDB"
        raise DatasetError(f"{path}: already {what}; pass --overwrite to replace it")
    # A different preparation was interrupted here, or --overwrite: start from nothing.
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(), delete=False)
    return env, None


def _commit(env: lmdb.Environment, records: list[tuple[bytes, bytes]], deletes: tuple[bytes, ...] = ()) -> None:
    """Put ``records`` in one transaction, doubling the map size on MapFullError."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k in deletes:
                    txn.delete(k)
                for k, v in records:
                    txn.put(k, v)
            return
        except lmdb.MapFullError:
            size = env.info()["map_size"] * 2
            if size > _GROW_LIMIT:
                raise
            env.set_mapsize(size)


def choose_holdout(count: int, holdout: int, seed: int = 0) -> tuple[int, ...]:
    """``holdout`` distinct indices of ``range(count)``, sorted; deterministic in (count, holdout, seed)."""
    if holdout <= 0:
        return ()
    if holdout >= count:
        raise DatasetError(f"--holdout {holdout} leaves nothing to train on ({count} images)")
    rng = np.random.default_rng((int(seed), int(count), int(holdout)))
    return tuple(int(i) for i in np.sort(rng.choice(count, size=holdout, replace=False)))


def write_lmdb(
    path: str | os.PathLike,
    source: Source,
    *,
    max_resolution: int,
    codec: str = "jpeg",  # levels above raw_max: "jpeg" (q=quality) or "png" (lossless)
    raw_max: int = 64,  # levels up to this are raw uint8
    filter: str = "box",  # "box": 2x2 cascade from the top; "lanczos": each level from the top
    quality: int = 95,
    fit: str = "crop",  # non-square input: "crop" (centre) or "pad"
    small: str = "upscale",  # input smaller than max_resolution: "upscale" or "skip"
    crop: int = 0,  # >0: centre-crop this side before anything else (CelebA 64: 140)
    holdout: int = 0,  # this many indices become the test split (deterministic in holdout_seed)
    holdout_seed: int = 0,
    workers: int | None = None,  # processes; None: all cores, or 1 for small jobs
    batch_size: int = 0,  # images per LMDB commit; 0: by resolution
    map_size: int = 0,  # initial map size in bytes; 0: estimated (grown when full either way)
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,  # (items just handled, handled so far, total)
) -> WriteReport:
    """Prepare (or resume preparing) ``path`` from ``source``; return what was done."""
    path = os.fspath(path)
    plan = plan_levels(max_resolution, codec=codec, raw_max=raw_max, filter=filter, quality=quality)
    if fit not in ("crop", "pad"):
        raise DatasetError(f"unknown fit {fit!r}; crop or pad")
    if small not in ("upscale", "skip"):
        raise DatasetError(f"unknown policy for small images {small!r}; upscale or skip")
    n = len(source.names)
    if holdout >= n:
        raise DatasetError(f"--holdout {holdout} leaves nothing to train on ({n} items)")
    options = PrepOptions(resolution=plan.resolutions[-1], fit=fit, small=small, crop=crop)
    if workers is None:
        small_job = n * plan.resolutions[-1] ** 2 < 4096 * 64 * 64
        workers = 1 if small_job else (os.cpu_count() or 1)
    if not batch_size:
        batch_size = max(8, min(1024, (1 << 25) // (plan.resolutions[-1] ** 2 * 3)))
    fingerprint = _fingerprint(source, plan, options, holdout, holdout_seed)
    env, prep = _open_for_writing(path, map_size or estimate_map_size(n, plan), overwrite, fingerprint)
    state = prep or {"fingerprint": fingerprint, "next_item": 0, "written": 0, "skipped": [],
                     "test_written": [], "bytes": {str(r): 0 for r in plan.resolutions}}
    start = state["next_item"]
    test_items = set(source.test_items)
    t0 = time.perf_counter()
    if progress:
        progress(0, start, n)
    try:
        records: list[tuple[bytes, bytes]] = []
        in_batch = 0
        for pos, (status, value) in _results(source, start, options, plan, workers):
            if status == "ok":
                index = state["written"]
                for r, data in value.items():
                    records.append((image_key(r, index), data))
                    state["bytes"][str(r)] += len(data)
                if pos in test_items:
                    state["test_written"].append(index)
                state["written"] += 1
            else:
                state["skipped"].append([source.names[pos], value])
            state["next_item"] = pos + 1
            in_batch += 1
            if in_batch >= batch_size or pos + 1 == n:
                _commit(env, records + [(PREP_KEY, json.dumps(state).encode())])
                if progress:
                    progress(in_batch, pos + 1, n)
                records, in_batch = [], 0
        count = state["written"]
        if count == 0:
            raise DatasetError(f"{path}: no usable images among {n} items (all skipped; first: "
                               f"{state['skipped'][0][0]}: {state['skipped'][0][1]})")
        tests = choose_holdout(count, holdout, holdout_seed) if holdout else tuple(sorted(state["test_written"]))
        meta = Metadata(
            count=count, resolutions=list(plan.resolutions), max_resolution=plan.resolutions[-1],
            codecs=dict(zip(plan.resolutions, plan.codecs, strict=True)), source=source.description,
            format_version=FORMAT_VERSION, test_indices=tests, filter=plan.filter, quality=plan.quality,
            bytes_per_level={int(r): b for r, b in state["bytes"].items()},
        )
        with env.begin() as txn:
            meta = dataclasses.replace(meta, content_hash=content_hash(txn, count, plan.resolutions[0]))
        # The metadata appears in the same transaction that removes the progress record:
        # readers see either an unfinished preparation or a complete dataset, never between.
        _commit(env, [(META_KEY, meta.to_json())], deletes=(PREP_KEY,))
        env.sync(True)
    finally:
        env.close()
    return WriteReport(path=path, metadata=meta, items=n, resumed_from=start, written=count,
                       skipped=[tuple(s) for s in state["skipped"]], seconds=time.perf_counter() - t0,
                       processed_now=n - start, warnings=list(source.warnings))


def write_demo_lmdb(path: str | os.PathLike, count: int = 2000, max_resolution: int = 64, seed: int = 0,
                    holdout: int = 0, **kwargs) -> Metadata:
    """Render the built-in procedural dataset straight into an LMDB; return its metadata.

    Same code path as ``tools/prepare_lmdb.py demo``. ``kwargs`` go to :func:`write_lmdb`
    (e.g. ``overwrite=True``, ``codec="png"``).
    """
    return write_lmdb(path, demo_source(count, seed), max_resolution=max_resolution,
                      holdout=holdout, **kwargs).metadata

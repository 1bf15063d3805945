"""The reader under real DataLoader workers (fork and spawn), whole batches, and the scheduled sampler."""

from __future__ import annotations

import io
import pickle

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from triangle.datasets import (
    DatasetError,
    MultiResolutionDataset,
    ScheduledBatchSampler,
    reader,
    write_demo_lmdb,
)
from triangle.datasets.reader import ImageBatch, collate_images


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "demo.lmdb"
    write_demo_lmdb(path, count=40, max_resolution=32, holdout=8, raw_max=16)
    return path


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_lazy_open_per_process_with_two_workers(demo32, context):
    ds = MultiResolutionDataset(demo32)
    assert ds._handle is None  # nothing opened until the first read
    first = ds[(0, 32, False)]  # the parent opens its own handle ...
    assert ds._handle is not None
    state = pickle.loads(pickle.dumps(ds))
    assert state._handle is None  # ... which never travels
    sampler = ScheduledBatchSampler(len(ds), lambda n: (32, 8), seed=1, flip=False)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context=context,
                        persistent_workers=True)
    seen = {}
    it = iter(loader)
    for _ in range(8):  # 64 items: every one of the 32 train items at least once
        batch = next(it)
        assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.uint8
    # Compare against a read in this process, after the workers (forked with an open handle) ran.
    for k in range(32):
        seen[k] = ds[(k, 32, False)]
    assert torch.equal(seen[0], first)
    pids = {w.pid for w in it._workers}
    assert len(pids) == 2
    del it
    ds.close()


def test_resolution_change_keeps_the_same_workers(demo32):
    ds = MultiResolutionDataset(demo32)

    def plan(images):  # 8x8 for the first 32 images, then 16x16, then 32x32 with a bigger batch
        return (8, 4) if images < 32 else (16, 4) if images < 64 else (32, 8)

    loader = DataLoader(ds, batch_sampler=ScheduledBatchSampler(len(ds), plan, seed=0), num_workers=2,
                        persistent_workers=True, prefetch_factor=4, collate_fn=collate_images)
    it = iter(loader)
    workers = [w.pid for w in it._workers]
    shapes = [tuple(next(it).shape) for _ in range(20)]
    assert shapes[:8] == [(4, 3, 8, 8)] * 8
    assert shapes[8:16] == [(4, 3, 16, 16)] * 8
    assert shapes[16:] == [(8, 3, 32, 32)] * 4
    assert [w.pid for w in it._workers] == workers and all(w.is_alive() for w in it._workers)
    del it


def _take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_sampler_shards_are_disjoint_and_cover():
    n, world = 103, 4
    plan = lambda images: (16, 8)  # noqa: E731
    shard_len = n // world
    per_rank = []
    for r in range(world):
        batches = _take(ScheduledBatchSampler(n, plan, rank=r, world_size=world, seed=5), shard_len // 2 + 1)
        flat = [t for b in batches for t in b]
        assert all(len(b) == 2 and res == 16 for b in batches for _, res, _ in b)
        per_rank.append([i for i, _, _ in flat[:shard_len]])  # one epoch
    sets = [set(p) for p in per_rank]
    assert all(len(s) == shard_len for s in sets)  # no repeats within an epoch
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert len(set().union(*sets)) == world * shard_len  # the n % world leftovers rotate per epoch
    # Across epochs every item is served.
    s = ScheduledBatchSampler(n, plan, rank=0, world_size=1, seed=5)
    assert {i for b in _take(s, 13) for i, _, _ in b} == set(range(n))


def test_sampler_follows_plan_and_resumes_exactly():
    plan = lambda images: (8, 4) if images < 40 else (16, 8)  # noqa: E731
    full = [t for b in _take(ScheduledBatchSampler(50, plan, rank=1, world_size=2, seed=3), 30) for t in b]
    # 40 images at batch 4 = 10 steps, then batch 8: resume after 12 steps = 40 + 16 = 56 images.
    resumed = [t for b in _take(ScheduledBatchSampler(50, plan, rank=1, world_size=2, seed=3, start_images=56), 18)
               for t in b]
    assert resumed == full[len(full) - len(resumed):]
    assert {res for _, res, _ in full[:20]} == {8} and {res for _, res, _ in full[20:]} == {16}
    flips = [f for _, _, f in full]
    assert 0.3 < sum(flips) / len(flips) < 0.7
    no_flip = _take(ScheduledBatchSampler(50, plan, seed=3, flip=False), 5)
    assert not any(f for b in no_flip for _, _, f in b)


# -- whole batches: __getitems__ ---------------------------------------------------------------


def _reference(ds, keys):
    return torch.stack([ds[k] for k in keys])


@pytest.mark.parametrize("resolution", [4, 16, 32])  # raw, raw, JPEG
@pytest.mark.parametrize("flips", ["none", "all", "some"])
def test_getitems_equals_item_by_item(demo32, resolution, flips):
    ds = MultiResolutionDataset(demo32)
    pick = {"none": lambda j: False, "all": lambda j: True, "some": lambda j: j % 3 == 1}[flips]
    keys = [((7 * j) % len(ds), resolution, pick(j)) for j in range(11)]
    batch = ds.__getitems__(keys)
    assert isinstance(batch, ImageBatch) and len(batch) == 11
    want = _reference(ds, keys)
    assert torch.equal(batch.tensor, want)
    assert batch.tensor.dtype == torch.uint8 and batch.tensor.is_contiguous()
    assert torch.equal(batch[3], want[3]) and type(batch[3]) is torch.Tensor
    assert collate_images(batch) is batch.tensor  # the reader's collate: no copy
    # A list of its images (e.g. rearranged by hand) is stacked.
    assert torch.equal(collate_images([batch[1], batch[0]]), want[[1, 0]])
    # DataLoader's default collate is left as it was (importing the reader registers nothing):
    # it stacks the images, a copy.
    stacked = default_collate(batch)
    assert torch.equal(stacked, want) and stacked.data_ptr() != batch.tensor.data_ptr()
    ds.close()


def test_getitems_plain_indices_mixed_resolutions_and_errors(demo32):
    ds = MultiResolutionDataset(demo32, resolution=16)
    assert torch.equal(ds.__getitems__([2, 5]).tensor, _reference(ds, [(2, 16, False), (5, 16, False)]))
    mixed = ds.__getitems__([(1, 8, False), (1, 16, True)])  # not one batch tensor: the images
    assert [tuple(t.shape) for t in mixed] == [(3, 8, 8), (3, 16, 16)]
    assert ds.__getitems__([]) == []
    with pytest.raises(IndexError):
        ds.__getitems__([(0, 16, False), (len(ds), 16, False)])
    with pytest.raises(DatasetError, match="no 64x64 level"):
        ds.__getitems__([(0, 64, False)])
    ds.close()


def test_getitems_missing_record_says_verify(tmp_path):
    path = tmp_path / "d.lmdb"
    write_demo_lmdb(path, count=6, max_resolution=32, raw_max=16)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.delete(b"r16/00000004")
        txn.delete(b"r32/00000004")
    env.close()
    ds = MultiResolutionDataset(path, split="all")
    for r in (16, 32):
        with pytest.raises(DatasetError, match=f"r{r}/00000004 is missing"):
            ds.__getitems__([(3, r, False), (4, r, False)])
    ds.close()


def test_getitems_stylegan_port_layout_with_derived_levels(tmp_path):
    path = tmp_path / "port.lmdb"
    env = lmdb.open(str(path), map_size=1 << 26, readahead=False)
    with env.begin(write=True) as txn:  # JPEG per level, as the ports' prepare_data.py writes it
        for i in range(4):
            img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for size in (8, 16, 32):
                buf = io.BytesIO()
                img.resize((size, size), Image.LANCZOS).save(buf, format="jpeg", quality=95)
                txn.put(f"{size}-{i:05d}".encode(), buf.getvalue())
        txn.put(b"length", b"4")
    env.close()
    ds = MultiResolutionDataset(path, split="all")
    for r in (4, 8, 32):  # 4x4 is derived from 8x8
        keys = [(i, r, i % 2 == 0) for i in (3, 0, 2, 1)]
        assert torch.equal(default_collate(ds.__getitems__(keys)), _reference(ds, keys))
    ds.close()


@pytest.mark.parametrize("pipe_max_bytes", [0, 1 << 20])  # shared memory, or bytes through the pipe
def test_batches_from_workers_are_plain_tensors(demo32, monkeypatch, pipe_max_bytes):
    monkeypatch.setattr(reader, "PIPE_MAX_BYTES", pipe_max_bytes)  # inherited by the forked workers
    ds = MultiResolutionDataset(demo32)
    sampler = ScheduledBatchSampler(len(ds), lambda n: (16, 6) if n < 36 else (32, 6), seed=2)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=True, collate_fn=collate_images)
    it, keys = iter(loader), iter(sampler)
    for _ in range(10):
        batch, want = next(it), next(keys)
        assert type(batch) is torch.Tensor and batch.shape == (6, 3, want[0][1], want[0][1])
        assert torch.equal(batch, _reference(ds, want))
        assert batch.is_shared() == (pipe_max_bytes == 0)  # the way it came
        batch.add_(1)  # writable, owned by the main process
    del it
    ds.close()

"""The reader under real DataLoader workers (fork and spawn) and the scheduled sampler."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from triangle.datasets import MultiResolutionDataset, ScheduledBatchSampler, write_demo_lmdb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")


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
                        persistent_workers=True, prefetch_factor=4)
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
    s = ScheduledBatchSampler(50, plan, rank=1, world_size=2, seed=3)
    assert s.position(7) == full[7][::2]

"""Checkpoint files: atomic writes (a real process killed mid-write), pruning, RNG states, and
the format (``Checkpoint``): a round trip, and files of the older layout with a ``sampler`` block."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from triangle.networks import Stage
from triangle.progressive.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng,
)


def checkpoint(images: int, weights: torch.Tensor | None = None, rng: list | None = None) -> Checkpoint:
    """A checkpoint of ``images`` whose one "network" is a 1 MiB tensor (by default)."""
    weights = torch.full((256, 1024), float(images)) if weights is None else weights
    return Checkpoint(config={"seed": 0}, images_seen=images, step=images // 16,
                      stage=Stage(8, True), fade_alpha=0.25, world_size=1,
                      models={"generator": {"weight": weights}}, optimizers={}, rng=rng or [])


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    checkpoint(100).save(checkpoint_path(tmp_path, 100))
    before = checkpoint_path(tmp_path, 100).read_bytes()
    script = (
        "import sys, torch\n"
        "from triangle.networks import Stage\n"
        "from triangle.progressive.checkpoint import Checkpoint, checkpoint_path\n"
        "c = Checkpoint(config={}, images_seen=200, step=0, stage=Stage(4, False), fade_alpha=1.0,\n"
        "               world_size=1, models={'generator': {'weight': torch.zeros(256, 1024)}},\n"
        "               optimizers={}, rng=[])\n"
        "c.save(checkpoint_path(sys.argv[1], 200), debug_write_delay_s=60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".checkpoint-*.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.1)  # the first half is on disk, the process sleeps before the rest
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 100)]
    assert checkpoint_path(tmp_path, 100).read_bytes() == before
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    stale = remove_stale_temporaries(tmp_path)
    assert len(stale) == 1 and not list(tmp_path.glob(".checkpoint-*"))
    # What the killed process left was a truncated file: unreadable, as a one-line error.
    bad = tmp_path / "checkpoint-000000000300.pt"
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="is not a checkpoint written by progressive/train.py"):
        Checkpoint.load(bad)


def test_the_last_k_are_kept(tmp_path):
    for images in (5, 10, 1000, 20):
        checkpoint(images).save(checkpoint_path(tmp_path, images))
    (tmp_path / "checkpoint-notanumber.pt").write_text("x")  # not ours: ignored
    assert [Checkpoint.load(p).images_seen for p in list_checkpoints(tmp_path)] == [5, 10, 20, 1000]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-000000000020.pt", "checkpoint-000000001000.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    latents = torch.Generator().manual_seed(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3, generator=latents)
    state = capture_rng(latents)
    checkpoint(0, rng=[state]).save(tmp_path / "c.pt")

    def draws():
        return (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
                torch.randn(4, generator=latents))

    expected = draws()
    draws()
    restore_rng(Checkpoint.load(tmp_path / "c.pt").rng[0], latents)
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_a_checkpoint_round_trips_through_its_file(tmp_path):
    saved = checkpoint(48, weights=torch.randn(3, 5))
    saved.lr_scale, saved.rollbacks, saved.elapsed_s, saved.reason = 0.5, 1, 12.5, "stage end"
    saved.save(tmp_path / "c.pt")
    loaded = Checkpoint.load(tmp_path / "c.pt")
    assert torch.equal(loaded.models["generator"]["weight"], saved.models["generator"]["weight"])
    loaded.models = saved.models = {}
    assert loaded == saved and loaded.stage == Stage(8, True)
    on_disk = torch.load(tmp_path / "c.pt", weights_only=True)
    assert on_disk["format_version"] == FORMAT_VERSION and on_disk["stage"] == {"resolution": 8, "fading": True}


def test_older_files_with_a_sampler_block_still_load_and_broken_ones_are_one_line_errors(tmp_path):
    old = checkpoint(96).to_dict() | {
        "sampler": {"images_seen": 96, "world_size": 1, "rank_position": 96, "seed": 0}}
    torch.save(old, tmp_path / "old.pt")
    loaded = Checkpoint.load(tmp_path / "old.pt")
    assert (loaded.images_seen, loaded.stage, loaded.fade_alpha) == (96, Stage(8, True), 0.25)
    del old["stage"]
    torch.save(old, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="unusable checkpoint .KeyError: 'stage'"):
        Checkpoint.load(tmp_path / "broken.pt")
    torch.save({"format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of format version"):
        Checkpoint.load(tmp_path / "newer.pt")

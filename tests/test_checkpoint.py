"""Checkpoint files: atomic writes (a real process killed mid-write), pruning, RNG states."""

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

from triangle.progressive.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    write_checkpoint,
)


def payload(images: int) -> dict:
    return {"format_version": FORMAT_VERSION, "images_seen": images,
            "weights": torch.full((256, 1024), float(images))}


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    write_checkpoint(payload(100), checkpoint_path(tmp_path, 100))
    before = checkpoint_path(tmp_path, 100).read_bytes()
    script = (
        "import sys, torch\n"
        "from triangle.progressive.checkpoint import write_checkpoint, checkpoint_path, FORMAT_VERSION\n"
        "p = {'format_version': FORMAT_VERSION, 'images_seen': 200, 'weights': torch.zeros(256, 1024)}\n"
        "write_checkpoint(p, checkpoint_path(sys.argv[1], 200), debug_write_delay_s=60)\n"
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
        read_checkpoint(bad)


def test_the_last_k_are_kept(tmp_path):
    for images in (5, 10, 1000, 20):
        write_checkpoint(payload(images), checkpoint_path(tmp_path, images))
    (tmp_path / "checkpoint-notanumber.pt").write_text("x")  # not ours: ignored
    assert [read_checkpoint(p)["images_seen"] for p in list_checkpoints(tmp_path)] == [5, 10, 20, 1000]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-000000000020.pt", "checkpoint-000000001000.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    latents = torch.Generator().manual_seed(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3, generator=latents)
    state = capture_rng(latents)
    write_checkpoint({"format_version": FORMAT_VERSION, "rng": [state]}, tmp_path / "c.pt")

    def draws():
        return (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
                torch.randn(4, generator=latents))

    expected = draws()
    draws()
    restore_rng(read_checkpoint(tmp_path / "c.pt")["rng"][0], latents)
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])

"""Checkpoints: atomic writes, the last K kept, resume, and a public generator loader.

A checkpoint is one file ``checkpoint-<images_seen, 12 digits>.pt`` in the run directory, written
by the main process only. It holds everything a resume needs (docs/design.md, "Runs and
checkpoints"; the schedule is a pure function of the images seen, so nothing else about the
schedule is stored):

- ``config``: the run's TrainConfig as a dict (what ``training_options.json`` holds);
- ``images_seen``, ``step``, ``stage`` of the networks it holds, and their last ``fade_alpha``;
- ``models``: state dicts of the unwrapped ``generator``, ``energy``, ``inference`` and
  ``generator_ema``; ``optimizers``: the three Adam state dicts;
- ``rng``: one entry per rank (torch, CUDA, numpy and Python generators, and the rank's latent
  generator), gathered to the main process;
- ``sampler``: the data sampler's position (``images_seen // world_size`` per rank; the sampler
  recomputes it from ``images_seen``, it is written down for clarity);
- ``lr_scale`` and ``rollbacks`` (the divergence guard's learning-rate factor).

Everything in it is tensors and plain Python values, so it loads with ``weights_only=True``.
A write goes through ``triangle/files.py``'s ``write_atomic``: a hidden temporary file in the
same folder, fsync'ed, then renamed over the final name (``os.replace`` is atomic on POSIX), so
a crash mid-write leaves the previous checkpoints intact and at most a stray
``.checkpoint-*.tmp-*`` file, which the next run removes.
"""

from __future__ import annotations

import io
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomic
from .config import UserError

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{12})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (unreadable, another format, another configuration)."""


def checkpoint_path(run_dir: str | os.PathLike, images_seen: int) -> Path:
    return Path(run_dir) / f"checkpoint-{images_seen:012d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temporary files are never listed)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.checkpoint-*.tmp-*`` files left by a crash during a write; returns them."""
    folder = Path(run_dir)
    stale = [p for p in folder.glob(".checkpoint-*.tmp-*")] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_checkpoint(payload: dict, path: str | os.PathLike, *,
                     debug_write_delay_s: float = 0.0) -> Path:
    """``torch.save(payload)`` to ``path`` so that ``path`` is either the old file or the new one.

    ``debug_write_delay_s`` (tests only) pauses halfway through writing the bytes, so that a
    process killed meanwhile reliably dies in the middle of a checkpoint write.
    """
    def write(fh) -> None:
        if debug_write_delay_s <= 0:
            torch.save(payload, fh)
            return
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getbuffer()
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(debug_write_delay_s)
        fh.write(data[len(data) // 2 :])

    return write_atomic(path, write)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    old = list_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint file, checking its format; raises CheckpointError with one line."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file; torch's message spans many lines
        raise CheckpointError(f"{path} is not a checkpoint written by progressive/train.py "
                              f"({type(exc).__name__}); pass a run directory or a checkpoint-*.pt") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of format version {FORMAT_VERSION}")
    return payload


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (None if there is none)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# Random number generator states (one dict per rank, gathered to the main process).


def capture_rng(latent_generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "latent": latent_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], latent_generator: torch.Generator) -> None:
    """The inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    latent_generator.set_state(state["latent"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""Checkpoints: the one owner of their format, atomic writes, the last K kept, RNG states.

A checkpoint is one file ``checkpoint-<images_seen, 12 digits>.pt`` in the run directory, written
by the main process only. Its contents are a :class:`Checkpoint`, the one typed description of
the format: the training loop builds one to save and reads one to resume or roll back, and the
evaluation tools (``metrics/checkpoint_models.py``) read one; nothing else knows the keys on
disk. It holds everything a resume needs (docs/design.md, "Runs and checkpoints"; the schedule
is a pure function of the images seen, and so is the data sampler's position, so nothing else
about either is stored):

- ``config``: the run's TrainConfig as a dict (what ``training_options.json`` holds);
- ``images_seen``, ``step``, ``stage`` of the networks it holds, and their last ``fade_alpha``;
- ``world_size``: the number of processes that wrote it;
- ``models``: state dicts of the unwrapped ``generator``, ``energy``, ``inference`` and
  ``generator_ema``; ``optimizers``: the three Adam state dicts;
- ``rng``: one entry per rank (torch, CUDA, numpy and Python generators, and the rank's latent
  generator), gathered to the main process;
- ``lr_scale`` and ``rollbacks`` (the divergence guard's learning-rate factor), ``elapsed_s``
  (training time over all sessions) and ``reason`` (why it was written, for people).

On disk it is a plain dict of these keys plus ``format_version``: tensors and plain Python
values only, so it loads with ``weights_only=True``. Files written before this class existed
also hold a ``sampler`` block (the sampler's position, recomputed from ``images_seen`` and never
read); loading ignores it.

A write goes through ``triangle/files.py``'s ``write_atomic``: a hidden temporary file in the
same folder, fsync'ed, then renamed over the final name (``os.replace`` is atomic on POSIX), so
a crash mid-write leaves the previous checkpoints intact and at most a stray
``.checkpoint-*.tmp-*`` file, which the next run removes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomic
from ..networks import Stage
from .config import TrainConfig, UserError

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{12})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (unreadable, another format, another configuration)."""


@dataclass
class Checkpoint:
    """One checkpoint's contents (the module docstring lists them); ``save`` and ``load`` turn it
    into the dict on disk and back."""

    config: dict[str, Any]  # TrainConfig.to_dict() as written (``train_config`` parses it)
    images_seen: int
    step: int
    stage: Stage  # of the networks it holds
    fade_alpha: float  # their fade level at ``images_seen``: pass it to every network call
    world_size: int
    models: dict[str, dict[str, torch.Tensor]]  # generator, energy, inference, generator_ema
    optimizers: dict[str, dict[str, Any]]  # generator, energy, inference (Adam state dicts)
    rng: list[dict[str, Any]]  # per rank, from capture_rng
    lr_scale: float = 1.0
    rollbacks: int = 0
    elapsed_s: float = 0.0
    reason: str = ""

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        """The dict on disk."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "images_seen": self.images_seen,
            "step": self.step,
            "stage": dataclasses.asdict(self.stage),
            "fade_alpha": self.fade_alpha,
            "world_size": self.world_size,
            "models": self.models,
            "optimizers": self.optimizers,
            "rng": self.rng,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "elapsed_s": self.elapsed_s,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Checkpoint:
        """The inverse of ``to_dict``; KeyError, TypeError or ValueError if a field is missing or
        malformed. Keys of older files that nothing reads (``sampler``) are ignored."""
        return cls(
            config=dict(payload["config"]),
            images_seen=int(payload["images_seen"]),
            step=int(payload["step"]),
            stage=Stage(**payload["stage"]),
            fade_alpha=float(payload["fade_alpha"]),
            world_size=int(payload["world_size"]),
            models=payload["models"],
            optimizers=payload["optimizers"],
            rng=list(payload["rng"]),
            lr_scale=float(payload["lr_scale"]),
            rollbacks=int(payload["rollbacks"]),
            elapsed_s=float(payload.get("elapsed_s", 0.0)),
            reason=str(payload.get("reason", "")),
        )

    def save(self, path: str | os.PathLike, *, debug_write_delay_s: float = 0.0) -> Path:
        """Write to ``path`` so that ``path`` is either the old file or the new one.

        ``debug_write_delay_s`` (tests only) pauses halfway through writing the bytes, so that a
        process killed meanwhile reliably dies in the middle of a checkpoint write.
        """
        payload = self.to_dict()

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

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read one checkpoint file, checking its format; raises CheckpointError with one line."""
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # a truncated or foreign file; torch's message spans many lines
            raise CheckpointError(f"{path} is not a checkpoint written by progressive/train.py "
                                  f"({type(exc).__name__}); pass a run directory or a checkpoint-*.pt") from exc
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} is not a checkpoint of format version {FORMAT_VERSION}")
        try:
            return cls.from_dict(payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: unusable checkpoint ({type(exc).__name__}: {exc})") from exc


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


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    old = list_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


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

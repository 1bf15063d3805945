"""The networks of a checkpoint, read once, for the evaluation tools.

Sampling needs the (EMA) generator; reconstruction and latent walks from real images also
need the inference model q_φ, and the FID log needs the images seen. Reading a 1024²
checkpoint twice would cost seconds, so this loader reads the file once and builds what is
asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..networks import Stage, build_network
from ..progressive.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from ..progressive.config import TrainConfig


@dataclass
class LoadedCheckpoint:
    """Networks in eval mode without gradients, at the checkpoint's stage, on one device."""

    path: Path  # the checkpoint file
    config: TrainConfig
    stage: Stage
    fade_alpha: float  # pass it to every call: ``generator(z, fade_alpha)``
    images_seen: int
    generator: nn.Module  # the EMA generator unless loaded with ema=False
    inference: nn.Module | None  # None unless loaded with inference=True
    energy: nn.Module | None = None  # None unless loaded with energy=True

    @property
    def resolution(self) -> int:
        return self.stage.resolution

    @property
    def latent_dim(self) -> int:
        return self.config.network.latent_dim

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000


def resolve_checkpoint(checkpoint_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file as given, or the newest one of a run directory; CheckpointError if none."""
    path = Path(checkpoint_or_run_dir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run directory or a checkpoint-*.pt file)")
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint-*.pt in {path}")
        return found
    return path


def load_checkpoint(
    checkpoint_or_run_dir: str | os.PathLike,
    *,
    ema: bool = True,
    inference: bool = False,
    energy: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """The generator (EMA by default, ``ema=False``: raw) and optionally q_φ and f_α of a
    checkpoint (CheckpointError if the run has no energy model: the vae and wake-sleep
    ablations)."""
    path = resolve_checkpoint(checkpoint_or_run_dir)
    checkpoint = Checkpoint.load(path)
    try:
        cfg = checkpoint.train_config
        if energy and not cfg.objective.terms.energy:  # saved, never trained
            raise CheckpointError(f"{path}: this run has no energy model (objective "
                                  f"{cfg.objective.kind!r}); use a triangle or acd run")

        def build(kind: str, key: str) -> nn.Module:
            net = build_network(kind, cfg.network, checkpoint.stage)
            net.load_state_dict(checkpoint.models[key])
            return net.to(device).eval().requires_grad_(False)

        return LoadedCheckpoint(
            path=path,
            config=cfg,
            stage=checkpoint.stage,
            fade_alpha=checkpoint.fade_alpha,
            images_seen=checkpoint.images_seen,
            generator=build("generator", "generator_ema" if ema else "generator"),
            inference=build("inference", "inference") if inference else None,
            energy=build("energy", "energy") if energy else None,
        )
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unusable checkpoint ({type(exc).__name__}: {exc})") from exc

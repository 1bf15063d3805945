"""Exponential moving average of the generator, with a half-life in images (stylegan2-ada style).

The EMA generator is a plain module (never prepared by Accelerate): it is updated on every rank
from that rank's copy of the generator, and since the ranks hold identical weights the EMAs are
identical too. Only the main process writes it to checkpoints and grids.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, images_seen: int, halflife_kimg: float, rampup: float | None) -> float:
    """The decay for one step of ``batch`` images.

    The half-life is ``halflife_kimg`` thousand images, capped during ramp-up at ``rampup`` times
    the images seen so far (so the EMA follows closely early in training, when the weights move
    fast). ``rampup=None`` (or 0) switches the ramp-up off.
    """
    halflife = halflife_kimg * 1000.0
    if rampup:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * model`` for parameters (matched by name); buffers copied."""
    params = dict(model.named_parameters())
    for name, p_ema in ema.named_parameters():
        p_ema.lerp_(params[name].detach(), 1.0 - beta)
    buffers = dict(model.named_buffers())
    for name, b_ema in ema.named_buffers():
        b_ema.copy_(buffers[name])


@torch.no_grad()
def copy_missing(ema: nn.Module, model: nn.Module, new_names: set[str]) -> None:
    """Copy the parameters and buffers named in ``new_names`` from ``model`` into ``ema``.

    After a rebuild, layers that appear for the first time (the next block, its toRGB) start in the
    EMA as the generator's own fresh initialisation, as if the EMA had always tracked them.
    """
    source = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in list(ema.named_parameters()) + list(ema.named_buffers()):
        if name in new_names:
            t.copy_(source[name])

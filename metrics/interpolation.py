"""Latent walks (paper Fig. 9): rows of images ``g(z(t))`` from ``z0`` to ``z1``.

Endpoints are either prior samples or the inference model's means ``mu(q(x))`` of two real
images. ``slerp`` (the default) follows the great circle between the endpoints, where prior
samples of high dimension live (White, 2016, "Sampling generative networks"); ``lerp`` is the
straight line, whose midpoints have a smaller norm than any typical ``z``. Both return the
endpoints exactly at t = 0 and t = 1. ``circle`` walks the whole great circle through both
(at ``z0``'s norm) and returns to ``z0`` at t = 1: a walk that loops, for animations.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("slerp", "lerp", "circle")


def lerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """``z0``, ``z1``: B x d; ``t``: T -> B x T x d."""
    t = t.view(1, -1, 1).to(z0)
    return z0[:, None] * (1 - t) + z1[:, None] * t


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation per row; rows with (anti)parallel endpoints fall back to lerp."""
    t = t.view(1, -1, 1).to(z0)
    cos = torch.nn.functional.cosine_similarity(z0.double(), z1.double(), dim=1).clamp(-1, 1)
    omega = torch.arccos(cos).to(z0).view(-1, 1, 1)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    w1 = torch.where(parallel, t, torch.sin(t * omega) / safe)
    return z0[:, None] * w0 + z1[:, None] * w1


def circle(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """The great circle through ``z0`` and ``z1`` at radius |z0|, from z0 (t = 0) through the
    direction of z1 and back to z0 (t = 1): B x T x d. Rows with parallel endpoints turn
    towards a fixed direction orthogonal to z0 instead."""
    t = t.view(1, -1, 1).to(z0)
    radius = z0.norm(dim=1, keepdim=True)
    e0 = z0 / radius
    e1 = z1 - (z1 * e0).sum(1, keepdim=True) * e0
    fallback = torch.roll(e0, 1, dims=1) - (torch.roll(e0, 1, dims=1) * e0).sum(1, keepdim=True) * e0
    e1 = torch.where(e1.norm(dim=1, keepdim=True) < 1e-6, fallback, e1)
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    angle = 2 * torch.pi * t
    return radius[:, None] * (torch.cos(angle) * e0[:, None] + torch.sin(angle) * e1[:, None])


def latent_walks(z0: Tensor, z1: Tensor, steps: int, mode: str = "slerp") -> Tensor:
    """``steps`` >= 2 latents per row from ``z0[i]`` to ``z1[i]`` (``circle``: from and back to
    ``z0[i]``): (B·steps) x d, row after row."""
    if steps < 2:
        raise ValueError(f"a walk needs at least 2 steps, got {steps}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    t = torch.linspace(0, 1, steps)
    walks = {"slerp": slerp, "lerp": lerp, "circle": circle}[mode](z0, z1, t)
    # exact endpoints, whatever the rounding above
    walks[:, 0], walks[:, -1] = z0, (z0 if mode == "circle" else z1)
    return walks.reshape(-1, z0.shape[1])


def random_endpoints(rows: int, latent_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two prior samples per row, drawn on the CPU from ``seed``."""
    z = torch.randn(2, rows, latent_dim, generator=torch.Generator().manual_seed(seed))
    return z[0], z[1]

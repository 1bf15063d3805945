"""Latent walks (paper Fig. 9): rows of images ``g(z(t))`` from ``z0`` to ``z1``.

Endpoints are either prior samples or the inference model's means ``mu(q(x))`` of two real
images. ``slerp`` (the default) follows the great circle between the endpoints, where prior
samples of high dimension live (White, 2016, "Sampling generative networks"); ``lerp`` is the
straight line, whose midpoints have a smaller norm than any typical ``z``. Both return the
endpoints exactly at t = 0 and t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("slerp", "lerp")


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


def latent_walks(z0: Tensor, z1: Tensor, steps: int, mode: str = "slerp") -> Tensor:
    """``steps`` >= 2 latents per row from ``z0[i]`` to ``z1[i]``: (B·steps) x d, row after row."""
    if steps < 2:
        raise ValueError(f"a walk needs at least 2 steps, got {steps}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    t = torch.linspace(0, 1, steps)
    walks = (slerp if mode == "slerp" else lerp)(z0, z1, t)
    walks[:, 0], walks[:, -1] = z0, z1  # exact endpoints, whatever the rounding above
    return walks.reshape(-1, z0.shape[1])


def random_endpoints(rows: int, latent_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two prior samples per row, drawn on the CPU from ``seed``."""
    z = torch.randn(2, rows, latent_dim, generator=torch.Generator().manual_seed(seed))
    return z[0], z[1]

"""Sample grids from a fixed z and reconstructions of fixed held-out images, as PNG files
(and latent walks as GIF animations)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

GRID_MIN_PIXELS = 64  # tiny resolutions are enlarged (nearest) to at least this many pixels


def _enlarge(images: Tensor, min_pixels: int = GRID_MIN_PIXELS) -> Tensor:
    factor = math.ceil(min_pixels / images.shape[-1])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def save_images(images: Tensor, path: str | os.PathLike, nrow: int) -> None:
    """Images in [-1, 1] (N x 3 x R x R) as one PNG grid of ``nrow`` images per row."""
    grid = make_grid(_enlarge(images.float().cpu()), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    save_image(grid, path)


def save_animation(images: Tensor, rows: int, path: str | os.PathLike, frame_ms: int = 120) -> None:
    """Images in [-1, 1], ``rows`` walks of equal length one after the other ((rows·T) x 3 x R x
    R), as a looping GIF of T frames: frame k holds step k of every walk side by side."""
    steps = images.shape[0] // rows
    big = _enlarge(images.float().cpu())
    walks = big.view(rows, steps, *big.shape[1:])
    frames = []
    for k in range(steps):
        strip = make_grid(walks[:, k], nrow=rows, padding=2, normalize=True, value_range=(-1, 1))
        frames.append(Image.fromarray(strip.mul(255).round().byte().permute(1, 2, 0).numpy()))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


@torch.no_grad()
def generate(generator: nn.Module, z: Tensor, fade_alpha: float, batch: int = 64) -> Tensor:
    """``generator(z, fade_alpha)`` in chunks of ``batch``, without gradients."""
    return torch.cat([generator(chunk, fade_alpha) for chunk in z.split(batch)])


@torch.no_grad()
def reconstruct(generator: nn.Module, inference: nn.Module, x: Tensor, fade_alpha: float) -> Tensor:
    """``g(mu(q(x)))``: the reconstructions the grids show below the held-out images
    (docs/design.md, "Evaluation"; paper Fig. 10)."""
    mu, _ = inference(x, fade_alpha)
    return generator(mu, fade_alpha)


def interleave_rows(top: Tensor, bottom: Tensor, nrow: int) -> Tensor:
    """Stack rows of ``nrow`` images: top[0:nrow], bottom[0:nrow], top[nrow:2nrow], ..."""
    chunks = []
    for a, b in zip(top.split(nrow), bottom.split(nrow), strict=True):
        chunks += [a, b]
    return torch.cat(chunks)

"""Test-split reconstruction error (paper Table 2, Fig. 10).

For each held-out image ``x`` (in [-1, 1]) the reconstruction is ``g(mu(q(x)))``: the mean of
q_φ(z|x), no sampling, through the generator. The error reported is the per-pixel mean squared
error in [-1, 1] units, ``SSE(x, g(mu)) / (3·H·W)`` averaged over the images (the reference
code's objective uses the per-image SSE, 3·H·W times this). The paper's Table 2: CIFAR-10
0.028, CelebA 0.030 (VAE 0.037 / 0.039). See docs/design.md, "Evaluation".

The generator paired with q_φ is the raw one by default: q_φ was trained against it, the EMA
generator is an average it never saw. Checkpoints written mid-fade evaluate the faded images
``(1-a)·up(down(x)) + a·x``, as training shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..datasets import DatasetError, MultiResolutionDataset
from ..networks import fade_images
from ..progressive.grids import reconstruct  # g(mu(q(x))), as the training grids show it


@dataclass
class ReconstructionResult:
    mse: float  # per-pixel MSE in [-1, 1]: mean over images of SSE / (3·H·W)
    count: int  # images evaluated
    resolution: int
    split: str


def per_image_mse(x: Tensor, rec: Tensor) -> Tensor:
    """SSE / (3·H·W) of each image, in float64."""
    return (x.double() - rec.double()).pow(2).flatten(1).mean(dim=1)


def dataset_images(ds: MultiResolutionDataset, resolution: int, indices, fade_alpha: float = 1.0) -> Tensor:
    """Items ``indices`` of ``ds`` at ``resolution`` in [-1, 1], faded if ``fade_alpha < 1``."""
    x = torch.stack([ds.image(int(i), resolution, as_float=True) for i in indices])
    return fade_images(x, fade_alpha) if fade_alpha < 1 else x


def reconstruction_error(
    generator: nn.Module,
    inference: nn.Module,
    data: str | os.PathLike,
    resolution: int,
    fade_alpha: float = 1.0,
    *,
    split: str = "test",
    count: int | None = None,
    batch: int = 64,
    device: str | torch.device = "cpu",
) -> ReconstructionResult:
    """Per-pixel MSE over the first ``count`` images (default all) of ``split``.

    Raises DatasetError if the data has no such split or level.
    """
    ds = MultiResolutionDataset(data, split=split)
    if resolution not in ds.meta.codecs:
        raise DatasetError(f"{data} has no {resolution}x{resolution} level")
    n = len(ds) if count is None else min(count, len(ds))
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, batch):
        x = dataset_images(ds, resolution, range(start, min(n, start + batch)), fade_alpha).to(device)
        total += per_image_mse(x, reconstruct(generator, inference, x, fade_alpha)).sum().cpu()
    return ReconstructionResult(float(total / n), n, resolution, split)


def best_latent_error(generator: nn.Module, inference: nn.Module, x: Tensor, fade_alpha: float = 1.0,
                      *, steps: int = 300, lr: float = 0.05, batch: int = 256) -> float:
    """The generator's share of the reconstruction error: the per-pixel MSE of ``g(z*)``, where
    ``z*`` minimises SSE(x, g(z)) for each image, found by Adam (``steps`` at ``lr``) from q's
    mean with both networks fixed (so an upper bound on that minimum).

    ``x``: N×3×R×R in [-1, 1], as the networks see it at ``fade_alpha``. The reconstruction
    error of ``g(mu(q(x)))`` minus this is the inference network's share (the amortisation gap):
    what a better q could gain without a better generator."""
    total = 0.0
    for chunk in x.split(batch):
        with torch.no_grad():
            z = inference(chunk, fade_alpha)[0].float()
        z.requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                sse = (generator(z, fade_alpha).float() - chunk).square().sum()
                (z.grad,) = torch.autograd.grad(sse, z)  # the networks' weights get none
                optimiser.step()
        with torch.no_grad():
            total += float(per_image_mse(chunk, generator(z, fade_alpha)).sum())
    return total / len(x)


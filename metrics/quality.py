"""Sample quality of a checkpoint with measures that need no download (the quality study's).

``evaluate_checkpoint(path, data)`` scores a checkpoint's EMA generator, inference and energy
models against the held-out split of its data, at the checkpoint's resolution:

* ``pixel_fd``: the Fréchet distance between generated and held-out images in pixel space,
  after a box filter to 8×8 (192 numbers per image, so that the covariances are well estimated
  from a few hundred images); owes nothing to the demo renderer;
* ``conv_fd``: the same in the features of ``RandomConvFeatures``, a fixed random conv net
  (not trained on anything, so not on the demo either);
* on demo data, ``demo_fd`` and ``shapes_recognised`` (metrics/demo_features.py), and
  ``rec_shapes``: the fraction of fresh demo renders whose reconstruction keeps its shape
  (the demo classifier names the rendered one);
* ``rec_mse``: held-out reconstruction MSE per pixel in [-1, 1] (the paper's Table 2 quantity);
  on demo data also ``rec_mse_renders``, the same on ``RENDERED_HOLDOUT`` fresh renders (the
  test split is small: its 64 images leave paired runs' errors a few per cent apart by chance);
  ``rec_mse_best_z``: the same with the latent code each image's best (Adam on z from q's mean,
  metrics/reconstruction.py ``best_latent_error``): the generator's share of ``rec_mse``, the rest
  is the inference network's;
* ``f_gap``, ``f_gap_noise``: the energy's mean f(data) − f(samples) and f(data) − f(noise).

Every distance comes with its two references computed the same way: training images against
held-out images (``*_floor``, what a perfect generator would score with this many images) and
uniform noise against held-out images (``*_noise``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..datasets import MultiResolutionDataset, read_metadata
from ..networks import build_network, fade_images
from ..progressive.checkpoint import Checkpoint
from ..progressive.diagnostics import energy_diagnostics
from ..progressive.grids import reconstruct
from .checkpoint_models import load_checkpoint, resolve_checkpoint
from .demo_features import DemoReference, demo_images, load_demo_features, shapes_kept
from .fid import FeatureStats, RandomConvFeatures, fid_from_stats
from .reconstruction import best_latent_error, per_image_mse, reconstruction_error

PIXEL_FD_SIZE = 8  # images are box-filtered to 8x8 before the pixel-space distance
# Fresh demo renders for ``rec_mse_renders``: with 2,000 a paired difference between two runs
# has a standard error of ~0.4% of the error (measured on the study's runs); the test split's
# 64 images leave ~sqrt(2000/64) = 5.6x that.
RENDERED_HOLDOUT = 2000


def pixel_features(images: Tensor) -> np.ndarray:
    """Images N×3×R×R in [-1, 1] (R >= 8) -> N×192, their 8×8 box-filtered pixels."""
    x = images.float()
    if x.shape[-1] > PIXEL_FD_SIZE:
        x = F.adaptive_avg_pool2d(x, PIXEL_FD_SIZE)
    return x.flatten(1).cpu().numpy().astype(np.float64)


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return fid_from_stats(FeatureStats.of(features_a), FeatureStats.of(features_b))


def load_split(data: str | os.PathLike, split: str, resolution: int, count: int) -> Tensor:
    """The first ``count`` images of a split, N×3×R×R floats in [-1, 1]."""
    ds = MultiResolutionDataset(data, split=split)
    return torch.stack([ds.image(i, resolution, as_float=True) for i in range(min(count, len(ds)))])


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike | None = None,
                        *, count: int = 512, seed: int = 1, device: str = "cpu") -> dict[str, float]:
    """The measures of the module docstring for a checkpoint (or a run directory's newest)."""
    path = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(path, device=device)  # the EMA generator samples
    cfg, r, alpha = loaded.config, loaded.resolution, loaded.fade_alpha
    data = data or cfg.data or str(path.parent / "demo.lmdb")
    held_out = load_split(data, "test" if read_metadata(data).test_indices else "train", r, count)
    train = load_split(data, "train", r, len(held_out))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(held_out), cfg.network.latent_dim, generator=gen).to(device)
    samples = torch.cat([loaded.generator(c, alpha) for c in z.split(256)]).clamp(-1, 1).cpu()
    noise = torch.rand(held_out.shape, generator=gen) * 2 - 1
    out: dict[str, float] = {}
    conv = RandomConvFeatures()
    for name, features in (("pixel_fd", pixel_features),
                           ("conv_fd", lambda x: conv((x + 1) * 127.5).numpy())):
        ref = features(held_out)
        out[name] = frechet(features(samples), ref)
        out[f"{name}_floor"] = frechet(features(train), ref)
        out[f"{name}_noise"] = frechet(features(noise), ref)
    if cfg.data is None:  # the built-in demo: its own feature network
        # Its own ``count`` samples and fresh held-out renders: the demo's test split is small
        # (64), and a Fréchet distance from few images is biased upwards by about 1/N.
        reference = DemoReference.for_demo(r, load_demo_features(device=device), count=count,
                                           data_count=cfg.demo_count, seed=cfg.seed,
                                           top=cfg.max_resolution)
        z = torch.randn(count, cfg.network.latent_dim, generator=gen).to(device)
        q = reference.score(torch.cat([loaded.generator(c, alpha) for c in z.split(256)]).clamp(-1, 1))
        out |= {"demo_fd": q.fd, "demo_fd_floor": reference.floor, "demo_fd_noise": reference.noise,
                "shapes_recognised": q.shapes_recognised}
    # Reconstructions through the raw generator: the one trained together with q.
    raw = load_checkpoint(path, ema=False, inference=True, device=device)
    out["rec_mse"] = reconstruction_error(raw.generator, raw.inference, data, r, fade_alpha=alpha,
                                          split="test", count=count, device=device).mse
    x = fade_images(load_split(data, "test", r, count), alpha).to(device)
    out["rec_mse_best_z"] = best_latent_error(raw.generator, raw.inference, x, alpha)
    if cfg.data is None:
        # Images after the dataset's own (never trained on), faded as training shows them.
        indices = range(cfg.demo_count, cfg.demo_count + RENDERED_HOLDOUT)
        renders = fade_images(demo_images(indices, r, cfg.seed, top=min(cfg.max_resolution, 64)),
                              alpha).to(device)
        recs = torch.cat([reconstruct(raw.generator, raw.inference, b, alpha) for b in renders.split(256)])
        out["rec_mse_renders"] = float(per_image_mse(renders, recs).mean())
        # Shapes through q and g: what the samples can at best learn to show. Held-out
        # reconstructions that lose a shape point at the networks.
        n = min(count, RENDERED_HOLDOUT)
        out["rec_shapes"] = shapes_kept(load_demo_features(device=device), recs[:n].clamp(-1, 1),
                                        indices[:n], cfg.seed)
    if cfg.objective.terms.energy:
        energy = build_network("energy", cfg.network, loaded.stage)
        energy.load_state_dict(Checkpoint.load(path).models["energy"])
        energy = energy.to(device).eval().requires_grad_(False)
        # Data as the energy was trained on it (faded mid-fade); the distances above compare
        # the samples with the data itself.
        real = fade_images(held_out, alpha).to(device)
        out |= energy_diagnostics(energy, real, samples.to(device), alpha, seed=seed)
    return out

"""Per-tick diagnostics of the latent space and the energy, for every run.

They say *why* samples can look unlike the data while reconstructions are good:

* the posterior means ``μ(x)`` of held-out images should look like draws of the prior N(0, I)
  that ``g`` is sampled from: a mean near 0 (``posterior_mean_norm``, the norm of the average
  μ; a prior sample of N codes gives about sqrt(d/N)), no common direction
  (``posterior_cosine``, the mean cosine between two images' μ; prior: 0) and many used
  dimensions (``active_dims``: dimensions whose μ varies across images by more than 0.01, the
  "active units" of Burda et al. 2016). Real codes in a narrow cone are codes prior samples
  miss;
* the energy should rate data above samples and far above noise: ``f_data``, ``f_samples``,
  ``f_noise`` (uniform noise in [-1, 1]) and the gaps ``f_gap = f_data − f_samples``,
  ``f_gap_noise = f_data − f_noise``. A gap near 0 or negative means the energy cannot tell
  samples from data and gives the generator no direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVE_DIM_VARIANCE = 0.01  # Burda et al.'s threshold on Var_x[μ_j(x)]


@torch.no_grad()
def latent_diagnostics(mu: Tensor) -> dict[str, float]:
    """Statistics of posterior means ``mu`` (N×d, N >= 2) of held-out images."""
    mu = mu.float()
    unit = F.normalize(mu, dim=1)
    n = mu.shape[0]
    cosine = (unit.sum(0).square().sum() - n) / (n * (n - 1))  # mean over pairs i != j
    return {
        "posterior_mean_norm": float(mu.mean(0).norm()),
        "posterior_cosine": float(cosine),
        "active_dims": int((mu.var(0) > ACTIVE_DIM_VARIANCE).sum()),
    }


@torch.no_grad()
def energy_diagnostics(energy: nn.Module, data: Tensor, samples: Tensor,
                       fade_alpha: float, seed: int = 0, batch: int = 256) -> dict[str, float]:
    """Mean f of ``data``, ``samples`` and uniform noise (each N×3×R×R in [-1, 1]) and the gaps."""
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(data.shape, generator=gen) * 2 - 1).to(data.device)

    def mean_f(x: Tensor) -> float:
        return float(torch.cat([energy(c, fade_alpha).float() for c in x.split(batch)]).mean())

    f_data, f_samples, f_noise = mean_f(data), mean_f(samples), mean_f(noise)
    return {"f_data": f_data, "f_samples": f_samples, "f_noise": f_noise,
            "f_gap": f_data - f_samples, "f_gap_noise": f_data - f_noise}

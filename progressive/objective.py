"""The divergence triangle objective (paper eq. 13, Algorithm 1; docs/design.md, "The objective").

    D = KL(Q‖P) + KL(P‖Π) − KL(Q‖Π),   max over α, min over θ and φ,

with Q = q_data(x) q_φ(z|x), P = p(z) p_θ(x|z), Π = π_α(x) q_φ(z|x), π_α ∝ exp f_α.
log Z(α) cancels between the last two terms, so no MCMC is needed. Per batch, with ``x``
data, ``z ~ N(0, I)``, ``x̃ = g(z)`` and ``z̃ ~ q_φ(z|x)``, each step minimises:

====================  ==========================================================================
step                  loss (the part of D, or −D for α, that depends on its parameters)
====================  ==========================================================================
α (energy)            mean f(x̃) − mean f(x)                                     (eq. 17)
φ (inference)         w_rec·R(x, g(z̃)) + w_kl·KL(q_φ(·|x) ‖ N(0, I)) + w_lat·NLL(z | q_φ(·|x̃))
θ (generator)         w_rec·R(x, g(z̃)) − w_e·mean f(x̃) + w_lat·NLL(z | q_φ(·|x̃))
====================  ==========================================================================

* ``R`` is −log p_θ(x|z̃) up to a constant: the per-image sum of squared errors, which is the
  Gaussian's with σ² = ½ (the reference code's choice; no noise is added to g(z)). From 4² to
  1024² this sum grows 65,536×, while the energy and latent terms do not, so fixed weights
  would shift the balance at every stage. **Balance rule:** R is rescaled to
  ``rec_reference_pixels`` pixels (32×32, where the reference weights were tuned):
  ``R = SSE · rec_reference_pixels / (H·W)``, i.e. σ² grows with the pixel count so that the
  likelihood term keeps the weight it has at 32×32. ``tests/test_objective.py`` checks that,
  at initialisation, R relative to the energy term stays within a fixed factor at every
  resolution 4…1024.
* ``KL`` is the closed form of KL(N(μ, σ²) ‖ N(0, I)), summed over the latent dimensions
  (``kl_reduction='sum'``, the term of D) or averaged over them as in the reference code
  (``'mean'``: an effective weight w_kl/d on the summed KL).
* ``NLL`` is the diagonal Gaussian negative log density of z under q_φ(·|x̃), summed over the
  latent dimensions: the φ- and θ-parts of KL(P‖Π) (the entropy of p_θ(x|z) is constant).

The ablations of the paper's §3.2 switch terms off (``TERMS``): ``vae`` is KL(Q‖P) alone,
``acd`` is KL(P‖Π) − KL(Q‖Π) (adversarial contrastive divergence, no reconstruction),
``wake-sleep`` learns the generator from KL(Q‖P) and the inference model from dream pairs
(z, x̃) alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)
KL_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class Terms:
    """Which terms of D each step uses."""

    energy: bool  # the α step, and an energy model at all
    inference_rec: bool  # φ learns from R(x, g(z̃)) through z̃ (else z̃ is a constant sample)
    inference_kl: bool  # φ learns from KL(q_φ(·|x) ‖ N(0, I))
    inference_lat: bool  # φ learns from NLL(z | q_φ(·|x̃)) on dream pairs
    generator_rec: bool  # θ learns from R(x, g(z̃))
    generator_energy: bool  # θ learns from −f(x̃)
    generator_lat: bool  # θ learns from NLL(z | q_φ(·|x̃)) through x̃

    @property
    def needs_posterior_sample(self) -> bool:
        """Whether z̃ ~ q_φ(z|x) (and so g(z̃)) is used at all."""
        return self.inference_rec or self.inference_kl or self.generator_rec

    @property
    def uses_latent_nll(self) -> bool:
        return self.inference_lat or self.generator_lat


TERMS = {
    "triangle": Terms(True, True, True, True, True, True, True),
    "vae": Terms(False, True, True, False, True, False, False),
    "acd": Terms(True, False, False, True, False, True, True),
    "wake-sleep": Terms(False, False, False, True, True, False, False),
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and variant of the objective (reference values from the public code at 32²)."""

    kind: str = "triangle"  # triangle | vae | acd | wake-sleep (paper §3.2 ablations)
    w_rec: float = 1.0  # on R, the per-image SSE rescaled to rec_reference_pixels
    w_lat: float = 0.1  # on NLL(z | q(x̃)), summed over latent dims
    w_e: float = 1.0  # on −mean f(x̃) in the generator step
    w_drift: float = 0.0  # on mean f(x)² in the α step (PGGAN's ε_drift; see energy_loss)
    # The KL summed over latent dims, at w_kl = 0.25: a weight that does not depend on the
    # latent size d. The reference code averages it over d (w_kl/d on the sum: 1/512 at the
    # paper's 1024² latent), which leaves posterior means in a narrow cone (mean cosine 0.75,
    # norm 17) that prior samples miss, so samples are blobs while reconstructions are sharp.
    # Measured in 16² demo probes (30–70 kimg): w 1 summed blurred the reconstructions (MSE
    # 0.053 against 0.031 at 0.25); averaged, samples stayed blobs. With the demo's settings
    # now (160 kimg, latent 32, seed 0; docs/study.md, "Nor the KL's weight alone"): averaged (1/32 per
    # nat) rec MSE 0.0100 -> 0.0092 but shapes 67% -> 65%, demo FD 28 -> 44; summed at 1, FD 31,
    # 68%, rec 0.0145.
    kl_reduction: str = "sum"  # 'sum' over latent dims (D's own KL) or 'mean' (reference code)
    w_kl: float = 0.25  # on the KL term (reference code: 1 with kl_reduction='mean')
    # Anchors f's level, which D leaves free (energy_loss): without it f drifted to ±30…100 in
    # the demo; 0.01 holds it within a few units and changes no measured quality.
    w_level: float = 0.01  # on ((mean f(x) + mean f(x̃))/2)² in the α step (see energy_loss)
    # R1 on the energy: without it an energy trained as fast as the generator destabilised
    # the photographs' runs (f(samples) above f(data), reconstruction error doubled, in 16²
    # probes); at 1 its gradient was too smooth to pull samples (its θ-gradient 12x smaller
    # than R's, and a 3x energy rate changed nothing); 0.1 kept both (probes, 16² and 8²).
    # The demo's settings (demo_config: 10x the learning rates, lazy R1) take 0.005 with w_e 0.5.
    w_r1: float = 0.1  # R1: w_r1/2 · mean |∇ₓf(x)|² on data in the α step (see energy_loss)
    # Lazy R1 (StyleGAN2's lazy regularisation): the penalty on one step in r1_interval, weighted
    # ×r1_interval, saves R1's double backward (~38% of the demo's time) on the other steps.
    # Every step by default: on the photographs (16², 100 kimg) one step in 4 and in 16 raised
    # the pixel FD from 2.71 to 7.14 and 10.24 (samples narrowed to a few colours). The demo's
    # quality did not change at 16 (demo_config uses 4, which holds f's scale).
    r1_interval: int = 1
    rec_reference_pixels: int = 32 * 32  # the balance rule: R = SSE · this / (H·W)
    fused: bool = True  # share passes between the φ and θ steps (see step.py); False = strict
    generator_steps: int = 1  # θ steps per iteration (paper: "optional multiple-step update")
    # The reference code's clip. With equalised weights it acts on most of the demo's generator
    # steps (tick-mean norms 110-260 at 16x16); off, the fp32 demo ended worse on seed 0 (demo
    # FD 28 -> 53, rec MSE 0.0100 -> 0.0133) and mixed on seed 2 (docs/study.md).
    grad_clip: float = 100.0  # max grad norm of each network; 0 disables

    def __post_init__(self) -> None:
        if self.kind not in TERMS:
            raise ValueError(f"objective kind must be one of {sorted(TERMS)}, got {self.kind!r}")
        if self.r1_interval < 1:
            raise ValueError("r1_interval must be >= 1")
        if self.generator_steps < 1:
            raise ValueError("generator_steps must be >= 1")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if min(self.w_drift, self.w_level, self.w_r1) < 0:
            raise ValueError("w_drift, w_level and w_r1 must be >= 0")

    @property
    def terms(self) -> Terms:
        return TERMS[self.kind]

    def rec_scale(self, resolution: int) -> float:
        """The balance rule's factor on the per-image SSE at ``resolution``."""
        return self.rec_reference_pixels / float(resolution * resolution)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectiveConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the pieces of D, per image -------------------------------------------------------------


def sum_squared_error(x: Tensor, x_rec: Tensor) -> Tensor:
    """Per-image sum of squared errors. x, x_rec: B×C×H×W in [-1, 1] -> B."""
    return (x.float() - x_rec.float()).square().flatten(1).sum(1)


def gaussian_kl_to_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, diag e^logvar) ‖ N(0, I)) per image, summed over dims. B×d -> B."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


def gaussian_nll(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """−log N(z; μ, diag e^logvar) per image, summed over dims. B×d -> B."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return 0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(1)


def reparameterize(mu: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """z = μ + exp(½ logvar)·ε, ε ~ N(0, I) given as ``noise``. B×d -> B×d."""
    return mu + torch.exp(0.5 * logvar) * noise


# --- the three step losses (the table above) -------------------------------------------------


def energy_loss(f_real: Tensor, f_fake: Tensor, w_drift: float = 0.0, w_level: float = 0.0,
                r1_penalty: Tensor | None = None, w_r1: float = 0.0) -> Tensor:
    """α step: mean f(x̃) − mean f(x), plus optional terms that are not part of D.

    Minimising the first part raises f on data and lowers it on samples. π_α ∝ exp f is unchanged
    by a constant added to f, so nothing in D anchors f's level: it can drift far from 0 until
    float precision suffers (at |f| ≈ 100 bf16 rounds to 0.5). Two anchors:

    * ``w_level``·((mean f(x) + mean f(x̃))/2)²: pins the midpoint of the two levels to 0 and
      leaves their gap, the only thing D sees, free;
    * ``w_drift``·mean f(x)² (PGGAN's ε_drift = 1e-3): pulls f(data) itself to 0, which also
      shrinks the gap.

    ``r1_penalty`` (B, |∇ₓf(x)|² per real image) with ``w_r1``: the R1 regulariser
    (Mescheder et al. 2018), w_r1/2 · mean |∇ₓf(x)|², which keeps f smooth around the data so
    that its gradient to the generator stays informative.
    """
    f_real, f_fake = f_real.float(), f_fake.float()
    loss = f_fake.mean() - f_real.mean()
    if w_drift:
        loss = loss + w_drift * f_real.square().mean()
    if w_level:
        loss = loss + w_level * (0.5 * (f_real.mean() + f_fake.mean())).square()
    if w_r1 and r1_penalty is not None:
        loss = loss + 0.5 * w_r1 * r1_penalty.float().mean()
    return loss


def inference_loss(cfg: ObjectiveConfig, rec: Tensor | None, kl: Tensor | None,
                   lat_nll: Tensor | None) -> Tensor:
    """φ step: w_rec·R + w_kl·KL + w_lat·NLL, batch means; ``None`` for a term the variant
    omits. ``rec`` is R already rescaled by the balance rule (B); ``kl`` is ``kl_term`` (B);
    ``lat_nll`` is ``gaussian_nll`` of the prior z under q(·|x̃) (B)."""
    loss = torch.zeros((), device=_device(rec, kl, lat_nll))
    t = cfg.terms
    if t.inference_rec and rec is not None:
        loss = loss + cfg.w_rec * rec.mean()
    if t.inference_kl and kl is not None:
        loss = loss + cfg.w_kl * kl.mean()
    if t.inference_lat and lat_nll is not None:
        loss = loss + cfg.w_lat * lat_nll.mean()
    return loss


def generator_loss(cfg: ObjectiveConfig, rec: Tensor | None, f_fake: Tensor | None,
                   lat_nll: Tensor | None) -> Tensor:
    """θ step: w_rec·R − w_e·mean f(x̃) + w_lat·NLL, batch means."""
    loss = torch.zeros((), device=_device(rec, f_fake, lat_nll))
    t = cfg.terms
    if t.generator_rec and rec is not None:
        loss = loss + cfg.w_rec * rec.mean()
    if t.generator_energy and f_fake is not None:
        loss = loss - cfg.w_e * f_fake.float().mean()
    if t.generator_lat and lat_nll is not None:
        loss = loss + cfg.w_lat * lat_nll.mean()
    return loss


def kl_term(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    """The KL term: KL(q ‖ N(0, I)) summed over dims ('sum') or divided by d ('mean',
    the reference code's weighting). B×d -> B."""
    kl = gaussian_kl_to_standard(mu, logvar)
    return kl / mu.shape[1] if reduction == "mean" else kl


def _device(*tensors: Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)

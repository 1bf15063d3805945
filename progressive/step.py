"""One training iteration of Algorithm 1: the α, φ and θ steps, in that order.

Network passes. The public reference code runs 3 generator, 4 inference and 3 energy
forwards per iteration. The default (``fused=True``) runs, in images, 2B through the
generator (one call on ``[z, z̃]``), 2B through the inference model (``x`` and ``x̃``) and
3B through the energy model (one call on ``[x, x̃]`` for α, one on ``x̃`` for θ), with one
backward for α and one shared backward for φ and θ:

* ``R(x, g(z̃))`` is the same term in the φ and θ losses, taken at the same sample z̃ and the
  same θ (θ is stepped after φ): one backward gives both gradients exactly.
* ``KL`` has no θ-gradient and ``−f(x̃)`` no φ-gradient, so adding them to the shared loss
  changes neither network's gradient.
* ``NLL(z | q_φ(x̃))``: its φ-gradient does not depend on whether x̃ is detached, so one pass
  serves both steps. The one difference from the strict order is here: the θ-gradient of this
  term is taken at φ before its update rather than after it (a one-step lag in φ only).
* The θ step scores x̃ with the *updated* energy, as Algorithm 1 does: that needs the second
  energy pass, on x̃ alone, after the α step.

``fused=False`` keeps the strict order of Algorithm 1 (φ stepped, then every θ-term recomputed
at the new φ): 3B generator, 3B inference and 3B energy images per iteration.

Gradient accumulation (``micro_batches > 1``, when a rank's share of the global batch is larger
than what its GPU runs at once): the α step's gradient is summed over the micro-batches, each
loss weighted by its share of the batch, before the energy is stepped; then the φ and θ steps'
shared loss likewise, with x̃ recomputed through the generator per micro-batch (its graph is not
kept across micro-batches: that is the memory saved). Every term of the losses is a mean over
images, so the result is the one-batch step's, except the level anchor on f, a square of batch
means, which is applied per micro-batch. Only the last micro-batch all-reduces gradients (the
others run forward and backward under DDP's ``no_sync``). Needs the fused step with one θ step
per iteration.

Distributed training: each backward calls each wrapped (DDP) network at most once; the other
passes use the unwrapped module, with its parameters' ``requires_grad`` switched off where it
is only a function to backpropagate through (stylegan2-ada's scheme). So no network's
gradients are all-reduced in a backward that does not step it, and every parameter of a
wrapped call receives a gradient (no ``find_unused_parameters``).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..networks import frozen
from .objective import (
    ObjectiveConfig,
    energy_loss,
    gaussian_nll,
    generator_loss,
    inference_loss,
    kl_term,
    reparameterize,
    sum_squared_error,
)


class TrainModels(NamedTuple):
    generator: nn.Module
    energy: nn.Module
    inference: nn.Module


class TrainOptimizers(NamedTuple):
    generator: torch.optim.Optimizer
    energy: torch.optim.Optimizer
    inference: torch.optim.Optimizer


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite: raised before the optimiser step that would apply it, or,
    when checks are deferred (``TriangleStep.verify``), ``steps_before_last`` steps before the
    last one taken (whose weights it has then reached)."""

    def __init__(self, term: str, value: float, steps_before_last: int | None = None):
        super().__init__(f"non-finite {term} loss ({value})")
        self.term = term
        self.value = value
        self.steps_before_last = steps_before_last


class TriangleStep:
    """Runs one iteration of the α, φ and θ steps on a batch.

    Call with the (possibly Accelerate-prepared) models and optimisers, a real batch
    ``x_real`` (B×3×R×R float in [-1, 1], already faded with ``fade_images``), prior samples
    ``z`` (B×d) and the fade level; ``regularize`` says whether this step applies the lazy R1
    penalty (the caller's step count modulo ``cfg.r1_interval``). Returns detached 0-d tensors
    for logging (``r1`` only on regularised steps); nothing is synchronised with the host except
    the finiteness checks of the three losses, and with ``defer_checks`` not even those: each
    step records on the device whether its losses were finite, and :meth:`verify` (the caller's,
    every few steps and before anything is saved) reads them back at once.
    """

    def __init__(self, cfg: ObjectiveConfig, defer_checks: bool = False):
        self.cfg = cfg
        self.defer_checks = defer_checks
        # (steps since the last verify, term, device bool "not finite") of each deferred check
        self._pending: list[tuple[int, str, Tensor]] = []
        self._steps = 0

    def __call__(self, models: TrainModels, optimizers: TrainOptimizers, x_real: Tensor,
                 z: Tensor, fade_alpha: float | Tensor, accelerator: Any = None, *,
                 regularize: bool = True, micro_batches: int = 1) -> dict[str, Tensor]:
        deferred = self._defer if self.defer_checks else None
        self._steps += 1
        run = _Runner(self.cfg, models, optimizers, fade_alpha, accelerator, regularize, deferred)
        # The networks run channels-last (networks/layers.py); so should their input.
        x = x_real.contiguous(memory_format=torch.channels_last)
        # The posterior's noise for the whole batch at once: the same draws however it is split.
        eps = torch.randn(z.shape, device=z.device) if self.cfg.terms.needs_posterior_sample else None
        if micro_batches == 1:
            return run.iteration(x, z, eps)
        if not self.cfg.fused or self.cfg.generator_steps > 1:
            raise ValueError("gradient accumulation needs the fused step and one generator step "
                             "per iteration")
        if micro_batches > len(z):
            raise ValueError(f"{micro_batches} micro-batches of a batch of {len(z)}")
        epss = eps.tensor_split(micro_batches) if eps is not None else None
        return run.accumulated_iteration(x.tensor_split(micro_batches), z.tensor_split(micro_batches), epss)

    def _defer(self, name: str, loss: Tensor) -> None:
        self._pending.append((self._steps, name, ~torch.isfinite(loss.detach()).reshape(())))

    def verify(self, accelerator: Any = None) -> None:
        """Raise NonFiniteLossError on every rank if any loss since the last call was not
        finite on any rank (one host synchronisation); then start afresh."""
        pending, steps = self._pending, self._steps
        self._pending, self._steps = [], 0
        if not pending:
            return
        flags = torch.stack([bad for _, _, bad in pending]).float()
        if accelerator is not None and accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="max")
        for (step, name, _), bad in zip(pending, flags.tolist(), strict=True):
            if bad:
                raise NonFiniteLossError(name, float("nan"), steps_before_last=steps - step)


class _Runner:
    """The state of one iteration: which calls go through the wrapped networks."""

    def __init__(self, cfg: ObjectiveConfig, models: TrainModels, optimizers: TrainOptimizers,
                 fade_alpha: float | Tensor, accelerator: Any, regularize: bool = True,
                 deferred: Any = None):
        self.cfg, self.terms = cfg, cfg.terms
        self.deferred = deferred  # where a deferred check goes (TriangleStep._defer), or None
        self.r1_weight = cfg.w_r1 * cfg.r1_interval if regularize else 0.0  # lazy R1
        self.wrapped, self.optimizers, self.fade_alpha = models, optimizers, fade_alpha
        self.accelerator = accelerator
        unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: getattr(m, "module", m))
        self.raw = TrainModels(*(unwrap(m) for m in models))
        # Whether q(x) goes through the wrapped inference network (φ learns from it); if not,
        # q(x̃) does: one wrapped call per network and backward.
        self.q_real_wrapped = cfg.terms.needs_posterior_sample and (
            cfg.terms.inference_rec or cfg.terms.inference_kl)
        self.metrics: dict[str, Tensor] = {}

    # -- plumbing ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def check(self, name: str, loss: Tensor) -> None:
        """Raise NonFiniteLossError on every rank if ``loss`` is not finite on any rank.

        Every rank must stop together: a rank that stopped alone would leave the others
        waiting in the next all-reduce until the timeout."""
        if self.deferred is not None:
            self.deferred(name, loss)
            return
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="max")
        if bool(bad.item()):
            raise NonFiniteLossError(name, float(loss.detach()))

    def apply(self, name: str, loss: Tensor, *names: str) -> None:
        """Check ``loss``, backpropagate it and step the optimisers of ``names``."""
        self.check(name, loss)
        self.zero_grad(*names)
        self.backward(loss)
        self.step(*names)

    def zero_grad(self, *names: str) -> None:
        for n in names:
            getattr(self.optimizers, n).zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def local_gradients(self, local: bool, *names: str) -> contextlib.ExitStack:
        """With ``local``, the DDP-wrapped networks ``names`` keep this micro-batch's gradients
        on the rank (``DistributedDataParallel.no_sync``): entered before their forward passes,
        where DDP decides whether the backward all-reduces."""
        stack = contextlib.ExitStack()
        if local:
            for n in names:
                stack.enter_context(getattr(getattr(self.wrapped, n), "no_sync", contextlib.nullcontext)())
        return stack

    def step(self, *names: str) -> None:
        """Clip (``grad_clip``) and step the optimisers of ``names``; logs the gradient norms."""
        for n in names:
            params = [p for p in getattr(self.raw, n).parameters() if p.grad is not None]
            if self.cfg.grad_clip > 0:
                clip = (self.accelerator.clip_grad_norm_ if self.accelerator is not None
                        else torch.nn.utils.clip_grad_norm_)
                norm = clip(params, self.cfg.grad_clip)
            else:
                norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().norm() for p in params]))
            self.metrics[f"grad_norm_{n}"] = norm.detach()
            getattr(self.optimizers, n).step()

    # -- the iteration ----------------------------------------------------------------------
    def forward(self, x: Tensor, z: Tensor, eps: Tensor | None):
        """z̃ ~ q_φ(z|x) (through the wrapped network when φ learns from it), and x̃ = g(z) and
        g(z̃) in one wrapped generator call; x̃ keeps its graph for the θ step.
        Returns (x̃ or None, g(z̃) or None, μ, log σ²)."""
        cfg, t, fade_alpha = self.cfg, self.terms, self.fade_alpha
        g = self.wrapped.generator
        with self.autocast():
            z_rec = mu = logvar = None
            if t.needs_posterior_sample:
                with contextlib.nullcontext() if self.q_real_wrapped else torch.no_grad():
                    q = self.wrapped.inference if self.q_real_wrapped else self.raw.inference
                    mu, logvar = q(x, fade_alpha)
                z_rec = reparameterize(mu, logvar, eps.to(mu.dtype))
                if not t.inference_rec:
                    z_rec = z_rec.detach()
            needs_fake = t.energy or t.uses_latent_nll
            if z_rec is not None and cfg.fused:
                zs = [z, z_rec.to(z.dtype)] if needs_fake else [z_rec.to(z.dtype)]
                out = g(torch.cat(zs), fade_alpha).split(len(z))
                x_fake, x_rec = out if needs_fake else (None, out[0])
            else:
                x_fake, x_rec = g(z, fade_alpha), None
        self.z_rec = z_rec  # the strict φ and θ steps take it
        return x_fake, x_rec, mu, logvar

    def energy_loss(self, x: Tensor, x_fake: Tensor) -> Tensor:
        """The α step's loss: mean f(x̃) − mean f(x) and its regularisers; ``x_fake`` detached."""
        cfg, fade_alpha = self.cfg, self.fade_alpha
        with self.autocast():
            # R1 needs ∇ₓf(x): a leaf copy of x, so that x itself stays a constant below.
            x_e = x.detach().requires_grad_(True) if self.r1_weight else x
            f_real, f_fake_old = self.wrapped.energy(torch.cat([x_e, x_fake]), fade_alpha).split(len(x))
            r1 = None
            if self.r1_weight:
                (grad,) = torch.autograd.grad(f_real.float().sum(), x_e, create_graph=True)
                r1 = grad.float().square().flatten(1).sum(1)
                self.metrics["r1"] = r1.detach().mean()
            loss_e = energy_loss(f_real, f_fake_old, cfg.w_drift, cfg.w_level, r1, self.r1_weight)
        self.metrics.update(loss_energy=loss_e.detach(), f_real=f_real.float().mean().detach(),
                            f_fake=f_fake_old.float().mean().detach())
        return loss_e

    def iteration(self, x: Tensor, z: Tensor, eps: Tensor | None) -> dict[str, Tensor]:
        cfg, t = self.cfg, self.terms
        rec_scale = cfg.rec_scale(x.shape[-1])
        x_fake, x_rec, mu, logvar = self.forward(x, z, eps)
        if t.energy:
            self.apply("energy", self.energy_loss(x, x_fake.detach()), "energy")
        if cfg.fused:
            shared = self.phi_theta_loss(x, z, x_fake, x_rec, mu, logvar, rec_scale)
            self.apply("generator", shared, "generator", "inference")
        else:
            self.strict_phi(x, z, x_fake, self.z_rec, mu, logvar, rec_scale)
            self.theta(x, z, x_fake, self.z_rec, rec_scale)
        for _ in range(cfg.generator_steps - 1):
            self.theta(x, z, None, self.z_rec, rec_scale)
        return self.metrics

    def accumulated_iteration(self, xs: tuple[Tensor, ...], zs: tuple[Tensor, ...],
                              epss: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """:meth:`iteration` (fused) over micro-batches (module docstring)."""
        t, count, last = self.terms, sum(len(z) for z in zs), len(zs) - 1
        epss = epss if epss is not None else (None,) * len(zs)
        totals: dict[str, Tensor] = {}

        def add_metrics(weight: float) -> None:
            for name, value in self.metrics.items():
                if not name.startswith("grad_norm_"):
                    totals[name] = totals.get(name, 0) + value * weight
            self.metrics = {k: v for k, v in self.metrics.items() if k.startswith("grad_norm_")}

        if t.energy:
            self.zero_grad("energy")
            for i, (x, z) in enumerate(zip(xs, zs)):
                with self.local_gradients(i != last, "energy"):
                    with torch.no_grad(), self.autocast():
                        x_fake = self.raw.generator(z, self.fade_alpha)
                    loss_e = self.energy_loss(x, x_fake)
                    self.check("energy", loss_e)
                    self.backward(loss_e * (len(z) / count))
                add_metrics(len(z) / count)
            self.step("energy")
        self.zero_grad("generator", "inference")
        for i, (x, z, eps) in enumerate(zip(xs, zs, epss)):
            with self.local_gradients(i != last, "generator", "inference"):
                x_fake, x_rec, mu, logvar = self.forward(x, z, eps)
                shared = self.phi_theta_loss(x, z, x_fake, x_rec, mu, logvar,
                                             self.cfg.rec_scale(x.shape[-1]))
                self.check("generator", shared)
                self.backward(shared * (len(z) / count))
            add_metrics(len(z) / count)
        self.step("generator", "inference")
        self.metrics |= totals
        return self.metrics

    def phi_theta_loss(self, x, z, x_fake, x_rec, mu, logvar, rec_scale) -> Tensor:
        """The loss whose one backward gives the φ and θ steps (module docstring: what is
        shared, and why); checks the φ loss."""
        cfg, t, fade_alpha = self.cfg, self.terms, self.fade_alpha
        with self.autocast():
            rec = sum_squared_error(x, x_rec) * rec_scale if x_rec is not None else None
            kl = kl_term(mu, logvar, cfg.kl_reduction) if t.inference_kl else None
            lat_nll = None
            if t.uses_latent_nll:
                q_fake = self.raw.inference if self.q_real_wrapped else self.wrapped.inference
                x_in = x_fake if t.generator_lat else x_fake.detach()
                lat_nll = gaussian_nll(z, *q_fake(x_in, fade_alpha))
            f_fake = None
            if t.generator_energy:
                with frozen(self.raw.energy):
                    f_fake = self.raw.energy(x_fake, fade_alpha)  # scored by the updated energy
            loss_phi = inference_loss(cfg, rec, kl, lat_nll)
            loss_theta = generator_loss(cfg, rec, f_fake, lat_nll)
            shared = _shared_loss(cfg, rec, kl, lat_nll, f_fake)
        self._record(x, rec, rec_scale, kl, lat_nll, loss_phi, loss_theta)
        self.check("inference", loss_phi)
        return shared

    def strict_phi(self, x, z, x_fake, z_rec, mu, logvar, rec_scale) -> None:
        """φ step of Algorithm 1 with its own passes; θ gets no gradient from it."""
        cfg, t, fade_alpha = self.cfg, self.terms, self.fade_alpha
        with self.autocast():
            rec = kl = lat_nll = None
            if t.inference_rec:
                with frozen(self.raw.generator):
                    rec = sum_squared_error(x, self.raw.generator(z_rec, fade_alpha)) * rec_scale
            if t.inference_kl:
                kl = kl_term(mu, logvar, cfg.kl_reduction)
            if t.inference_lat:
                q_fake = self.raw.inference if self.q_real_wrapped else self.wrapped.inference
                lat_nll = gaussian_nll(z, *q_fake(x_fake.detach(), fade_alpha))
            loss_phi = inference_loss(cfg, rec, kl, lat_nll)
        self._record(x, rec, rec_scale, kl, lat_nll, loss_phi, None)
        self.apply("inference", loss_phi, "inference")

    def theta(self, x, z, x_fake, z_rec, rec_scale) -> None:
        """A θ step at the current α and φ; ``x_fake=None`` recomputes x̃ = g(z).

        The wrapped generator is called once per backward: for x̃ (and g(z̃)) when x̃ is
        recomputed, else x̃ already came from it and g(z̃) uses the unwrapped module."""
        cfg, t, fade_alpha = self.cfg, self.terms, self.fade_alpha
        with self.autocast():
            rec = f_fake = lat_nll = None
            zs = [] if x_fake is not None else [z]
            if t.generator_rec:
                zs.append(z_rec.detach().to(z.dtype))
            if zs:
                generator = self.wrapped.generator if x_fake is None else self.raw.generator
                out = generator(torch.cat(zs), fade_alpha).split(len(z))
                if x_fake is None:
                    x_fake, out = out[0], out[1:]
                if t.generator_rec:
                    rec = sum_squared_error(x, out[0]) * rec_scale
            if t.generator_energy:
                with frozen(self.raw.energy):
                    f_fake = self.raw.energy(x_fake, fade_alpha)
            if t.generator_lat:
                with frozen(self.raw.inference):
                    lat_nll = gaussian_nll(z, *self.raw.inference(x_fake, fade_alpha))
            loss_theta = generator_loss(cfg, rec, f_fake, lat_nll)
        self.metrics["loss_generator"] = loss_theta.detach()
        self.apply("generator", loss_theta, "generator")

    def _record(self, x, rec, rec_scale, kl, lat_nll, loss_phi, loss_theta) -> None:
        m = self.metrics
        if rec is not None:
            # Per-pixel MSE in [-1, 1] units (Table 2's quantity): SSE / (3·H·W).
            m["rec_mse"] = (rec.detach().mean() / rec_scale / x[0].numel())
        if kl is not None:
            m["kl"] = kl.detach().mean()
        if lat_nll is not None:
            m["lat_nll"] = lat_nll.detach().mean()
        m["loss_inference"] = loss_phi.detach()
        if loss_theta is not None:
            m["loss_generator"] = loss_theta.detach()


def _shared_loss(cfg: ObjectiveConfig, rec, kl, lat_nll, f_fake) -> Tensor:
    """The sum of every term of the φ and θ losses, each once.

    Its φ-gradient is the φ-loss's and its θ-gradient the θ-loss's, because each term either
    appears in both losses with the same weight or has no gradient for the other network.
    A term present in only one loss (wake-sleep's R for θ, with z̃ detached; acd's NLL) is
    added once too.
    """
    t = cfg.terms
    loss = torch.zeros((), device=next(v.device for v in (rec, kl, lat_nll, f_fake)
                                       if v is not None))
    if rec is not None and (t.inference_rec or t.generator_rec):
        loss = loss + cfg.w_rec * rec.mean()
    if kl is not None and t.inference_kl:
        loss = loss + cfg.w_kl * kl.mean()
    if lat_nll is not None and t.uses_latent_nll:
        loss = loss + cfg.w_lat * lat_nll.mean()
    if f_fake is not None and t.generator_energy:
        loss = loss - cfg.w_e * f_fake.float().mean()
    return loss
